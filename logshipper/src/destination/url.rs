//! `--dest` and the opt-in's value: `s3://bucket/prefix` or `file:///dir`. An S3 prefix may
//! hold `{namespace}`: in Kubernetes mode each volume then ships under its claim's namespace,
//! so one Airflow install can never write into another's `remote_base_log_folder`.

use std::path::PathBuf;

use crate::key::normalize_prefix;

/// Stands for a volume's claim namespace in an S3 prefix.
pub const NAMESPACE: &str = "{namespace}";

/// `--dest`, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DestinationUrl {
    S3 { bucket: String, prefix: String },
    File { dir: PathBuf },
}

/// Where one source's logs go within the destination: the prefix of their keys, and the URL
/// naming it in the ledger (so a source whose place changes ships anew).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    pub id: String,
    pub prefix: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid destination `{url}`: {reason}; expected s3://bucket/prefix or file:///dir")]
pub struct UrlError {
    url: String,
    reason: &'static str,
}

impl std::str::FromStr for DestinationUrl {
    type Err = UrlError;

    fn from_str(url: &str) -> Result<Self, UrlError> {
        let error = |reason| UrlError {
            url: url.to_owned(),
            reason,
        };
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.contains(NAMESPACE) {
                return Err(error("{namespace} goes in the prefix, not the bucket"));
            }
            if !valid_bucket(bucket) {
                return Err(error(
                    "bucket names are 3-63 lowercase letters, digits, `.` or `-`",
                ));
            }
            // A misspelt placeholder would be a literal prefix shared by every namespace.
            if prefix.replace(NAMESPACE, "").contains(['{', '}']) {
                return Err(error(
                    "the only placeholder a prefix may hold is {namespace}",
                ));
            }
            return Ok(DestinationUrl::S3 {
                bucket: bucket.to_owned(),
                prefix: normalize_prefix(prefix),
            });
        }
        if let Some(path) = url.strip_prefix("file://") {
            if path.is_empty() {
                return Err(error("the directory is missing"));
            }
            if path.contains(NAMESPACE) {
                return Err(error("{namespace} is for s3:// prefixes only"));
            }
            return Ok(DestinationUrl::File { dir: path.into() });
        }
        Err(error("unknown scheme"))
    }
}

/// The URL again, normalised: `s3://airflow/logs`, `file:///var/archive`.
impl std::fmt::Display for DestinationUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DestinationUrl::S3 { bucket, prefix } if prefix.is_empty() => {
                write!(f, "s3://{bucket}")
            }
            DestinationUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            DestinationUrl::File { dir } => write!(f, "file://{}", dir.display()),
        }
    }
}

impl DestinationUrl {
    /// Whether each namespace ships under a prefix of its own.
    pub fn per_namespace(&self) -> bool {
        matches!(self, DestinationUrl::S3 { prefix, .. } if prefix.contains(NAMESPACE))
    }

    /// The destination of a volume whose claim is in `namespace`. A namespace is a DNS label,
    /// so it adds no `/` and no `..`; anything else is refused rather than trusted.
    pub fn render(&self, namespace: &str) -> Result<DestinationUrl, String> {
        let DestinationUrl::S3 { bucket, prefix } = self else {
            return Ok(self.clone());
        };
        if !self.per_namespace() {
            return Ok(self.clone());
        }
        if !dns_label(namespace) {
            return Err(format!(
                "the claim's namespace `{namespace}` is not a DNS label to put in {self}"
            ));
        }
        Ok(DestinationUrl::S3 {
            bucket: bucket.clone(),
            prefix: prefix.replace(NAMESPACE, namespace),
        })
    }

    /// What every namespace's destination shares: the prefix before its first part holding
    /// `{namespace}`. The store is reached, and checked, there.
    pub fn shared(&self) -> DestinationUrl {
        match self {
            DestinationUrl::S3 { bucket, prefix } => {
                let fixed: Vec<&str> = prefix
                    .split('/')
                    .take_while(|part| !part.contains(NAMESPACE))
                    .collect();
                DestinationUrl::S3 {
                    bucket: bucket.clone(),
                    prefix: fixed.join("/"),
                }
            }
            DestinationUrl::File { .. } => self.clone(),
        }
    }

    /// Where logs sent to this URL go within the destination made from [`Self::shared`];
    /// `None` for a directory, which has no prefix.
    pub fn place(&self) -> Option<Place> {
        match self {
            DestinationUrl::S3 { prefix, .. } => Some(Place {
                id: self.to_string(),
                prefix: prefix.clone(),
            }),
            DestinationUrl::File { .. } => None,
        }
    }
}

fn valid_bucket(bucket: &str) -> bool {
    (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && !bucket.starts_with(['.', '-'])
        && !bucket.ends_with(['.', '-'])
}

/// RFC 1123 label, what Kubernetes namespace names are.
fn dns_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<DestinationUrl, UrlError> {
        url.parse()
    }

    fn s3(bucket: &str, prefix: &str) -> DestinationUrl {
        DestinationUrl::S3 {
            bucket: bucket.into(),
            prefix: prefix.into(),
        }
    }

    #[test]
    fn s3_urls() {
        assert_eq!(parse("s3://airflow/logs"), Ok(s3("airflow", "logs")));
        assert_eq!(parse("s3://airflow/logs/"), Ok(s3("airflow", "logs")));
        assert_eq!(parse("s3://airflow"), Ok(s3("airflow", "")));
        assert_eq!(parse("s3://airflow/"), Ok(s3("airflow", "")));
        assert_eq!(
            parse("s3://my.bucket-1/a//b/"),
            Ok(s3("my.bucket-1", "a/b"))
        );
    }

    #[test]
    fn urls_print_normalised() {
        for (url, shown) in [
            ("s3://airflow/logs/", "s3://airflow/logs"),
            ("s3://airflow", "s3://airflow"),
            ("file:///var/archive", "file:///var/archive"),
        ] {
            assert_eq!(parse(url).unwrap().to_string(), shown);
        }
    }

    #[test]
    fn file_urls() {
        let file = |dir: &str| DestinationUrl::File { dir: dir.into() };
        assert_eq!(parse("file:///var/archive"), Ok(file("/var/archive")));
        assert_eq!(parse("file://./shipped-logs"), Ok(file("./shipped-logs")));
        assert_eq!(parse("file://shipped"), Ok(file("shipped")));
    }

    #[test]
    fn bad_urls_say_what_is_expected() {
        for url in [
            "s3://",
            "s3://Airflow/logs",
            "s3://ab",
            "s3://-x-/",
            "file://",
            "/var/logs",
            "http://x",
        ] {
            let err = parse(url).unwrap_err();
            assert!(
                err.to_string().contains("expected s3://bucket/prefix"),
                "{url}: {err}"
            );
        }
    }

    #[test]
    fn a_prefix_may_name_the_namespace() {
        let dest = parse("s3://airflow/logs/{namespace}/").unwrap();
        assert_eq!(dest, s3("airflow", "logs/{namespace}"));
        assert_eq!(dest.to_string(), "s3://airflow/logs/{namespace}");
        assert!(dest.per_namespace());
        assert!(!parse("s3://airflow/logs").unwrap().per_namespace());
        assert_eq!(
            parse("s3://airflow/team-{namespace}/logs").unwrap(),
            s3("airflow", "team-{namespace}/logs")
        );
        for url in [
            "s3://{namespace}/logs",
            "s3://airflow-{namespace}/logs",
            "s3://airflow/logs/{ns}",
            "s3://airflow/logs/{namepsace}",
            "s3://airflow/logs/{namespace",
            "file:///var/archive/{namespace}",
        ] {
            let err = parse(url).unwrap_err().to_string();
            assert!(err.contains("{namespace}"), "{url}: {err}");
        }
    }

    #[test]
    fn a_namespace_is_rendered_only_if_it_is_a_dns_label() {
        let dest = parse("s3://airflow/logs/{namespace}").unwrap();
        assert_eq!(dest.render("team-a"), Ok(s3("airflow", "logs/team-a")));
        let inner = parse("s3://airflow/{namespace}/logs-{namespace}").unwrap();
        assert_eq!(inner.render("b"), Ok(s3("airflow", "b/logs-b")));
        for hostile in [
            "",
            "..",
            "a/b",
            "../team-b",
            "Team-A",
            "-a",
            "a-",
            &"a".repeat(64),
        ] {
            let err = dest.render(hostile).unwrap_err();
            assert!(err.contains("not a DNS label"), "{hostile}: {err}");
        }
        // Nothing to render: the same destination for every namespace.
        let one = parse("s3://airflow/logs").unwrap();
        assert_eq!(one.render("team-a"), Ok(one.clone()));
        let dir = parse("file:///var/archive").unwrap();
        assert_eq!(dir.render("team-a"), Ok(dir.clone()));
    }

    #[test]
    fn the_shared_part_is_what_comes_before_the_namespace() {
        let shared = |url: &str| parse(url).unwrap().shared().to_string();
        assert_eq!(shared("s3://airflow/logs/{namespace}"), "s3://airflow/logs");
        assert_eq!(shared("s3://airflow/a/{namespace}/b"), "s3://airflow/a");
        assert_eq!(shared("s3://airflow/logs-{namespace}"), "s3://airflow");
        assert_eq!(shared("s3://airflow/logs"), "s3://airflow/logs");
        assert_eq!(shared("file:///var/archive"), "file:///var/archive");
    }

    #[test]
    fn a_place_is_the_prefix_and_the_url_naming_it() {
        let dest = parse("s3://airflow/logs/{namespace}").unwrap();
        let place = dest.render("team-a").unwrap().place().unwrap();
        assert_eq!(place.id, "s3://airflow/logs/team-a");
        assert_eq!(place.prefix, "logs/team-a");
        assert_eq!(parse("file:///var/archive").unwrap().place(), None);
    }
}
