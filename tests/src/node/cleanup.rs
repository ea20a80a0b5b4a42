//! Ending a node: its processes stopped, its directory removed only once
//! nothing is mounted under it, its logs kept; and the same for a run that
//! was killed before it could clean up.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::host::{self, HostState};
use crate::process::Process;

/// Copies the node's logs to a scratch directory of this process's, which
/// outlives the node's own, and says where.
pub(super) fn keep_logs(dir: &Path) {
    let Ok(keep) = crate::scratch_dir("node-logs") else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "log") {
            let _ = std::fs::copy(&path, keep.join(entry.file_name()));
        }
    }
    eprintln!(
        "node: logs of containerd, the kubelet and kube-proxy kept in {}",
        keep.display()
    );
}

pub(super) fn state_file(dir: &Path) -> PathBuf {
    dir.join("host-state.json")
}

/// One real node per machine at a time: it owns fixed links and paths.
pub(super) fn lock_machine(dir: &Path) -> Result<nix::fcntl::Flock<File>> {
    let path = dir.with_extension("lock");
    let file = File::create(&path).with_context(|| format!("create {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        anyhow::anyhow!(
            "another test process runs a real node on this machine ({}: {e})",
            path.display()
        )
    })
}

/// Undoes what a run that died without its teardown left: its processes,
/// mounts and host changes.
pub(super) fn recover_previous_run(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    eprintln!(
        "node: putting back what an earlier run left in {}",
        dir.display()
    );
    stop_node_processes(dir, None)?;
    match HostState::load(&state_file(dir)) {
        Ok(host) => host.restore(dir)?,
        Err(e) => eprintln!(
            "node: no host record from the earlier run ({e:#}); removing its directory only"
        ),
    }
    remove_node_dir(dir)
}

/// Stops containerd (gracefully, so it stops its tasks' shims), then kills
/// any process still naming the node's directory: shims, containerd, a
/// kubelet or kube-proxy of an earlier run.
pub(super) fn stop_node_processes(dir: &Path, containerd: Option<Process>) -> Result<()> {
    if let Some(mut containerd) = containerd {
        containerd.stop(Duration::from_secs(10));
    }
    let needle = dir.display().to_string();
    let me = std::process::id();
    for _ in 0..50 {
        let mut found = 0;
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if pid == me {
                continue;
            }
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            if String::from_utf8_lossy(&cmdline).contains(&needle) {
                found += 1;
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        if found == 0 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("processes naming {} survive SIGKILL", dir.display())
}

/// Removes the node's directory once nothing is mounted under it: a mount
/// left there (a local volume's bind mount) would let removal reach into
/// the volume.
pub(super) fn remove_node_dir(dir: &Path) -> Result<()> {
    host::unmount_under(dir)?;
    if let Some(left) = host::mounts()?
        .into_iter()
        .find(|m| m.point.starts_with(dir))
    {
        bail!(
            "still mounted under {}: {}",
            dir.display(),
            left.point.display()
        );
    }
    std::fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))
}
