//! The Dockerfile's final (runtime) stage, read so the image the real node
//! runs is assembled to the same layout: base, copied binaries, labels, user
//! and entrypoint. Anything it cannot reproduce is an error.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};

/// The repository's Dockerfile, as built into this harness.
pub const DOCKERFILE: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../Dockerfile"));

/// What the Dockerfile's final (runtime) stage puts in the image.
#[derive(Debug, Default, PartialEq)]
pub struct RuntimeStage {
    /// The `FROM` image.
    pub base: String,
    pub labels: Vec<(String, String)>,
    /// Files copied from an earlier stage, all of them localship binaries.
    pub copies: Vec<Copied>,
    pub user: Option<String>,
    pub entrypoint: Vec<String>,
}

#[derive(Debug, PartialEq)]
pub struct Copied {
    /// Its name in the build stage, which is also the binary's name.
    pub name: String,
    /// Where it lands in the image.
    pub path: String,
}

/// Reads the last stage of a Dockerfile. Any instruction this harness does not
/// reproduce is an error, so a change to the image cannot go untested.
pub fn parse_runtime_stage(dockerfile: &str) -> Result<RuntimeStage> {
    let instructions = logical_lines(dockerfile);
    let start = instructions
        .iter()
        .rposition(|(_, keyword, _)| keyword == "FROM")
        .context("the Dockerfile has no FROM")?;
    let mut stage = RuntimeStage::default();
    let mut args = HashMap::new();
    for (line, keyword, rest) in &instructions[start..] {
        parse_instruction(&mut stage, &mut args, keyword, rest)
            .with_context(|| format!("Dockerfile line {line}: {keyword} {rest}"))?;
    }
    Ok(stage)
}

fn parse_instruction(
    stage: &mut RuntimeStage,
    args: &mut HashMap<String, String>,
    keyword: &str,
    rest: &str,
) -> Result<()> {
    match keyword {
        "FROM" => {
            let words = words(rest, args)?;
            let mut images = words.iter().filter(|w| !w.starts_with("--"));
            stage.base = images.next().context("FROM names no image")?.clone();
        }
        "ARG" => {
            for word in words(rest, args)? {
                let (name, default) = word.split_once('=').unwrap_or((&word, ""));
                args.insert(name.to_owned(), default.to_owned());
            }
        }
        "LABEL" => {
            for word in words(rest, args)? {
                let (key, value) = word
                    .split_once('=')
                    .context("LABEL wants key=value pairs")?;
                stage.labels.push((key.to_owned(), value.to_owned()));
            }
        }
        "COPY" => parse_copy(stage, &words(rest, args)?)?,
        "USER" => match &words(rest, args)?[..] {
            [user] => stage.user = Some(user.clone()),
            _ => bail!("USER takes one user[:group]"),
        },
        "ENTRYPOINT" => {
            if !rest.trim_start().starts_with('[') {
                bail!("only the exec (JSON) form is reproduced: the image has no shell");
            }
            stage.entrypoint =
                serde_json::from_str(rest).context("ENTRYPOINT is not a JSON array of strings")?;
        }
        other => bail!(
            "the test image does not reproduce {other}; teach tests/src/node/images.rs what it does"
        ),
    }
    Ok(())
}

fn parse_copy(stage: &mut RuntimeStage, words: &[String]) -> Result<()> {
    let (flags, paths): (Vec<&String>, Vec<&String>) =
        words.iter().partition(|w| w.starts_with("--"));
    for flag in flags {
        if !flag.starts_with("--from=") {
            bail!("COPY {flag} is not reproduced; teach tests/src/node/images.rs what it does");
        }
    }
    if !words.iter().any(|w| w.starts_with("--from=")) {
        bail!("only COPY --from a build stage is reproduced: the image is made of localship's binaries");
    }
    let (dest, sources) = paths.split_last().context("COPY names no destination")?;
    if sources.is_empty() {
        bail!("COPY names no source");
    }
    for source in sources {
        let name = source.rsplit('/').next().unwrap_or(source).to_owned();
        let path = match dest.strip_suffix('/') {
            Some(dir) => format!("{dir}/{name}"),
            None if sources.len() == 1 => dest.to_string(),
            None => bail!("COPY of several files needs a destination ending in /"),
        };
        stage.copies.push(Copied { name, path });
    }
    Ok(())
}

/// (line number, upper-cased keyword, arguments) per instruction, with
/// continuations joined and comments dropped, as Docker does.
fn logical_lines(dockerfile: &str) -> Vec<(usize, String, String)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (index, line) in dockerfile.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let (start, text) = current.get_or_insert_with(|| (index + 1, String::new()));
        match line.trim_end().strip_suffix('\\') {
            Some(body) => text.push_str(body),
            None => {
                text.push_str(line);
                let (start, text) = (*start, std::mem::take(text));
                current = None;
                let (keyword, rest) = text
                    .trim()
                    .split_once(char::is_whitespace)
                    .unwrap_or((text.trim(), ""));
                out.push((start, keyword.to_ascii_uppercase(), rest.trim().to_owned()));
            }
        }
    }
    out
}

/// Splits shell-style words: quotes, backslash escapes and `$NAME` /
/// `${NAME}` from the stage's ARGs (not inside single quotes).
fn words(text: &str, args: &HashMap<String, String>) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut word: Option<String> = None;
    let mut quote = None;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, c) if c.is_whitespace() => out.extend(word.take()),
            (None, '"' | '\'') => {
                quote = Some(c);
                word.get_or_insert_default();
            }
            (Some(q), c) if c == q => quote = None,
            (Some('\''), c) => word.get_or_insert_default().push(c),
            (_, '\\') => {
                let w = word.get_or_insert_default();
                match chars.next() {
                    Some(n) if quote.is_none() || matches!(n, '"' | '\\' | '$') => w.push(n),
                    Some(n) => w.extend(['\\', n]),
                    None => w.push('\\'),
                }
            }
            (_, '$') => {
                let braced = chars.next_if_eq(&'{').is_some();
                let mut name = String::new();
                while let Some(n) = chars.next_if(|n| n.is_ascii_alphanumeric() || *n == '_') {
                    name.push(n);
                }
                if braced && chars.next() != Some('}') {
                    bail!("only plain ${{NAME}} is substituted, not `${{{name}...`");
                }
                let value = match name.as_str() {
                    "" if !braced => "$",
                    _ => args
                        .get(&name)
                        .with_context(|| format!("${name} is not an ARG of this stage"))?,
                };
                word.get_or_insert_default().push_str(value);
            }
            (_, c) => word.get_or_insert_default().push(c),
        }
    }
    if quote.is_some() {
        bail!("unterminated quote");
    }
    out.extend(word);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_real_dockerfile_describes_a_nonroot_image_of_every_binary() {
        let stage = parse_runtime_stage(DOCKERFILE).unwrap();
        assert!(
            stage.base.starts_with("gcr.io/distroless/cc-debian12"),
            "{}",
            stage.base
        );
        let paths: Vec<&str> = stage.copies.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/usr/local/bin/localship-provisioner",
                "/usr/local/bin/localship-node-cleanup",
                "/usr/local/bin/localship-logshipper"
            ]
        );
        assert_eq!(stage.user.as_deref(), Some("65532:65532"));
        let uid = stage.user.as_deref().unwrap().split(':').next().unwrap();
        assert!(uid != "0" && uid != "root");
        assert_eq!(stage.entrypoint, ["/usr/local/bin/localship-provisioner"]);
        // Built without --build-arg, the image claims the crate's version.
        let version = stage
            .labels
            .iter()
            .find(|(k, _)| k == "org.opencontainers.image.version");
        assert_eq!(
            version.map(|(_, v)| v.as_str()),
            Some(env!("CARGO_PKG_VERSION"))
        );
    }

    const SAMPLE: &str = r#"
FROM rust AS build
RUN cargo build
ENV IGNORED=1

# runtime
FROM --platform=linux/amd64 example.org/base:1 AS run
ARG V=1.2 NAME
label a="x y" \
# a comment inside a continuation
      b='$V' c="${V}-$V" d=pre$NAME
COPY --from=build /out/one /out/two /opt/bin/
COPY --from=build /out/three /opt/three-renamed
USER 10:20
ENTRYPOINT ["/opt/bin/one", "--flag"]
"#;

    #[test]
    fn reads_only_the_last_stage() {
        let stage = parse_runtime_stage(SAMPLE).unwrap();
        assert_eq!(stage.base, "example.org/base:1");
        let labels: Vec<(&str, &str)> = stage
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            labels,
            [("a", "x y"), ("b", "$V"), ("c", "1.2-1.2"), ("d", "pre")]
        );
        let copies: Vec<(&str, &str)> = stage
            .copies
            .iter()
            .map(|c| (c.name.as_str(), c.path.as_str()))
            .collect();
        assert_eq!(
            copies,
            [
                ("one", "/opt/bin/one"),
                ("two", "/opt/bin/two"),
                ("three", "/opt/three-renamed")
            ]
        );
        assert_eq!(stage.user.as_deref(), Some("10:20"));
        assert_eq!(stage.entrypoint, ["/opt/bin/one", "--flag"]);
    }

    fn error(dockerfile: &str) -> String {
        format!("{:#}", parse_runtime_stage(dockerfile).unwrap_err())
    }

    #[test]
    fn refuses_what_it_cannot_reproduce() {
        let unknown = error(&format!("{SAMPLE}WORKDIR /data\n"));
        assert!(
            unknown.contains("line 16") && unknown.contains("does not reproduce WORKDIR"),
            "{unknown}"
        );
        assert!(error("FROM a\nENTRYPOINT /bin/x\n").contains("exec (JSON) form"));
        assert!(error("FROM a\nCOPY config.yaml /etc/\n").contains("COPY --from"));
        assert!(error("FROM a\nCOPY --from=b --chmod=700 x /x\n").contains("--chmod"));
        assert!(error("FROM a\nLABEL v=$UNSET\n").contains("$UNSET is not an ARG"));
        assert!(error("FROM a\nARG V\nLABEL v=${V:-1}\n").contains("only plain"));
        assert!(error("RUN x\n").contains("no FROM"));
    }
}
