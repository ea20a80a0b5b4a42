//! The host state a real node changes, recorded before it starts and put back
//! after it stops, so the next run on the same machine starts from the same
//! place. The record is a file in the node's directory: a run killed before
//! its teardown is undone by the next run's start.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Kernel settings the kubelet, kube-proxy and the CNI bridge plugin write.
const SYSCTLS: &[&str] = &[
    "vm/overcommit_memory",
    "kernel/panic",
    "kernel/panic_on_oops",
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/route_localnet",
    "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables",
];

/// Paths outside the node's directory that the kubelet, containerd and the
/// CNI plugins create at fixed places, and those the installed DaemonSet's
/// hostPath volumes create; each is removed at the end if it was not there.
const FIXED_PATHS: &[&str] = &[
    "/var/lib/kubelet",
    "/var/log/containers",
    "/var/log/pods",
    "/var/lib/cni",
    "/run/containerd",
    "/opt/containerd",
    "/usr/libexec/kubernetes",
    "/opt/local-path-provisioner",
    "/var/lib/localship",
];

/// Tables kube-proxy and the kubelet write rules into.
const TABLES: &[&str] = &["filter", "nat", "mangle"];

/// cgroup v1 hierarchies live under here; pods go under `kubepods` in each.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

#[derive(Debug, Serialize, Deserialize)]
pub struct HostState {
    sysctls: BTreeMap<String, String>,
    /// `iptables-save` / `ip6tables-save` output per tool; None where the
    /// tool is missing.
    iptables: BTreeMap<String, Option<String>>,
    absent_paths: Vec<String>,
    absent_cgroups: Vec<String>,
    /// Links the node creates, removed at the end.
    links: Vec<String>,
    /// Mount points that were not shared before the node made every mount
    /// shared, with whether each was a slave.
    unshared_mounts: Vec<(String, bool)>,
}

impl HostState {
    /// Records what the node may change. `links` are the network links it
    /// will create (none may exist yet).
    pub fn record(links: &[&str]) -> Result<Self> {
        let mut sysctls = BTreeMap::new();
        for name in SYSCTLS {
            if let Ok(value) = std::fs::read_to_string(sysctl_path(name)) {
                sysctls.insert(name.to_string(), value.trim().to_string());
            }
        }
        let mut iptables = BTreeMap::new();
        for tool in ["iptables", "ip6tables"] {
            iptables.insert(tool.to_string(), save_tables(tool)?);
        }
        let absent_paths = FIXED_PATHS
            .iter()
            .filter(|p| !Path::new(p).exists())
            .map(|p| p.to_string())
            .collect();
        let absent_cgroups = kubepods_cgroups()
            .into_iter()
            .filter(|p| !p.exists())
            .map(|p| p.display().to_string())
            .collect();
        for link in links {
            if Path::new("/sys/class/net").join(link).exists() {
                bail!("network link {link} already exists: another real node runs on this machine, or one was left behind (`ip link del {link}`)");
            }
        }
        Ok(Self {
            sysctls,
            iptables,
            absent_paths,
            absent_cgroups,
            links: links.iter().map(|l| l.to_string()).collect(),
            unshared_mounts: unshared_mounts()?,
        })
    }

    /// Makes every mount shared, as systemd leaves a node's: the kubelet
    /// and the runtime need it for `mountPropagation`.
    pub fn share_mounts(&self) -> Result<()> {
        nix::mount::mount(
            None::<&str>,
            "/",
            None::<&str>,
            nix::mount::MsFlags::MS_SHARED | nix::mount::MsFlags::MS_REC,
            None::<&str>,
        )
        .context("make / rshared")
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        std::fs::write(path, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("write {}", path.display()))
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("parse {}", path.display()))
    }

    /// Puts the host back: kills what still runs in pod cgroups, unmounts
    /// everything under `node_dir`, removes links, cgroups and paths the node
    /// made, and restores sysctls and iptables. Goes on past errors and
    /// reports them all at the end.
    pub fn restore(&self, node_dir: &Path) -> Result<()> {
        let mut errors = Vec::new();
        let mut note = |what: &str, r: Result<()>| {
            if let Err(e) = r {
                errors.push(format!("{what}: {e:#}"));
            }
        };
        note("kill pod processes", kill_pod_processes());
        note("unmount", unmount_under(node_dir));
        for link in &self.links {
            note(&format!("remove link {link}"), remove_link(link));
        }
        for cgroup in self.absent_cgroups.iter().rev() {
            note(
                &format!("remove cgroup {cgroup}"),
                remove_cgroup_tree(Path::new(cgroup)),
            );
        }
        for path in &self.absent_paths {
            note(
                &format!("unmount under {path}"),
                unmount_under(Path::new(path)),
            );
            if Path::new(path).exists() {
                note(
                    &format!("remove {path}"),
                    std::fs::remove_dir_all(path).map_err(Into::into),
                );
            }
        }
        for (tool, saved) in &self.iptables {
            if let Some(saved) = saved {
                note(&format!("restore {tool}"), restore_tables(tool, saved));
            }
        }
        for (point, slave) in &self.unshared_mounts {
            let flag = if *slave {
                nix::mount::MsFlags::MS_SLAVE
            } else {
                nix::mount::MsFlags::MS_PRIVATE
            };
            let r = nix::mount::mount(
                None::<&str>,
                point.as_str(),
                None::<&str>,
                flag,
                None::<&str>,
            );
            // A mount the node's run removed is gone: nothing to put back.
            let r = match r {
                Err(nix::errno::Errno::ENOENT | nix::errno::Errno::EINVAL) => Ok(()),
                r => r.map_err(anyhow::Error::from),
            };
            note(&format!("propagation of {point}"), r);
        }
        for (name, value) in &self.sysctls {
            note(
                &format!("sysctl {name}"),
                write_sysctl(name, value).map_err(Into::into),
            );
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!(
                "the host was not fully put back:\n  {}",
                errors.join("\n  ")
            )
        }
    }
}

/// One line of /proc/self/mountinfo: where it is mounted and how it
/// propagates.
#[derive(Debug, PartialEq)]
pub struct Mount {
    pub point: PathBuf,
    pub shared: bool,
    pub slave: bool,
}

/// This process's mounts, in mountinfo's order.
pub fn mounts() -> Result<Vec<Mount>> {
    Ok(parse_mounts(&std::fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

fn parse_mounts(mountinfo: &str) -> Vec<Mount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let point = unescape_mount_path(fields.get(4)?);
            let tags: Vec<&&str> = fields.get(6..)?.iter().take_while(|f| **f != "-").collect();
            Some(Mount {
                point,
                shared: tags.iter().any(|t| t.starts_with("shared:")),
                slave: tags.iter().any(|t| t.starts_with("master:")),
            })
        })
        .collect()
}

/// Mount points that are not shared, and whether each is a slave.
fn unshared_mounts() -> Result<Vec<(String, bool)>> {
    Ok(mounts()?
        .into_iter()
        .filter(|m| !m.shared)
        .map(|m| (m.point.display().to_string(), m.slave))
        .collect())
}

fn sysctl_path(name: &str) -> PathBuf {
    Path::new("/proc/sys").join(name)
}

fn write_sysctl(name: &str, value: &str) -> std::io::Result<()> {
    let path = sysctl_path(name);
    if std::fs::read_to_string(&path)?.trim() == value {
        return Ok(());
    }
    std::fs::write(path, value)
}

fn save_tables(tool: &str) -> Result<Option<String>> {
    let save = format!("{tool}-save");
    let out = match Command::new(&save).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("run {save}")),
    };
    if !out.status.success() {
        bail!("{save}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(Some(String::from_utf8(out.stdout)?))
}

/// Replaces the tables kube-proxy touches with what `saved` held; a table
/// that did not exist comes back empty, with the built-in chains accepting.
fn restore_tables(tool: &str, saved: &str) -> Result<()> {
    let input = restore_input(saved);
    let restore = format!("{tool}-restore");
    let mut child = Command::new(&restore)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("run {restore}"))?;
    use std::io::Write;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{restore}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// The `*-restore` input for [`TABLES`]: each table's saved section, or an
/// empty one with its built-in chains.
fn restore_input(saved: &str) -> String {
    let mut sections: BTreeMap<&str, String> = BTreeMap::new();
    let mut current: Option<&str> = None;
    for line in saved.lines() {
        if let Some(table) = line.strip_prefix('*') {
            current = Some(table);
            sections.insert(table, String::new());
        }
        if let Some(table) = current {
            let section = sections.get_mut(table).expect("section exists");
            section.push_str(line);
            section.push('\n');
            if line == "COMMIT" {
                current = None;
            }
        }
    }
    let mut input = String::new();
    for table in TABLES {
        match sections.get(table) {
            Some(section) => input.push_str(section),
            None => {
                input.push_str(&format!("*{table}\n"));
                for chain in builtin_chains(table) {
                    input.push_str(&format!(":{chain} ACCEPT [0:0]\n"));
                }
                input.push_str("COMMIT\n");
            }
        }
    }
    input
}

fn builtin_chains(table: &str) -> &'static [&'static str] {
    match table {
        "filter" => &["INPUT", "FORWARD", "OUTPUT"],
        "nat" => &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
        _ => &["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"],
    }
}

/// `<hierarchy>/kubepods` of every mounted cgroup hierarchy.
fn kubepods_cgroups() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(CGROUP_ROOT) else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path().join("kubepods"))
        .collect();
    dirs.sort();
    dirs
}

/// SIGKILL to every process in a pod cgroup: containers whose shims outlived
/// a containerd that was killed.
fn kill_pod_processes() -> Result<()> {
    for _ in 0..50 {
        let mut pids = Vec::new();
        for root in kubepods_cgroups() {
            collect_pids(&root, &mut pids);
        }
        if pids.is_empty() {
            return Ok(());
        }
        for pid in &pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    bail!("processes in kubepods cgroups survive SIGKILL")
}

fn collect_pids(dir: &Path, pids: &mut Vec<i32>) {
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                collect_pids(&entry.path(), pids);
            }
        }
    }
}

/// Removes a cgroup and its children, deepest first (cgroupfs only lets
/// empty directories go, with rmdir).
fn remove_cgroup_tree(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)?.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&entry.path())?;
        }
    }
    std::fs::remove_dir(dir).with_context(|| format!("rmdir {}", dir.display()))
}

/// Detaches every mount at or below `dir`, deepest first.
pub fn unmount_under(dir: &Path) -> Result<()> {
    let mut points: Vec<PathBuf> = mounts()?
        .into_iter()
        .map(|m| m.point)
        .filter(|p| p.starts_with(dir))
        .collect();
    // Stacked mounts appear once each; deepest paths first.
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for point in points {
        match nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => bail!("umount {}: {e}", point.display()),
        }
    }
    Ok(())
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(digits, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

fn remove_link(name: &str) -> Result<()> {
    if !Path::new("/sys/class/net").join(name).exists() {
        return Ok(());
    }
    let out = Command::new("ip").args(["link", "del", name]).output()?;
    if !out.status.success() {
        bail!(
            "ip link del {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_input_keeps_saved_tables_and_empties_new_ones() {
        let saved = "# Generated\n*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\nCOMMIT\n# Completed\n";
        let input = restore_input(saved);
        assert!(input.starts_with("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP"));
        assert!(input.contains("-A INPUT -j ACCEPT\nCOMMIT\n*nat\n:PREROUTING ACCEPT [0:0]\n"));
        assert!(input.contains("*mangle\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n"));
        assert!(!input.contains("# Generated"));
    }

    #[test]
    fn mounts_are_parsed_with_their_propagation() {
        let info = "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
                    28 27 0:5 / /dev rw shared:2 - devtmpfs udev rw\n\
                    29 27 0:6 / /mnt\\040x rw master:3 - tmpfs t rw\n";
        let mount = |point: &str, shared, slave| Mount {
            point: PathBuf::from(point),
            shared,
            slave,
        };
        assert_eq!(
            parse_mounts(info),
            [
                mount("/", false, false),
                mount("/dev", true, false),
                mount("/mnt x", false, true)
            ]
        );
    }

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(
            unescape_mount_path(r"/var/lib/a\040b\134c"),
            PathBuf::from(r"/var/lib/a b\c")
        );
        assert_eq!(unescape_mount_path("/plain"), PathBuf::from("/plain"));
    }
}
