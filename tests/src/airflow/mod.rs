//! Airflow's own S3 log reader, run from a pinned venv (`tests/airflow/`), so
//! tests can prove the Airflow UI finds and shows what localship uploaded.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::Minio;

mod standalone;
pub use standalone::{DagRun, Standalone};

/// What Airflow's reader returned for one relative log path.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AirflowRead {
    /// Every `s3://` key that starts with `<remote base>/<path>`, sorted: the
    /// log itself and any `.trigger.<id>.log` siblings.
    pub keys: Vec<String>,
    /// The text of each key, in the order of `keys` (for a key it could not
    /// read, Airflow's error message, as the UI shows it); `None` when Airflow
    /// found no key at all.
    pub content: Option<Vec<String>>,
}

pub(crate) fn airflow_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("airflow")
}

/// The Airflow majors users run, each pinned in a lock of its own under `tests/airflow/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Airflow {
    /// Airflow 2.10.5 with the amazon provider 9.17.0.
    V2,
    /// Airflow 3.3.2 with the amazon provider 9.39.0.
    V3,
}

impl Airflow {
    pub const ALL: [Airflow; 2] = [Airflow::V2, Airflow::V3];

    fn lock(self) -> &'static str {
        match self {
            Airflow::V2 => "requirements-2.10.lock",
            Airflow::V3 => "requirements.lock",
        }
    }
}

/// The python of the venv holding the pinned Airflow 3. Runs `tests/airflow/setup.sh` (a
/// no-op when its cache is warm) once per process.
pub fn airflow_python() -> Result<PathBuf> {
    python_of(Airflow::V3)
}

/// The python of the venv holding `version`, installed as [`airflow_python`] does.
pub fn python_of(version: Airflow) -> Result<PathBuf> {
    static PYTHONS: OnceLock<[OnceLock<Result<PathBuf, String>>; 2]> = OnceLock::new();
    let slots = PYTHONS.get_or_init(Default::default);
    slots[version as usize]
        .get_or_init(|| install(version).map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn install(version: Airflow) -> Result<PathBuf> {
    crate::servers::run_setup_script_with(
        &airflow_dir().join("setup.sh"),
        &[version.lock()],
        &format!("installing Airflow ({version:?}) for the tests"),
    )
}

/// Reads each of `relative_paths` (relative to `remote_base`, an
/// `s3://bucket/prefix` URL) from `minio` the way the Airflow UI does.
/// Blocks for a few seconds; async tests should call it in `spawn_blocking`.
pub fn read_with_airflow(
    minio: &Minio,
    remote_base: &str,
    relative_paths: &[&str],
) -> Result<BTreeMap<String, AirflowRead>> {
    read_with(Airflow::V3, minio, remote_base, relative_paths)
}

/// [`read_with_airflow`] with the reader of `version`.
pub fn read_with(
    version: Airflow,
    minio: &Minio,
    remote_base: &str,
    relative_paths: &[&str],
) -> Result<BTreeMap<String, AirflowRead>> {
    let endpoint = minio.endpoint();
    let mut args = vec!["--endpoint", &endpoint, "--remote-base", remote_base];
    args.extend(relative_paths);
    let out = run_script(
        version,
        "read_logs.py",
        &args,
        minio,
        "Airflow's log reader",
    )?;
    let reads: BTreeMap<String, AirflowRead> =
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "read_logs.py printed no JSON result: {}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    if let Some(missing) = relative_paths.iter().find(|p| !reads.contains_key(**p)) {
        bail!("read_logs.py returned nothing for {missing}: {reads:?}");
    }
    Ok(reads)
}

/// Uploads `relative` (under `base_log_folder`) to `remote_base` at `endpoint` with `minio`'s
/// credentials and Airflow's own upload code, as a worker does when a try ends or defers:
/// the whole file appended to what the key holds; with `delete_local_copy`, the log's folder
/// removed after. Airflow swallows a failed upload, as it does on a worker.
/// Blocks for a few seconds; async tests should call it in `spawn_blocking`.
pub fn upload_with_airflow(
    version: Airflow,
    minio: &Minio,
    endpoint: &str,
    remote_base: &str,
    base_log_folder: &std::path::Path,
    relative: &str,
    delete_local_copy: bool,
) -> Result<()> {
    let folder = base_log_folder.display().to_string();
    let mut args = vec![
        "--endpoint",
        endpoint,
        "--remote-base",
        remote_base,
        "--base-log-folder",
        &folder,
    ];
    if delete_local_copy {
        args.push("--delete-local-copy");
    }
    args.push(relative);
    run_script(
        version,
        "upload_log.py",
        &args,
        minio,
        "Airflow's log upload",
    )?;
    Ok(())
}

/// Runs `script` of `tests/airflow/` with `version`'s python and `minio`'s credentials; fails
/// with its stderr, naming it `what`, unless it exits 0.
fn run_script(
    version: Airflow,
    script: &str,
    args: &[&str],
    minio: &Minio,
    what: &str,
) -> Result<std::process::Output> {
    let python = python_of(version)?;
    let script = airflow_dir().join(script);
    let out = Command::new(&python)
        .arg(&script)
        .args(args)
        // A developer's session or profile must not leak into MinIO's keys.
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .envs(minio.aws_env())
        .output()
        .with_context(|| format!("run {} {}", python.display(), script.display()))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}
