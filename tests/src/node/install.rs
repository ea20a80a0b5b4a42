//! Installing localship on the real node as a user does: kubectl (`apply
//! -k` of a user's own overlay that names the locally built image) or helm,
//! both as the cluster admin.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::{images, RealNode};
use crate::servers::helm_bin;

pub fn repo_path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

/// A user's kustomization over `base` (a directory of the repository) that
/// swaps in the locally built image with a kustomize `images:` entry, plus
/// any `extra` lines.
pub fn user_overlay(dir: &Path, base: &str, extra: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let (name, tag) = images::LOCALSHIP_IMAGE
        .rsplit_once(':')
        .context("image reference without a tag")?;
    // kustomize takes only relative paths to other kustomizations.
    let base = relative(&dir.canonicalize()?, &repo_path(base).canonicalize()?);
    let yaml = format!(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {base}\nimages:\n  - name: ghcr.io/localship/localship\n    newName: {name}\n    newTag: \"{tag}\"\n{extra}",
        base = base.display(),
    );
    std::fs::write(dir.join("kustomization.yaml"), yaml)?;
    Ok(dir.to_path_buf())
}

/// Runs kubectl as the cluster admin; fails with its stderr.
pub fn kubectl(node: &RealNode, args: &[&str]) -> Result<String> {
    let out = node.control_plane().kubectl(args)?;
    if !out.status.success() {
        bail!(
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Runs helm against the node's control plane; fails with its stderr.
pub fn helm(node: &RealNode, args: &[&str]) -> Result<String> {
    let out = run_helm(Some(node.control_plane().admin_kubeconfig()), args)?;
    if !out.status.success() {
        bail!(
            "helm {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Runs helm with its cache, config and data kept out of $HOME, against the
/// cluster of `kubeconfig` if one is given.
pub fn run_helm(kubeconfig: Option<&Path>, args: &[&str]) -> Result<std::process::Output> {
    let home = crate::scratch_dir("helm-home")?;
    let mut helm = std::process::Command::new(helm_bin()?);
    helm.args(args)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"));
    if let Some(kubeconfig) = kubeconfig {
        helm.env("KUBECONFIG", kubeconfig);
    }
    helm.output().context("run helm")
}

/// `to` relative to `from`, both absolute and canonical.
fn relative(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<_> = from.components().collect();
    let to: Vec<_> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut path = PathBuf::new();
    for _ in common..from.len() {
        path.push("..");
    }
    for part in &to[common..] {
        path.push(part);
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_climb_to_the_common_root() {
        assert_eq!(
            relative(
                Path::new("/tmp/node/overlays/base"),
                Path::new("/work/main/deploy")
            ),
            PathBuf::from("../../../../work/main/deploy")
        );
        assert_eq!(
            relative(Path::new("/a/b"), Path::new("/a/b/c")),
            PathBuf::from("c")
        );
    }
}
