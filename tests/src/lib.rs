//! Real servers on loopback for localship's end-to-end tests and benchmarks:
//! etcd and the Kubernetes v1.32 control plane ([`cluster`]), MinIO
//! ([`minio`]), each built from its Go module by `tests/servers/build.sh` and
//! cached outside the repository; and one real node ([`node`]): containerd,
//! the kubelet and kube-proxy, running the images the harness builds.

pub mod agents;
pub mod airflow;
pub mod apply;
pub mod authority;
pub mod bench;
pub mod burst;
pub mod certs;
pub mod claims;
pub mod cluster;
pub mod kubeconfig;
pub mod minio;
pub mod node;
pub mod process;
pub mod relay;
pub mod servers;
pub mod shipper;
pub mod wait;

pub use agents::ProvisionerAgent;
pub use apply::apply_yaml;
pub use cluster::{control_plane, ControlPlane, NODES};
pub use minio::Minio;
pub use process::Process;
pub use shipper::ShipperAgent;
pub use wait::wait_for;

use std::path::PathBuf;
use std::sync::OnceLock;

/// A new directory for one server or test under this process's scratch root,
/// `$TMPDIR/localship-test-<pid>`. Roots left by earlier processes that are no
/// longer running are removed the first time this is called.
pub fn scratch_dir(name: &str) -> std::io::Result<PathBuf> {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    let root = ROOT.get_or_init(|| {
        let tmp = std::env::temp_dir();
        remove_stale_roots(&tmp);
        let root = tmp.join(format!("localship-test-{}", std::process::id()));
        std::fs::create_dir_all(&root).expect("create scratch root");
        root
    });
    let dir = tempfile::Builder::new()
        .prefix(&format!("{name}-"))
        .tempdir_in(root)?
        .keep();
    Ok(dir)
}

fn remove_stale_roots(tmp: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("localship-test-"))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        if !alive {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
