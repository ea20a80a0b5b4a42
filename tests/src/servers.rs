//! Locates (building once, if needed) the real server binaries and this
//! workspace's own release binaries.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace root")
        .to_path_buf()
}

/// Directory holding etcd, kube-apiserver, kube-controller-manager,
/// kube-scheduler, kubectl, minio and mc. Runs `tests/servers/build.sh`
/// (a no-op when its cache is warm) once per process; `LOCALSHIP_SERVERS_BIN`
/// overrides it.
pub fn server_bin_dir() -> Result<PathBuf> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| locate_servers().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn locate_servers() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("LOCALSHIP_SERVERS_BIN") {
        return Ok(PathBuf::from(dir));
    }
    run_setup_script(
        &workspace_root().join("tests/servers/build.sh"),
        "building the test servers",
    )
}

/// Runs one of the harness's idempotent setup scripts and returns the path it
/// prints on its last stdout line; a failure carries the script's stderr.
pub(crate) fn run_setup_script(script: &Path, what: &str) -> Result<PathBuf> {
    run_setup_script_with(script, &[], what)
}

/// [`run_setup_script`] with arguments.
pub(crate) fn run_setup_script_with(script: &Path, args: &[&str], what: &str) -> Result<PathBuf> {
    let out = Command::new("bash")
        .arg(script)
        .args(args)
        .output()
        .with_context(|| format!("run {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}); rerun `bash {} {}` to see why:\n{}",
            out.status,
            script.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8(out.stdout)?;
    let line = stdout
        .lines()
        .last()
        .with_context(|| format!("{} printed no path", script.display()))?;
    Ok(PathBuf::from(line.trim()))
}

/// The `helm` CLI the chart tests run, built by `tests/servers/helm/build.sh`
/// (its own Go module and cache, apart from the servers') once per process;
/// `LOCALSHIP_HELM_BIN` overrides it.
pub fn helm_bin() -> Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| locate_helm().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn locate_helm() -> Result<PathBuf> {
    let path = match std::env::var("LOCALSHIP_HELM_BIN") {
        Ok(path) => PathBuf::from(path),
        Err(_) => run_setup_script(
            &workspace_root().join("tests/servers/helm/build.sh"),
            "building helm",
        )?
        .join("helm"),
    };
    if !path.is_file() {
        bail!(
            "{} is missing: run tests/servers/helm/build.sh",
            path.display()
        );
    }
    Ok(path)
}

/// Path of a real server binary such as `kube-apiserver` or `minio`.
pub fn server_bin(name: &str) -> Result<PathBuf> {
    let path = server_bin_dir()?.join(name);
    if !path.is_file() {
        bail!("{} is missing: run tests/servers/build.sh", path.display());
    }
    Ok(path)
}

/// Path of one of this workspace's binaries: the release build, which `make test` builds
/// first, unless LOCALSHIP_PROFILE names another (`dist`, the image's build).
pub fn localship_bin(name: &str) -> Result<PathBuf> {
    let profile = std::env::var("LOCALSHIP_PROFILE").unwrap_or_else(|_| "release".into());
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join(&profile);
    let path = dir.join(name);
    if !path.is_file() {
        let build = match profile.as_str() {
            "release" => "`cargo build --release --locked --bins` (`make test` does)".to_owned(),
            "dist" => "`make dist`".to_owned(),
            other => format!("`cargo build --profile {other} --locked --bins`"),
        };
        bail!("{} is missing: run {build} first", path.display());
    }
    Ok(path)
}
