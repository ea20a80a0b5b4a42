//! Command line and environment of `localship-provisioner`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::annotations::{DEFAULT_PROVISIONER_NAME, RANCHER_PROVISIONER_NAME, SHIP_TO};

/// Node-local provisioner for WaitForFirstConsumer PersistentVolumeClaims.
///
/// Runs on every node (a DaemonSet). Each agent serves only the claims the
/// scheduler placed on its own node: it makes the volume's directory under the
/// node's base path, creates a hostPath or local PersistentVolume pinned to the
/// node, and removes the directory when a `Delete` volume is released. There is
/// no leader and no helper pod.
#[derive(Debug, Clone, Parser)]
#[command(name = "localship-provisioner", version, about, long_about)]
pub struct Args {
    /// This node's name, as the scheduler writes it into
    /// `volume.kubernetes.io/selected-node` (set it from the downward API:
    /// `spec.nodeName`).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    /// Provisioner name served; StorageClasses name it in `provisioner:`.
    #[arg(long, env = "LOCALSHIP_PROVISIONER_NAME", default_value = DEFAULT_PROVISIONER_NAME)]
    pub provisioner_name: String,

    /// Also serve rancher's `rancher.io/local-path`, so classes made for
    /// local-path-provisioner keep working after migrating.
    #[arg(long, env = "LOCALSHIP_SERVE_RANCHER")]
    pub serve_rancher: bool,

    /// rancher-compatible `config.json` (nodePathMap, storageClassConfigs).
    /// Re-read when it changes, e.g. on a ConfigMap update. Without it every
    /// node uses --base-path.
    #[arg(long, env = "LOCALSHIP_CONFIG")]
    pub config: Option<PathBuf>,

    /// Base path for volumes when no --config is given.
    #[arg(
        long,
        env = "LOCALSHIP_BASE_PATH",
        default_value = "/opt/local-path-provisioner"
    )]
    pub base_path: PathBuf,

    /// How often to check --config for changes.
    #[arg(long, env = "LOCALSHIP_CONFIG_POLL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub config_poll: Duration,

    /// Permissions of new volume directories (octal). 0777, as rancher does, lets
    /// pods running as any user write to them.
    #[arg(long, env = "LOCALSHIP_DIR_MODE", default_value = "0777", value_parser = parse_mode)]
    pub dir_mode: u32,

    /// Bytes to keep free on every base path: a claim that would leave less is
    /// handed back to the scheduler. Accepts quantities such as 10Gi.
    #[arg(long, env = "LOCALSHIP_RESERVE", default_value = "0", value_parser = parse_quantity)]
    pub reserve: u64,

    /// The log shipper's opt-in annotation (its --opt-in-annotation). A claim that carries
    /// it, or whose StorageClass has it as a parameter or annotation, gets a PV that the
    /// shipper holds from the moment it is made. Empty: never held.
    #[arg(long, value_name = "NAME", env = "LOCALSHIP_OPT_IN_ANNOTATION", default_value = SHIP_TO)]
    pub opt_in_annotation: String,

    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "LOCALSHIP_LISTEN", default_value = "0.0.0.0:9101")]
    pub listen: SocketAddr,

    /// Log format.
    #[arg(long, env = "LOCALSHIP_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl Args {
    /// Provisioner names this agent answers to.
    pub fn names(&self) -> Vec<String> {
        let mut names = vec![self.provisioner_name.clone()];
        if self.serve_rancher && self.provisioner_name != RANCHER_PROVISIONER_NAME {
            names.push(RANCHER_PROVISIONER_NAME.to_string());
        }
        names
    }
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("`{s}` is not an octal mode such as 0777 or 0755"))
}

fn parse_quantity(s: &str) -> Result<u64, String> {
    crate::quantity::parse_bytes(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_names() {
        let a = Args::try_parse_from(["p", "--node-name", "n1"]).unwrap();
        assert_eq!(a.names(), vec!["localship.io/local-path".to_string()]);
        assert_eq!(a.dir_mode, 0o777);
        let b = Args::try_parse_from([
            "p",
            "--node-name",
            "n1",
            "--serve-rancher",
            "--reserve",
            "1Gi",
        ])
        .unwrap();
        assert_eq!(b.names().len(), 2);
        assert_eq!(b.reserve, 1 << 30);
        assert!(Args::try_parse_from(["p", "--node-name", "n", "--dir-mode", "999"]).is_err());
    }
}
