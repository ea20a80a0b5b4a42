//! Command line and environment: every flag can also be set as `LOCALSHIP_<FLAG>`, except
//! `--node-name`, which is `NODE_NAME` as the downward API usually sets it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::destination::s3::MIN_PART_SIZE;
use crate::destination::DestinationUrl;
use crate::filter::DEFAULT_INCLUDE;
use crate::{Error, Result};

/// Where `/metrics`, `/healthz` and `/readyz` listen in daemon mode unless told otherwise.
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:9102";

/// Claim annotation (or StorageClass parameter or annotation) that opts a volume in.
pub const DEFAULT_OPT_IN_ANNOTATION: &str = localship_names::SHIP_TO;

/// Ships finished Apache Airflow task logs to S3/MinIO or a directory, exactly once.
///
/// Each log is shipped when it has not changed for --settle, byte-identical, under
/// `<prefix>/<path relative to the source>`: the key Airflow's remote log reader looks for.
/// A log that changes later is shipped again. What was shipped is kept in --ledger, so a
/// restart asks nothing of the destination about files already shipped.
#[derive(Debug, Clone, Parser)]
#[command(name = "localship-logshipper", version)]
pub struct Args {
    /// Directory of logs to ship: Airflow's `base_log_folder`. Repeat (or separate with
    /// commas) for several.
    #[arg(
        long = "source",
        value_name = "DIR",
        env = "LOCALSHIP_SOURCE",
        value_delimiter = ',',
        default_value = "./logs"
    )]
    pub sources: Vec<PathBuf>,

    /// Where logs go: `s3://bucket/prefix`, the same as Airflow's `remote_base_log_folder`,
    /// or `file:///dir` (a relative `file://dir` is taken from the working directory).
    /// Kubernetes mode: the prefix may hold `{namespace}`, e.g. `s3://airflow/logs/{namespace}`,
    /// and each volume then ships under its claim's namespace, so one Airflow install (set
    /// its `remote_base_log_folder` to `s3://airflow/logs/<its namespace>`) never writes
    /// into another's.
    #[arg(
        long,
        value_name = "URL",
        env = "LOCALSHIP_DEST",
        default_value = "file://./shipped-logs"
    )]
    pub dest: DestinationUrl,

    /// File recording what was shipped (an embedded database); its directory is created.
    /// Keep it on local disk that outlives restarts; one shipper per ledger.
    #[arg(
        long,
        value_name = "PATH",
        env = "LOCALSHIP_LEDGER",
        default_value = "./.localship/ledger.redb"
    )]
    pub ledger: PathBuf,

    /// How long a file must stay unchanged (size and mtime) before it is shipped.
    #[arg(long, value_name = "DURATION", env = "LOCALSHIP_SETTLE", default_value = "5s", value_parser = humantime::parse_duration)]
    pub settle: Duration,

    /// Whether Airflow's own remote logging uploads these logs to the same bucket too (it
    /// does when `remote_logging` is on, as docs/airflow.md sets it up). `on`: a log that may
    /// still grow goes under a side key of ours, `<key>.localship-part-<writer>`, which
    /// Airflow's reader shows and its upload never appends to; the side key is removed once
    /// Airflow's own object holds the log, and the log's own key is written only once the
    /// log is final (--final-after, or its volume is being deleted). So no line is ever shown
    /// twice. `off`: localship is the only writer and ships straight to the log's key.
    /// S3 destinations only.
    #[arg(
        long,
        value_enum,
        value_name = "ON|OFF",
        env = "LOCALSHIP_AIRFLOW_REMOTE_LOGGING",
        default_value = "on"
    )]
    pub airflow_remote_logging: Toggle,

    /// With --airflow-remote-logging on: a log unchanged this long is final, and localship
    /// writes its key itself if Airflow's upload never came (a killed worker). Longer than
    /// any quiet spell of a running task, or Airflow's final upload repeats what was written;
    /// localship then rewrites the key without the repeat when it sees the log again.
    #[arg(long, value_name = "DURATION", env = "LOCALSHIP_FINAL_AFTER", default_value = "10m", value_parser = humantime::parse_duration)]
    pub final_after: Duration,

    /// How often every source is walked again, to catch what file events missed; also how
    /// often --delete-after looks for files to remove.
    #[arg(long, value_name = "DURATION", env = "LOCALSHIP_RESCAN", default_value = "60s", value_parser = humantime::parse_duration)]
    pub rescan: Duration,

    /// Most directories of one source watched with inotify, from the budget the kubelet and
    /// every pod on the node share (fs.inotify.max_user_watches). Logs in directories beyond
    /// it are still found, by the rescan every --rescan, so they ship up to that much later.
    #[arg(
        long,
        value_name = "N",
        env = "LOCALSHIP_MAX_WATCHES_PER_SOURCE",
        default_value_t = crate::discover::MAX_WATCHES_PER_SOURCE
    )]
    pub max_watches_per_source: usize,

    /// Files to ship, as globs relative to a source (`*` stays within a directory, `**`
    /// crosses them). Giving any replaces the default of Airflow task logs and their
    /// triggerer files; add e.g. `scheduler/**/*.log` to ship scheduler logs too.
    #[arg(long = "include", value_name = "GLOB", env = "LOCALSHIP_INCLUDE", value_delimiter = ',', default_values = DEFAULT_INCLUDE)]
    pub include: Vec<String>,

    /// Files not to ship even though they match --include.
    #[arg(
        long = "exclude",
        value_name = "GLOB",
        env = "LOCALSHIP_EXCLUDE",
        value_delimiter = ','
    )]
    pub exclude: Vec<String>,

    /// Ship what is there and exit (for Jobs and cron): exit 0 when everything found was
    /// shipped, 1 when some file failed, 2 when the shipper could not start. Files still
    /// changing after one --settle period are shipped as they are then; the next run
    /// re-ships them once they have grown.
    #[arg(long, env = "LOCALSHIP_ONCE")]
    pub once: bool,

    /// Remove a local log this long after its last change, once its upload was verified and
    /// recorded, in place of Airflow's log-groomer. Nothing unshipped is ever removed.
    #[arg(long, value_name = "DURATION", env = "LOCALSHIP_DELETE_AFTER", value_parser = humantime::parse_duration)]
    pub delete_after: Option<Duration>,

    /// S3 endpoint for MinIO or another S3-compatible store, e.g. `http://minio:9000`.
    /// Default: AWS. Credentials come from the standard AWS chain (AWS_ACCESS_KEY_ID and
    /// AWS_SECRET_ACCESS_KEY, AWS_PROFILE, web identity, instance role).
    #[arg(long, value_name = "URL", env = "LOCALSHIP_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,

    /// Region of the bucket. Default: AWS_REGION, else the AWS config profile, else
    /// us-east-1.
    #[arg(long, value_name = "REGION", env = "LOCALSHIP_S3_REGION")]
    pub s3_region: Option<String>,

    /// Address the bucket in the path (`http://host/bucket/key`) rather than the host name;
    /// MinIO usually needs this.
    #[arg(long, env = "LOCALSHIP_S3_PATH_STYLE")]
    pub s3_path_style: bool,

    /// Write new objects without `If-None-Match: *`, asking with a HEAD first instead (two
    /// requests per new log instead of one). Only for an S3-compatible store that ignores
    /// conditional writes; AWS S3 and MinIO honour them.
    #[arg(long, env = "LOCALSHIP_S3_NO_CONDITIONAL_WRITES")]
    pub s3_no_conditional_writes: bool,

    /// Create the bucket if it does not exist, instead of waiting for someone to.
    #[arg(long, env = "LOCALSHIP_CREATE_BUCKET")]
    pub create_bucket: bool,

    /// Files of this size or larger are uploaded in parts; smaller ones in one request.
    /// Accepts B, KiB, MiB, GiB (and K, M, G alike).
    #[arg(long, value_name = "SIZE", env = "LOCALSHIP_MULTIPART_THRESHOLD", default_value = "16MiB", value_parser = parse_size)]
    pub multipart_threshold: u64,

    /// Logs larger than this are not shipped: a warning, and `skipped_total{reason="too_large"}`.
    /// A log with more than 1 MiB of holes (bytes never written, e.g. `truncate -s 4T`) is
    /// refused the same way (`reason="sparse"`), before a byte of it is read.
    #[arg(long, value_name = "SIZE", env = "LOCALSHIP_MAX_FILE_SIZE", default_value = "4GiB", value_parser = parse_size)]
    pub max_file_size: u64,

    /// Size of each part of a multipart upload (at least 5MiB, grown for files that would
    /// need more than 10,000 parts).
    #[arg(long, value_name = "SIZE", env = "LOCALSHIP_PART_SIZE", default_value = "8MiB", value_parser = parse_size)]
    pub part_size: u64,

    /// Files shipped at once, and requests carrying data at once over all of them. Memory
    /// for uploads stays below this many times the larger of --part-size and
    /// --multipart-threshold.
    #[arg(
        long,
        value_name = "N",
        env = "LOCALSHIP_UPLOAD_CONCURRENCY",
        default_value_t = 4
    )]
    pub upload_concurrency: usize,

    /// Where `/metrics`, `/healthz` and `/readyz` listen. Default 0.0.0.0:9102 in daemon
    /// mode; with --once only when given.
    #[arg(long, value_name = "ADDR", env = "LOCALSHIP_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// Kubernetes mode: ship the logs in this node's localship volumes that opt in (see
    /// --opt-in-annotation), each volume's directory being an Airflow log folder, and hold a
    /// deleted volume until every log in it is shipped. The API client comes from KUBECONFIG
    /// or the pod's service account. --source is not used.
    #[arg(long, value_name = "NODE", env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// Kubernetes mode: the annotation on a PersistentVolumeClaim (or parameter or annotation
    /// on its StorageClass; the claim's wins) that opts its volume in. Its value must name
    /// the volume's destination: --dest, e.g. `s3://airflow/logs`; with `{namespace}` in
    /// --dest, either --dest as written or rendered with the claim's namespace
    /// (`s3://airflow/logs/team-a`). A volume naming another is reported in an Event and
    /// not shipped.
    #[arg(long, value_name = "NAME", env = "LOCALSHIP_OPT_IN_ANNOTATION", default_value = DEFAULT_OPT_IN_ANNOTATION)]
    pub opt_in_annotation: String,

    /// Log output: `text` for people, `json` for log collectors.
    #[arg(long, value_enum, env = "LOCALSHIP_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Toggle {
    On,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl Args {
    /// How to ship beside Airflow's own uploads, when they happen (S3 destinations only).
    pub fn alongside(&self) -> Option<crate::ship::Alongside> {
        let s3 = matches!(self.dest, DestinationUrl::S3 { .. });
        if !s3 || self.airflow_remote_logging == Toggle::Off {
            return None;
        }
        let host = self.node_name.clone().unwrap_or_else(|| {
            nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        Some(crate::ship::Alongside { host })
    }

    /// Checks what clap cannot: the combinations.
    pub fn validate(&self) -> Result<()> {
        if self.upload_concurrency == 0 {
            return Err(Error::Config(
                "--upload-concurrency must be at least 1".into(),
            ));
        }
        if matches!(self.dest, DestinationUrl::S3 { .. }) && self.part_size < MIN_PART_SIZE {
            return Err(Error::Config(
                "--part-size must be at least 5MiB, the smallest part S3 accepts".into(),
            ));
        }
        if self.rescan.is_zero() {
            return Err(Error::Config("--rescan must be longer than zero".into()));
        }
        if self.dest.per_namespace() && self.node_name.is_none() {
            return Err(Error::Config(format!(
                "--dest {} holds {{namespace}}, which only Kubernetes mode (--node-name) fills \
                 in from each volume's claim; give the prefix itself, e.g. {}",
                self.dest,
                self.dest.render("airflow").expect("a DNS label")
            )));
        }
        if let Some(node) = &self.node_name {
            if node.is_empty() {
                return Err(Error::Config(
                    "--node-name (NODE_NAME) is empty; set it from spec.nodeName".into(),
                ));
            }
            if self.once {
                return Err(Error::Config(
                    "--once cannot be used with --node-name: volumes are watched until deleted"
                        .into(),
                ));
            }
            if self.opt_in_annotation.is_empty() {
                return Err(Error::Config("--opt-in-annotation is empty".into()));
            }
        }
        Ok(())
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        match (self.metrics_addr, self.once) {
            (Some(addr), _) => Some(addr),
            (None, true) => None,
            (None, false) => Some(DEFAULT_METRICS_ADDR.parse().expect("a valid address")),
        }
    }
}

/// `16MiB`, `8M`, `512KiB`, `1GiB`, `1000` (bytes).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size such as 16MiB"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{text}`; use B, KiB, MiB or GiB"
            ))
        }
    };
    number
        .checked_mul(scale)
        .ok_or_else(|| format!("`{text}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn defaults() {
        let args = Args::try_parse_from(["localship-logshipper"]).unwrap();
        assert_eq!(args.sources, vec![PathBuf::from("./logs")]);
        assert_eq!(
            args.dest,
            DestinationUrl::File {
                dir: "./shipped-logs".into()
            }
        );
        assert_eq!(args.settle, Duration::from_secs(5));
        assert_eq!(args.include, DEFAULT_INCLUDE);
        assert_eq!(args.multipart_threshold, 16 << 20);
        assert_eq!(args.part_size, 8 << 20);
        assert_eq!(args.upload_concurrency, 4);
        assert_eq!(
            args.metrics_addr(),
            Some(DEFAULT_METRICS_ADDR.parse().unwrap())
        );
        args.validate().unwrap();
    }

    #[test]
    fn once_serves_metrics_only_when_asked() {
        let args = Args::try_parse_from(["x", "--once"]).unwrap();
        assert_eq!(args.metrics_addr(), None);
        let args =
            Args::try_parse_from(["x", "--once", "--metrics-addr", "127.0.0.1:9999"]).unwrap();
        assert_eq!(args.metrics_addr(), Some("127.0.0.1:9999".parse().unwrap()));
    }

    #[test]
    fn flags_parse() {
        let args = Args::try_parse_from([
            "x",
            "--source",
            "/a",
            "--source",
            "/b",
            "--dest",
            "s3://airflow/logs",
            "--settle",
            "2m",
            "--include",
            "scheduler/**/*.log",
            "--delete-after",
            "7d",
            "--part-size",
            "5MiB",
        ])
        .unwrap();
        assert_eq!(args.sources, vec![PathBuf::from("/a"), PathBuf::from("/b")]);
        assert_eq!(args.settle, Duration::from_secs(120));
        assert_eq!(args.include, vec!["scheduler/**/*.log".to_string()]);
        assert_eq!(args.delete_after, Some(Duration::from_secs(7 * 86_400)));
        args.validate().unwrap();
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(Args::try_parse_from(["x", "--dest", "ftp://x"]).is_err());
        assert!(Args::try_parse_from(["x", "--settle", "soon"]).is_err());
        let args =
            Args::try_parse_from(["x", "--dest", "s3://airflow", "--part-size", "1MiB"]).unwrap();
        assert!(args.validate().unwrap_err().to_string().contains("5MiB"));
        let args = Args::try_parse_from(["x", "--upload-concurrency", "0"]).unwrap();
        assert!(args.validate().is_err());
        let args = Args::try_parse_from(["x", "--node-name", "a", "--once"]).unwrap();
        assert!(args.validate().unwrap_err().to_string().contains("--once"));
        let args = Args::try_parse_from(["x", "--node-name", ""]).unwrap();
        assert!(args
            .validate()
            .unwrap_err()
            .to_string()
            .contains("NODE_NAME"));
    }

    #[test]
    fn kubernetes_mode() {
        let args = Args::try_parse_from(["x"]).unwrap();
        assert_eq!(args.opt_in_annotation, "localship.io/ship-to");
        let args = Args::try_parse_from(["x", "--node-name", "node-a"]).unwrap();
        assert_eq!(args.node_name.as_deref(), Some("node-a"));
        args.validate().unwrap();
    }

    #[test]
    fn a_destination_per_namespace_needs_kubernetes_mode() {
        let per_namespace = ["x", "--dest", "s3://airflow/logs/{namespace}"];
        let args = Args::try_parse_from(per_namespace).unwrap();
        let err = args.validate().unwrap_err().to_string();
        assert!(err.contains("--node-name"), "{err}");
        assert!(err.contains("e.g. s3://airflow/logs/airflow"), "{err}");
        let args = Args::try_parse_from([&per_namespace[..], &["--node-name", "node-a"]].concat())
            .unwrap();
        args.validate().unwrap();
        let misspelt = ["x", "--dest", "s3://airflow/logs/{namepsace}"];
        assert!(Args::try_parse_from(misspelt).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("8M"), Ok(8 << 20));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
    }
}
