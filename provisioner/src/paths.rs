//! Where a volume's directory goes under a base path: rancher's default name
//! (`<pv>_<namespace>_<claim>`) or its `pathPattern` template, made safe.
//! The result is always a relative path of plain components, so joined to a
//! base path it cannot leave it, whatever the names or the template say.

use std::collections::BTreeMap;
use std::path::PathBuf;

use thiserror::Error;

/// Longest file-name component Linux filesystems accept.
pub const MAX_COMPONENT_BYTES: usize = 255;

#[derive(Debug, Error, PartialEq)]
pub enum PathError {
    #[error("pathPattern `{pattern}`: {reason}")]
    Pattern { pattern: String, reason: String },
    #[error("volume path `{path}` is unsafe: {reason}")]
    Unsafe { path: String, reason: String },
}

/// What a pathPattern may refer to.
#[derive(Debug, Clone, Default)]
pub struct ClaimNames<'a> {
    pub pv_name: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
    pub annotations: Option<&'a BTreeMap<String, String>>,
    pub labels: Option<&'a BTreeMap<String, String>>,
}

/// The directory for a volume, relative to its base path.
pub fn volume_dir(names: &ClaimNames, pattern: Option<&str>) -> Result<PathBuf, PathError> {
    let raw = match pattern {
        None => format!("{}_{}_{}", names.pv_name, names.namespace, names.name),
        Some(p) => render(p, names)?,
    };
    safe_relative(&raw)
}

/// Renders the subset of Go template syntax rancher users write in
/// pathPattern: `{{ .PVName }}`, `{{ .PVC.Namespace }}`, `{{ .PVC.Name }}`,
/// `{{ .PVC.Annotations.key }}`, `{{ .PVC.Labels.key }}` and
/// `{{ index .PVC.Annotations "key" }}` (likewise for Labels).
fn render(pattern: &str, names: &ClaimNames) -> Result<String, PathError> {
    let err = |reason: String| PathError::Pattern {
        pattern: pattern.to_string(),
        reason,
    };
    let mut out = String::new();
    let mut rest = pattern;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| err("`{{` without a closing `}}`".into()))?;
        let expr = after[..end].trim();
        let value = lookup(expr, names).map_err(err)?;
        // A value is one path component's worth of text: a `/` in an
        // annotation must not create directories the template did not ask for.
        out.push_str(&value.replace('/', "_"));
        rest = &after[end + 2..];
    }
    if rest.contains("}}") {
        return Err(err("`}}` without an opening `{{`".into()));
    }
    out.push_str(rest);
    Ok(out)
}

fn lookup(expr: &str, names: &ClaimNames) -> Result<String, String> {
    let map_value = |map: Option<&BTreeMap<String, String>>, what: &str, key: &str| {
        map.and_then(|m| m.get(key))
            .cloned()
            .ok_or_else(|| format!("the claim has no {what} `{key}`"))
    };
    match expr {
        ".PVName" => return Ok(names.pv_name.to_string()),
        ".PVC.Name" => return Ok(names.name.to_string()),
        ".PVC.Namespace" => return Ok(names.namespace.to_string()),
        _ => {}
    }
    if let Some(key) = expr.strip_prefix(".PVC.Annotations.") {
        return map_value(names.annotations, "annotation", key);
    }
    if let Some(key) = expr.strip_prefix(".PVC.Labels.") {
        return map_value(names.labels, "label", key);
    }
    let words: Vec<&str> = expr.split_whitespace().collect();
    if let ["index", map, key] = words.as_slice() {
        let key = key
            .strip_prefix('"')
            .and_then(|k| k.strip_suffix('"'))
            .ok_or_else(|| format!("`{expr}`: the key must be a quoted string"))?;
        return match *map {
            ".PVC.Annotations" => map_value(names.annotations, "annotation", key),
            ".PVC.Labels" => map_value(names.labels, "label", key),
            _ => Err(format!(
                "`{expr}`: only .PVC.Annotations and .PVC.Labels can be indexed"
            )),
        };
    }
    Err(format!(
        "unsupported expression `{{{{ {expr} }}}}` (use .PVName, .PVC.Name, .PVC.Namespace, \
         .PVC.Annotations.<key> or .PVC.Labels.<key>)"
    ))
}

/// Checks that `raw` is a relative path of plain components and shortens
/// any component longer than [`MAX_COMPONENT_BYTES`].
pub fn safe_relative(raw: &str) -> Result<PathBuf, PathError> {
    let unsafe_path = |reason: &str| PathError::Unsafe {
        path: raw.to_string(),
        reason: reason.to_string(),
    };
    if raw.is_empty() {
        return Err(unsafe_path("it is empty"));
    }
    if raw.starts_with('/') {
        return Err(unsafe_path("it is absolute"));
    }
    if raw.chars().any(|c| c.is_control()) {
        return Err(unsafe_path("it contains control characters"));
    }
    let mut path = PathBuf::new();
    for component in raw.split('/') {
        match component {
            "" => {
                return Err(unsafe_path(
                    "it has an empty component (`//` or a trailing `/`)",
                ))
            }
            "." | ".." => return Err(unsafe_path("it has a `.` or `..` component")),
            c => path.push(shorten(c)),
        }
    }
    Ok(path)
}

/// Truncates a component to fit, keeping it unique with a hash of the whole.
fn shorten(component: &str) -> String {
    if component.len() <= MAX_COMPONENT_BYTES {
        return component.to_string();
    }
    let suffix = format!("-{:016x}", fnv1a(component.as_bytes()));
    let mut cut = MAX_COMPONENT_BYTES - suffix.len();
    while !component.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{suffix}", &component[..cut])
}

/// FNV-1a: stable across releases and platforms, which a directory name must be.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names<'a>(ann: &'a BTreeMap<String, String>) -> ClaimNames<'a> {
        ClaimNames {
            pv_name: "pvc-0b5e2f4c-1d2e-4c1a-9f00-3b1d2c4e5f60",
            namespace: "airflow",
            name: "logs-airflow-worker-0",
            annotations: Some(ann),
            labels: None,
        }
    }

    #[test]
    fn default_name_matches_rancher() {
        let ann = BTreeMap::new();
        assert_eq!(
            volume_dir(&names(&ann), None).unwrap(),
            PathBuf::from("pvc-0b5e2f4c-1d2e-4c1a-9f00-3b1d2c4e5f60_airflow_logs-airflow-worker-0")
        );
    }

    #[test]
    fn patterns_render_like_go_templates() {
        let ann = BTreeMap::from([("team".to_string(), "data/eng".to_string())]);
        let n = names(&ann);
        let p = |pat| volume_dir(&n, Some(pat)).unwrap();
        assert_eq!(
            p("{{ .PVC.Namespace }}/{{ .PVC.Name }}"),
            PathBuf::from("airflow/logs-airflow-worker-0")
        );
        assert_eq!(p("{{.PVName}}"), PathBuf::from(n.pv_name));
        // A slash inside a value stays inside its component.
        assert_eq!(
            p("{{ .PVC.Annotations.team }}/x"),
            PathBuf::from("data_eng/x")
        );
        assert_eq!(
            p(r#"{{ index .PVC.Annotations "team" }}"#),
            PathBuf::from("data_eng")
        );
    }

    #[test]
    fn hostile_patterns_are_refused() {
        let ann = BTreeMap::from([("evil".to_string(), "..".to_string())]);
        let n = names(&ann);
        for pat in [
            "../{{ .PVName }}",
            "/etc/{{ .PVName }}",
            "{{ .PVName }}/..",
            "a//b",
            "{{ .PVName",
            "{{ .Env.HOME }}",
            "{{ .PVC.Annotations.evil }}",
            "{{ .PVC.Annotations.missing }}",
            "x}}",
            "{{ index .PVC.Annotations evil }}",
            "",
            "a\nb",
        ] {
            assert!(volume_dir(&n, Some(pat)).is_err(), "{pat:?} was accepted");
        }
    }

    #[test]
    fn long_components_are_shortened_but_stay_unique() {
        let ann = BTreeMap::new();
        let long_a = "a".repeat(253);
        let mut long_b = "a".repeat(252);
        long_b.push('b');
        let dir = |name: &str| {
            let mut n = names(&ann);
            n.name = name;
            volume_dir(&n, None).unwrap()
        };
        let (a, b) = (dir(&long_a), dir(&long_b));
        assert_eq!(a.as_os_str().len(), MAX_COMPONENT_BYTES);
        assert!(a.to_str().unwrap().starts_with("pvc-0b5e2f4c"));
        assert_ne!(a, b);
        // Multi-byte text is cut on a character boundary.
        assert!(safe_relative(&"é".repeat(200)).is_ok());
    }
}
