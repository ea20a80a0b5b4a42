//! The three images a real node runs, built offline with umoci and imported
//! into containerd: the pod sandbox (`pause`), `busybox` for test pods, and
//! localship itself, assembled from the release binaries to the runtime
//! layout the repository's Dockerfile declares.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{bail, Context, Result};

use super::dockerfile::{parse_runtime_stage, RuntimeStage, DOCKERFILE};
use crate::servers::localship_bin;

/// The sandbox image; containerd's CRI `sandbox_image` must name it.
pub const PAUSE_IMAGE: &str = "localhost/pause:3.10";
pub const BUSYBOX_IMAGE: &str = "localhost/busybox:1.35";
/// Not `latest`, so the kubelet's default pull policy is IfNotPresent and it
/// never tries a registry.
pub const LOCALSHIP_IMAGE: &str = "localhost/localship:e2e";

const PAUSE_C: &str = include_str!("pause.c");
const BUSYBOX: &str = "/bin/busybox";
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const CA_CERTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Image references as the kubelet will ask for them, e.g. "localhost/localship:e2e".
#[derive(Debug, Clone)]
pub struct Images {
    pub pause: String,
    pub busybox: String,
    pub localship: String,
}

/// Builds the three images in `work` (a scratch dir) and imports them into the
/// containerd at `address` (its socket), namespace k8s.io.
pub fn build_and_import(address: &Path, work: &Path) -> Result<Images> {
    let stage = parse_runtime_stage(DOCKERFILE).context("reading the Dockerfile's final stage")?;
    let pause_config = args(&["--config.user=65535", "--config.entrypoint=/pause"]);
    let busybox_config = args(&["--config.env", PATH_ENV, "--config.cmd=sh"]);
    let built = std::thread::scope(|s| {
        let pause = s.spawn(|| build(work, PAUSE_IMAGE, &pause_config, |r| pause(r, work)));
        let busybox = s.spawn(|| build(work, BUSYBOX_IMAGE, &busybox_config, busybox));
        let localship = build(work, LOCALSHIP_IMAGE, &localship_config(&stage), |r| {
            localship(r, &stage)
        });
        [pause.join(), busybox.join(), Ok(localship)]
    });
    for (result, image) in built
        .into_iter()
        .zip([PAUSE_IMAGE, BUSYBOX_IMAGE, LOCALSHIP_IMAGE])
    {
        let archive = result.expect("image build panicked")?;
        import(address, image, &archive)?;
    }
    Ok(Images {
        pause: PAUSE_IMAGE.into(),
        busybox: BUSYBOX_IMAGE.into(),
        localship: LOCALSHIP_IMAGE.into(),
    })
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|a| a.to_string()).collect()
}

/// An OCI layout holding one image, filled by `fill(rootfs)`, tarred for `ctr`.
fn build(
    work: &Path,
    image: &str,
    config: &[String],
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let (name, tag) = split_ref(image);
    let dir = work.join(name.rsplit('/').next().unwrap_or(name));
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("clear {}", dir.display()))?;
    }
    fs::create_dir_all(&dir)?;
    let path = dir
        .to_str()
        .context("the work directory's path is not UTF-8")?;
    let (layout, bundle) = (format!("{path}/oci"), format!("{path}/bundle"));
    let tagged = format!("{layout}:{tag}");
    umoci(&["init", "--layout", &layout])?;
    umoci(&["new", "--image", &tagged])?;
    umoci(&["unpack", "--image", &tagged, &bundle])?;
    fill(&dir.join("bundle/rootfs")).with_context(|| format!("fill the {image} image"))?;
    umoci(&["repack", "--image", &tagged, &bundle])?;
    let config: Vec<&str> = config.iter().map(String::as_str).collect();
    umoci(&[&["config", "--image", &tagged], &config[..]].concat())?;
    let archive = dir.join(format!("{tag}.tar"));
    run(Command::new("tar")
        .args(["-C", &layout, "-cf"])
        .arg(&archive)
        .arg("."))?;
    Ok(archive)
}

/// `ctr` names the import `<base-name>:<the layout's ref.name annotation>`,
/// which umoci sets to the tag; checked afterwards, as the kubelet asks by name.
fn import(address: &Path, image: &str, archive: &Path) -> Result<()> {
    let images = || {
        let mut cmd = super::ctr_command(address);
        cmd.arg("images");
        cmd
    };
    let (name, _) = split_ref(image);
    run(images().args(["import", "--base-name", name]).arg(archive))?;
    let listed = String::from_utf8_lossy(&run(images().args(["ls", "-q"]))?.stdout).into_owned();
    if !listed.lines().any(|l| l == image) {
        bail!(
            "ctr imported {} but containerd lists no {image}:\n{listed}",
            archive.display()
        );
    }
    Ok(())
}

fn umoci(args: &[&str]) -> Result<()> {
    run(Command::new("umoci").args(args)).map(drop)
}

fn split_ref(image: &str) -> (&str, &str) {
    image.rsplit_once(':').expect("image constants carry a tag")
}

/// Runs a tool to completion; its stderr is the error, and a missing tool
/// says which package provides it.
fn run(cmd: &mut Command) -> Result<Output> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd.output().map_err(|e| super::missing_tool(&program, e))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(out)
}

fn pause(rootfs: &Path, work: &Path) -> Result<()> {
    let source = work.join("pause.c");
    fs::write(&source, PAUSE_C)?;
    run(Command::new("cc")
        .args(["-static", "-O2", "-s", "-o"])
        .arg(rootfs.join("pause"))
        .arg(&source))?;
    Ok(())
}

/// `busybox --install -s /bin`, done from outside the image.
fn busybox(rootfs: &Path) -> Result<()> {
    if !shared_libraries(Path::new(BUSYBOX))?.is_empty() {
        bail!("{BUSYBOX} is dynamically linked: apt-get install busybox-static");
    }
    let bin = rootfs.join("bin");
    fs::create_dir_all(&bin)?;
    fs::copy(BUSYBOX, bin.join("busybox"))?;
    let list = run(Command::new(BUSYBOX).arg("--list"))?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && !applet.contains('/') {
            symlink("busybox", bin.join(applet))?;
        }
    }
    fs::create_dir_all(rootfs.join("root"))?;
    write_etc(rootfs, "root:x:0:0:root:/root:/bin/sh\n", "root:x:0:\n")?;
    make_tmp(rootfs)
}

/// distroless/cc's contents, as far as the binaries can tell: the shared
/// libraries they load, CA certificates and the nonroot user; no shell.
fn localship(rootfs: &Path, stage: &RuntimeStage) -> Result<()> {
    let mut libraries = BTreeSet::new();
    for copied in &stage.copies {
        let source = localship_bin(&copied.name)?;
        libraries.extend(shared_libraries(&source)?);
        let dest = rootfs.join(copied.path.trim_start_matches('/'));
        fs::create_dir_all(dest.parent().context("COPY destination is a directory")?)?;
        // As profile.dist ships them, and a fifth of the release build's size to pack.
        run(Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&dest)
            .arg(&source))?;
        fs::set_permissions(&dest, fs::Permissions::from_mode(0o755))?;
    }
    for library in libraries {
        copy_host_path(rootfs, &library)?;
    }
    if Path::new(CA_CERTS).exists() {
        copy_host_path(rootfs, Path::new(CA_CERTS))?;
    }
    write_etc(
        rootfs,
        "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n",
        "root:x:0:\nnonroot:x:65532:\n",
    )?;
    fs::write(
        rootfs.join("etc/nsswitch.conf"),
        "passwd: files\ngroup: files\nhosts: files dns\n",
    )?;
    let home = rootfs.join("home/nonroot");
    fs::create_dir_all(&home)?;
    std::os::unix::fs::chown(&home, Some(65532), Some(65532))?;
    make_tmp(rootfs)
}

/// The base image's config (distroless's env and working directory) and
/// then what the Dockerfile's final stage sets.
fn localship_config(stage: &RuntimeStage) -> Vec<String> {
    let mut config = args(&[
        "--config.env",
        PATH_ENV,
        "--config.env",
        &format!("SSL_CERT_FILE={CA_CERTS}"),
        "--config.workingdir=/home/nonroot",
    ]);
    if let Some(user) = &stage.user {
        config.push(format!("--config.user={user}"));
    }
    for arg in &stage.entrypoint {
        config.extend(["--config.entrypoint".into(), arg.clone()]);
    }
    for (key, value) in &stage.labels {
        config.extend(["--config.label".into(), format!("{key}={value}")]);
    }
    config
}

fn write_etc(rootfs: &Path, passwd: &str, group: &str) -> Result<()> {
    fs::create_dir_all(rootfs.join("etc"))?;
    fs::write(rootfs.join("etc/passwd"), passwd)?;
    fs::write(rootfs.join("etc/group"), group)?;
    Ok(())
}

fn make_tmp(rootfs: &Path) -> Result<()> {
    let tmp = rootfs.join("tmp");
    fs::create_dir_all(&tmp)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777))?;
    Ok(())
}

/// The shared libraries and loader `ldd` resolves for `binary`; none for a
/// static one.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("run ldd: apt-get install libc-bin")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("not a dynamic executable") {
        return Ok(Vec::new());
    }
    if !out.status.success() {
        bail!(
            "ldd {} failed ({}):\n{stderr}",
            binary.display(),
            out.status
        );
    }
    parse_ldd(&String::from_utf8_lossy(&out.stdout))
        .with_context(|| format!("ldd {}", binary.display()))
}

fn parse_ldd(output: &str) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for line in output.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let resolved = match line.split_once("=>") {
            Some((name, target)) if target.trim().starts_with("not found") => {
                bail!("{} is not installed on this host", name.trim())
            }
            Some((_, target)) => target.trim(),
            None => line,
        };
        let path = resolved.split(" (").next().unwrap_or_default().trim();
        // The vDSO has no file; everything else is an absolute path.
        if path.starts_with('/') {
            paths.push(PathBuf::from(path));
        }
    }
    Ok(paths)
}

/// Copies a host file to the same path under `rootfs`, recreating each
/// symlink met on the way (e.g. /lib64 -> usr/lib64) so the path resolves in
/// the image as on the host.
fn copy_host_path(rootfs: &Path, path: &Path) -> Result<()> {
    copy_path(Path::new("/"), rootfs, path)
}

/// `path` as seen from `root` (absolute links resolve against it), copied
/// under `rootfs`. Only real directories are ever written through, so a link
/// can never lead a write out of `rootfs`.
fn copy_path(root: &Path, rootfs: &Path, path: &Path) -> Result<()> {
    let mut pending = names(path);
    pending.reverse();
    let mut current = PathBuf::new();
    let mut links = 0;
    while let Some(name) = pending.pop() {
        if name == ".." {
            current.pop();
            continue;
        }
        let next = current.join(&name);
        let (source, dest) = (root.join(&next), rootfs.join(&next));
        let meta =
            fs::symlink_metadata(&source).with_context(|| format!("stat {}", source.display()))?;
        if meta.file_type().is_symlink() {
            links += 1;
            if links > 40 {
                bail!("too many symlinks resolving {}", path.display());
            }
            let target = fs::read_link(&source)?;
            if fs::symlink_metadata(&dest).is_err() {
                symlink(&target, &dest)?;
            }
            if target.is_absolute() {
                current = PathBuf::new();
            }
            pending.extend(names(&target).into_iter().rev());
        } else if meta.is_dir() {
            if !dest.is_dir() {
                fs::create_dir(&dest).with_context(|| format!("create {}", dest.display()))?;
            }
            current = next;
        } else if pending.is_empty() {
            fs::copy(&source, &dest).with_context(|| format!("copy {}", source.display()))?;
        } else {
            bail!("{} is not a directory", source.display());
        }
    }
    Ok(())
}

fn names(path: &Path) -> Vec<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn parses_ldd_output() {
        let output = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                      \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f1)\n\
                      \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2)\n\
                      \t/lib64/ld-linux-x86-64.so.2 (0x00007f3)\n";
        assert_eq!(
            parse_ldd(output).unwrap(),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        let missing = parse_ldd("\tlibssl.so.3 => not found\n")
            .unwrap_err()
            .to_string();
        assert!(missing.contains("libssl.so.3"), "{missing}");
    }

    #[test]
    fn copies_paths_through_their_symlinks() {
        // Debian's merged /usr, and its loader's absolute link.
        let host = tempfile::tempdir().unwrap();
        let h = host.path();
        fs::create_dir_all(h.join("usr/lib/x86_64-linux-gnu")).unwrap();
        fs::create_dir_all(h.join("usr/lib64")).unwrap();
        fs::write(h.join("usr/lib/x86_64-linux-gnu/ld.so"), "loader").unwrap();
        symlink("usr/lib", h.join("lib")).unwrap();
        symlink("usr/lib64", h.join("lib64")).unwrap();
        symlink("/lib/x86_64-linux-gnu/ld.so", h.join("usr/lib64/ld.so")).unwrap();
        let image = tempfile::tempdir().unwrap();
        copy_path(h, image.path(), Path::new("/lib64/ld.so")).unwrap();

        let i = image.path();
        assert_eq!(
            fs::read_link(i.join("lib64")).unwrap(),
            Path::new("usr/lib64")
        );
        assert_eq!(fs::read_link(i.join("lib")).unwrap(), Path::new("usr/lib"));
        assert_eq!(
            fs::read_link(i.join("usr/lib64/ld.so")).unwrap(),
            Path::new("/lib/x86_64-linux-gnu/ld.so")
        );
        let loader = fs::read_to_string(i.join("usr/lib/x86_64-linux-gnu/ld.so")).unwrap();
        assert_eq!(loader, "loader");
        // Resolved from inside the image, the path reaches the same file.
        let again = tempfile::tempdir().unwrap();
        copy_path(i, again.path(), Path::new("/lib64/ld.so")).unwrap();
        let copied = again.path().join("usr/lib/x86_64-linux-gnu/ld.so");
        assert_eq!(fs::read_to_string(copied).unwrap(), "loader");
    }
}
