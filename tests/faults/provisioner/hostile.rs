//! Hostile inputs, one table row each with the outcome it must have. After
//! every row the agents must still be running and serving, nothing outside
//! the base paths may have changed (a canary tree is compared entry by entry),
//! and no path a row tried to reach may exist.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use k8s_openapi::api::core::v1::{Event, PersistentVolume, PersistentVolumeClaim};
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use localship_tests::claims::{
    claim_events, create_claim, create_claim_with_pod, create_pod, delete_claim_and_pod, host_path,
    phase, provisioner_name, storage_class, volume_dirs, wait_bound, wait_pv_gone,
};
use localship_tests::{control_plane, scratch_dir, wait_for, ProvisionerAgent};
use serde_json::json;

use crate::report::Tally;

const EVENT_TIMEOUT: Duration = Duration::from_secs(60);

pub async fn hostile_inputs() -> Result<Tally> {
    let mut fx = Fixture::start().await?;

    let r = long_names(&fx).await;
    fx.settle(
        "253-char claim in a 63-char namespace",
        "binds, one component under the base path",
        r,
    );

    let escape = fx.agents[0].dir().join("dotdot");
    fx.must_not_exist.push(escape.clone());
    let r = refused(
        &fx,
        "dotdot",
        r#"pathPattern: "../{{ .PVC.Name }}""#,
        json!({}),
        &["`..`"],
    )
    .await;
    fx.settle("pathPattern with `..`", "ProvisioningFailed naming `..`", r);

    let absolute = fx.outside.join("absolute");
    fx.must_not_exist.push(absolute.join("abs"));
    let pattern = format!(
        r#"pathPattern: "{}/{{{{ .PVC.Name }}}}""#,
        absolute.display()
    );
    let r = refused(&fx, "abs", &pattern, json!({}), &["absolute"]).await;
    fx.settle("absolute pathPattern", "ProvisioningFailed: absolute", r);

    let r = refused(
        &fx,
        "broken",
        r#"pathPattern: "x/{{ .PVC.Name""#,
        json!({}),
        &["closing `}}`"],
    )
    .await;
    fx.settle(
        "pathPattern with an unclosed `{{`",
        "ProvisioningFailed: no closing `}}`",
        r,
    );

    let team = json!({ "team": ".." });
    let pattern = r#"pathPattern: "{{ .PVC.Annotations.team }}/{{ .PVC.Name }}""#;
    let r = refused(&fx, "ann-dotdot", pattern, team, &["`..`"]).await;
    fx.settle(
        "annotation value `..` in pathPattern",
        "ProvisioningFailed naming `..`",
        r,
    );

    fx.must_not_exist.push(fx.agents[0].dir().join("escape"));
    fx.must_not_exist
        .push(fx.agents[0].dir().parent().unwrap().join("escape"));
    let r = slash_in_annotation(&fx).await;
    fx.settle(
        "annotation value `../../escape` in pathPattern",
        "binds; the `/` stays inside one component",
        r,
    );

    let r = links_inside(&fx).await;
    fx.settle(
        "symlinks and a hard link planted in a volume, then Delete",
        "volume removed, every outside target intact",
        r,
    );

    let r = recreated_while_held(&fx).await;
    fx.settle(
        "claim recreated under the same pathPattern directory while the old PV is held",
        "ProvisioningFailed naming the old PV; binds to a fresh directory once it is gone, whose data survives",
        r,
    );

    let r = bind_mount_inside(&fx).await;
    fx.settle(
        "bind mount of an outside directory (same filesystem) inside a volume, then Delete",
        "VolumeFailedDelete naming the mount point, its source intact; removed once unmounted",
        r,
    );

    let r = nested_deep(&fx).await;
    fx.settle(
        "3000 nested directories in a volume, then Delete",
        "volume removed",
        r,
    );

    let r = forged_base_path(&fx).await;
    fx.settle(
        "PV for node-a forged with an unconfigured base path, then deleted",
        "VolumeFailedDelete: not one of this node's base paths; nothing removed",
        r,
    );

    let r = forged_affinity(&fx).await;
    fx.settle(
        "PV claiming node-a but pinned to node-b, then deleted",
        "VolumeNotOwned; nothing removed",
        r,
    );

    let r = swapped_before_delete(&mut fx).await;
    fx.settle(
        "volume directory replaced by a symlink, then Delete",
        "VolumeFailedDelete, the symlink is not followed",
        r,
    );

    let r = planted_before_provisioning(&fx).await;
    fx.settle(
        "symlink planted at the volume path before provisioning",
        "ProvisioningFailed, not followed; binds once it is gone",
        r,
    );

    fx.must_not_exist
        .push(std::env::current_dir()?.join("relative-base"));
    let bad_configs = [
        ("config.json that is not JSON", "{ \"nodePathMap\": [ "),
        (
            "config.json with an unknown key",
            r#"{"nodePathMap":[{"node":"DEFAULT_PATH_FOR_NON_LISTED_NODES","paths":["/tmp"]}],"nodePathMapp":[]}"#,
        ),
        (
            "config.json with a relative base path",
            r#"{"nodePathMap":[{"node":"DEFAULT_PATH_FOR_NON_LISTED_NODES","paths":["relative-base"]}]}"#,
        ),
    ];
    for (i, (name, text)) in bad_configs.into_iter().enumerate() {
        let r = bad_config(&fx, i as u64 + 1, text).await;
        fx.settle(
            name,
            "rejected, the old config kept, a claim still binds",
            r,
        );
    }

    let r = too_big(&fx).await;
    fx.settle(
        "claim too big for any node",
        "ProvisioningFailed with the free space",
        r,
    );

    let r = match fx.stuck_pv.take() {
        Some(pv) => wait_pv_gone(&fx.client, &pv)
            .await
            .map(|()| format!("{pv} deleted")),
        None => Err(anyhow::anyhow!("no PV was left by the symlink row")),
    };
    fx.settle(
        "the refused volume, once its symlink is removed",
        "its PV is deleted on the next retry",
        r,
    );
    Ok(fx.tally)
}

/// The namespace, agents, classes and canaries every row shares.
struct Fixture {
    client: Client,
    ns: String,
    class: String,
    prov: String,
    /// node-a, node-b, then the agent with a config file (node-a, its own name).
    agents: Vec<ProvisionerAgent>,
    config: PathBuf,
    config_base: PathBuf,
    config_class: String,
    /// A tree outside every base path that rows point links at.
    outside: PathBuf,
    canaries: BTreeMap<PathBuf, String>,
    must_not_exist: Vec<PathBuf>,
    stuck_pv: Option<String>,
    tally: Tally,
}

impl Fixture {
    async fn start() -> Result<Self> {
        let cp = control_plane()?;
        let client = cp.client().await?;
        let ns = cp.namespace("faults-hostile").await?;
        let prov = provisioner_name(&ns);
        let mut agents = Vec::new();
        for node in localship_tests::NODES {
            agents.push(ProvisionerAgent::start(cp, node, &prov, &[]).await?);
        }
        let class = format!("{ns}-local");
        storage_class(&client, &class, &prov, "Delete", "").await?;

        let dir = scratch_dir("hostile")?;
        let (config, config_base) = (dir.join("config.json"), dir.join("config-base"));
        std::fs::write(
            &config,
            json!({ "nodePathMap": [{ "node": "DEFAULT_PATH_FOR_NON_LISTED_NODES", "paths": [config_base] }] })
                .to_string(),
        )?;
        let config_prov = format!("config.{prov}");
        let args = [
            format!("--config={}", config.display()),
            "--config-poll=200ms".to_string(),
        ];
        agents.push(ProvisionerAgent::start(cp, "node-a", &config_prov, &args).await?);
        let config_class = format!("{ns}-config");
        storage_class(&client, &config_class, &config_prov, "Delete", "").await?;

        let outside = dir.join("outside");
        for d in [
            "dir/sub",
            "swap-target",
            "pre-target",
            "bind-source",
            "forged",
        ] {
            std::fs::create_dir_all(outside.join(d))?;
        }
        std::fs::write(outside.join("dir/precious"), "must survive")?;
        std::fs::write(outside.join("dir/sub/deeper"), "also must survive")?;
        std::fs::write(
            outside.join("hard-target"),
            "hard-linked, must keep its content",
        )?;
        std::fs::write(
            outside.join("swap-target/canary"),
            "behind a swapped volume",
        )?;
        std::fs::write(
            outside.join("pre-target/canary"),
            "behind a planted symlink",
        )?;
        std::fs::write(
            outside.join("bind-source/canary"),
            "bind-mounted into a volume",
        )?;
        std::fs::write(outside.join("forged/canary"), "named by a forged PV")?;
        let canaries = snapshot(&outside)?;
        Ok(Self {
            client,
            ns,
            class,
            prov,
            agents,
            config,
            config_base,
            config_class,
            outside,
            canaries,
            must_not_exist: Vec::new(),
            stuck_pv: None,
            tally: Tally::default(),
        })
    }

    /// Records one row and checks what must hold after every row.
    fn settle(&mut self, name: &str, expect: &str, result: Result<String>) {
        self.tally.rounds += 1;
        self.tally.faults += 1;
        self.tally.checked += 1;
        match result {
            Ok(seen) => eprintln!("faults: ok   | {name} | expected: {expect} | observed: {seen}"),
            Err(e) => {
                self.tally.lost += 1;
                eprintln!("faults: LOST | {name} | expected: {expect} | {e:#}");
            }
        }
        for problem in self.after_row() {
            self.tally.lost += 1;
            eprintln!("faults: LOST | {name} | {problem}");
        }
    }

    fn after_row(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        for agent in &mut self.agents {
            if let Err(e) = agent.check_running() {
                problems.push(format!("agent died: {e:#}"));
            } else if let Err(e) = agent.metrics() {
                problems.push(format!("agent on {} stopped serving: {e:#}", agent.node));
            }
        }
        match snapshot(&self.outside) {
            Ok(now) if now == self.canaries => {}
            Ok(now) => problems.push(format!(
                "outside the base path changed: was {:?}, now {now:?}",
                self.canaries
            )),
            Err(e) => problems.push(format!("cannot read the outside tree: {e:#}")),
        }
        for path in &self.must_not_exist {
            if path.symlink_metadata().is_ok() {
                problems.push(format!("{} exists", path.display()));
            }
        }
        problems
    }

    fn base_a(&self) -> PathBuf {
        self.agents[0].base_path()
    }

    /// A claim of the default class with a pod on node-a, bound.
    async fn bound_on_a(&self, claim: &str) -> Result<PersistentVolume> {
        create_claim_with_pod(
            &self.client,
            &self.ns,
            claim,
            &self.class,
            "64Mi",
            Some("node-a"),
            json!({}),
        )
        .await?;
        wait_bound(&self.client, &self.ns, claim).await
    }
}

/// Every entry of a tree, not following symlinks: files with their content,
/// symlinks with their target.
fn snapshot(root: &Path) -> Result<BTreeMap<PathBuf, String>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            let meta = path.symlink_metadata()?;
            let what = if meta.is_symlink() {
                format!("symlink to {}", std::fs::read_link(&path)?.display())
            } else if meta.is_dir() {
                todo.push(path.clone());
                "dir".to_string()
            } else {
                format!("file {:?}", std::fs::read_to_string(&path)?)
            };
            out.insert(path.strip_prefix(root)?.to_path_buf(), what);
        }
    }
    Ok(out)
}

/// Waits for an Event with `reason` on the object named `name`, in any
/// namespace (a PV's Events land in `default`), and returns its message.
async fn wait_event(client: &Client, name: &str, reason: &str) -> Result<String> {
    let events = Api::<Event>::all(client.clone());
    wait_for(
        &format!("a {reason} Event on {name}"),
        EVENT_TIMEOUT,
        || async {
            Ok(events
                .list(&ListParams::default())
                .await?
                .into_iter()
                .find(|e| {
                    e.involved_object.name.as_deref() == Some(name)
                        && e.reason.as_deref() == Some(reason)
                })
                .map(|e| e.message.unwrap_or_default()))
        },
    )
    .await
}

async fn long_names(fx: &Fixture) -> Result<String> {
    let cp = control_plane()?;
    let ns = cp.namespace(&format!("hostile-{}", "n".repeat(46))).await?;
    ensure!(ns.len() == 63, "namespace {ns} is {} characters", ns.len());
    let claim = "c".repeat(253);
    create_claim_with_pod(
        &fx.client,
        &ns,
        &claim,
        &fx.class,
        "64Mi",
        Some("node-a"),
        json!({}),
    )
    .await?;
    let pv = wait_bound(&fx.client, &ns, &claim).await?;
    let path = PathBuf::from(host_path(&pv));
    ensure!(
        path.parent() == Some(fx.base_a().as_path()),
        "{} is not directly under the base path",
        path.display()
    );
    ensure!(path.is_dir(), "{} is not a directory", path.display());
    let component = path.file_name().map(|n| n.len()).unwrap_or_default();
    ensure!(component <= 255, "component is {component} bytes");
    Ok(format!(
        "bound at a {component}-byte directory under the base path"
    ))
}

/// A claim of a class with `params`, on node-a: it must get a
/// ProvisioningFailed Event containing each of `words`, stay Pending, and
/// leave no directory.
async fn refused(
    fx: &Fixture,
    claim: &str,
    params: &str,
    annotations: serde_json::Value,
    words: &[&str],
) -> Result<String> {
    let class = format!("{}-{claim}", fx.ns);
    storage_class(&fx.client, &class, &fx.prov, "Delete", params).await?;
    let before = volume_dirs(&fx.base_a()).len();
    create_claim_with_pod(
        &fx.client,
        &fx.ns,
        claim,
        &class,
        "64Mi",
        Some("node-a"),
        annotations,
    )
    .await?;
    let message = wait_event(&fx.client, claim, "ProvisioningFailed").await?;
    for word in words {
        ensure!(
            message.contains(word),
            "the message lacks {word:?}: {message}"
        );
    }
    let pvc = Api::<PersistentVolumeClaim>::namespaced(fx.client.clone(), &fx.ns)
        .get(claim)
        .await?;
    ensure!(phase(&pvc) == "Pending", "claim is {}", phase(&pvc));
    let after = volume_dirs(&fx.base_a()).len();
    ensure!(
        after == before,
        "the base path gained {} entries",
        after - before
    );
    Ok(message)
}

async fn slash_in_annotation(fx: &Fixture) -> Result<String> {
    let class = format!("{}-ann-slash", fx.ns);
    let pattern = r#"pathPattern: "{{ .PVC.Annotations.team }}/{{ .PVC.Name }}""#;
    storage_class(&fx.client, &class, &fx.prov, "Delete", pattern).await?;
    let team = json!({ "team": "../../escape" });
    create_claim_with_pod(
        &fx.client,
        &fx.ns,
        "ann-slash",
        &class,
        "64Mi",
        Some("node-a"),
        team,
    )
    .await?;
    let pv = wait_bound(&fx.client, &fx.ns, "ann-slash").await?;
    let path = PathBuf::from(host_path(&pv));
    let want = fx.base_a().join(".._.._escape/ann-slash");
    ensure!(
        path == want,
        "bound at {}, expected {}",
        path.display(),
        want.display()
    );
    ensure!(path.is_dir());
    Ok(format!("bound at {}", path.display()))
}

async fn links_inside(fx: &Fixture) -> Result<String> {
    let pv = fx.bound_on_a("planted").await?;
    let vol = PathBuf::from(host_path(&pv));
    let out = &fx.outside;
    std::fs::create_dir_all(vol.join("sub/deeper"))?;
    std::fs::write(vol.join("sub/deeper/attempt=1.log"), "log")?;
    std::os::unix::fs::symlink(out.join("dir"), vol.join("escape"))?;
    std::os::unix::fs::symlink("/", vol.join("root"))?;
    std::os::unix::fs::symlink(out.join("dir/precious"), vol.join("sub/file-link"))?;
    std::os::unix::fs::symlink("../../../../..", vol.join("sub/deeper/up"))?;
    std::fs::hard_link(out.join("hard-target"), vol.join("sub/hard"))?;
    delete_claim_and_pod(&fx.client, &fx.ns, "planted").await?;
    wait_pv_gone(&fx.client, &pv.name_any()).await?;
    ensure!(
        vol.symlink_metadata().is_err(),
        "{} still exists",
        vol.display()
    );
    use std::os::unix::fs::MetadataExt;
    let links = out.join("hard-target").metadata()?.nlink();
    ensure!(links == 1, "hard-target has {links} links");
    Ok(format!(
        "{} removed; 4 symlinks and a hard link unlinked, targets intact",
        vol.display()
    ))
}

/// A StatefulSet's claim deleted while its PV is held (logs still
/// shipping), then recreated: with `{{ .PVC.Namespace }}/{{ .PVC.Name }}`
/// both map to one directory, which the old PV's removal would empty under
/// the new pod.
async fn recreated_while_held(fx: &Fixture) -> Result<String> {
    let class = format!("{}-sts", fx.ns);
    let pattern = r#"pathPattern: "{{ .PVC.Namespace }}/{{ .PVC.Name }}""#;
    storage_class(&fx.client, &class, &fx.prov, "Delete", pattern).await?;
    let claim = "data-sts-0";
    let make = || {
        create_claim_with_pod(
            &fx.client,
            &fx.ns,
            claim,
            &class,
            "64Mi",
            Some("node-a"),
            json!({}),
        )
    };
    make().await?;
    let old = wait_bound(&fx.client, &fx.ns, claim).await?;
    let dir = PathBuf::from(host_path(&old));
    std::fs::write(dir.join("old"), "the old pod's")?;
    // Held as the log shipper holds a volume it is still draining.
    let pvs = Api::<PersistentVolume>::all(fx.client.clone());
    let hold =
        json!({ "metadata": { "finalizers": ["localship.io/cleanup", "localship.io/ship-logs"] } });
    pvs.patch(
        &old.name_any(),
        &Default::default(),
        &kube::api::Patch::Merge(hold),
    )
    .await?;
    delete_claim_and_pod(&fx.client, &fx.ns, claim).await?;
    let pvcs = Api::<PersistentVolumeClaim>::namespaced(fx.client.clone(), &fx.ns);
    wait_for("the old claim to be gone", EVENT_TIMEOUT, || async {
        Ok(pvcs.get_opt(claim).await?.is_none().then_some(()))
    })
    .await?;
    make().await?;
    let message = wait_event(&fx.client, claim, "ProvisioningFailed").await?;
    ensure!(message.contains(&old.name_any()), "{message}");
    ensure!(
        phase(&pvcs.get(claim).await?) == "Pending",
        "the new claim bound to the held directory"
    );
    // The shipper lets go: the old volume and its directory go, then the
    // new claim gets a directory of its own.
    let release = json!({ "metadata": { "finalizers": ["localship.io/cleanup"] } });
    pvs.patch(
        &old.name_any(),
        &Default::default(),
        &kube::api::Patch::Merge(release),
    )
    .await?;
    wait_pv_gone(&fx.client, &old.name_any()).await?;
    let new = wait_bound(&fx.client, &fx.ns, claim).await?;
    ensure!(
        Path::new(&host_path(&new)) == dir,
        "not the pattern's directory"
    );
    ensure!(
        !dir.join("old").exists(),
        "the new volume holds the old one's data"
    );
    std::fs::write(dir.join("new"), "the new pod's")?;
    // Nothing of the old volume is left to act on the new one's directory.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    ensure!(dir.join("new").exists(), "the new pod's data was removed");
    delete_claim_and_pod(&fx.client, &fx.ns, claim).await?;
    wait_pv_gone(&fx.client, &new.name_any()).await?;
    Ok(message)
}

/// `mount --bind` (needs root, as a node's agent has).
fn mount_command(args: &[&str]) -> Result<()> {
    let out = std::process::Command::new("mount").args(args).output()?;
    ensure!(
        out.status.success(),
        "mount {}: {} (the fault suite runs as root)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

async fn bind_mount_inside(fx: &Fixture) -> Result<String> {
    let pv = fx.bound_on_a("bound-mount").await?;
    let vol = PathBuf::from(host_path(&pv));
    let point = vol.join("sub/mnt");
    std::fs::create_dir_all(&point)?;
    std::fs::write(vol.join("sub/log"), "removable")?;
    let source = fx.outside.join("bind-source");
    mount_command(&[
        "--bind",
        &source.display().to_string(),
        &point.display().to_string(),
    ])?;
    let result = async {
        delete_claim_and_pod(&fx.client, &fx.ns, "bound-mount").await?;
        let message = wait_event(&fx.client, &pv.name_any(), "VolumeFailedDelete").await?;
        ensure!(message.contains("mount point"), "{message}");
        let kept = Api::<PersistentVolume>::all(fx.client.clone())
            .get_opt(&pv.name_any())
            .await?;
        ensure!(kept.is_some(), "the PV went though its directory was kept");
        Ok(message)
    }
    .await;
    mount_command(&["-u", &point.display().to_string()]).or_else(|_| {
        nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH).map_err(anyhow::Error::from)
    })?;
    let message = result?;
    // Unmounted: the next retry (every 30 s) removes it.
    wait_pv_gone(&fx.client, &pv.name_any()).await?;
    ensure!(
        vol.symlink_metadata().is_err(),
        "{} still exists",
        vol.display()
    );
    Ok(format!("{message} (removed once unmounted)"))
}

async fn nested_deep(fx: &Fixture) -> Result<String> {
    use std::os::fd::AsFd;
    let pv = fx.bound_on_a("nested").await?;
    let vol = PathBuf::from(host_path(&pv));
    // Deeper than PATH_MAX by name: made one level at a time, as a pod could.
    let mut dir = std::fs::File::open(&vol)?;
    for _ in 0..3000 {
        nix::sys::stat::mkdirat(
            dir.as_fd(),
            "d",
            nix::sys::stat::Mode::from_bits_truncate(0o700),
        )?;
        let fd = nix::fcntl::openat(
            dir.as_fd(),
            "d",
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY,
            nix::sys::stat::Mode::empty(),
        )?;
        dir = std::fs::File::from(fd);
    }
    drop(dir);
    delete_claim_and_pod(&fx.client, &fx.ns, "nested").await?;
    wait_pv_gone(&fx.client, &pv.name_any()).await?;
    ensure!(
        vol.symlink_metadata().is_err(),
        "{} still exists",
        vol.display()
    );
    Ok(format!("{} and 3000 levels removed", vol.display()))
}

/// A PV as another node's agent (or anyone who may write PVs) could make
/// it: provisioned by us, for node-a, with `edit` applied. Not yet deleted.
async fn forged_pv(
    fx: &Fixture,
    name: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> Result<()> {
    let target = fx.outside.join("forged");
    let mut pv = json!({
        "metadata": {
            "name": name,
            "annotations": {
                "pv.kubernetes.io/provisioned-by": fx.prov,
                "localship.io/node": "node-a",
                "localship.io/base-path": fx.outside,
                "localship.io/host-path": target,
            },
            "labels": { "localship.io/node": "node-a" },
        },
        "spec": {
            "capacity": { "storage": "1Gi" },
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Delete",
            "hostPath": { "path": target },
            "nodeAffinity": { "required": { "nodeSelectorTerms": [{ "matchExpressions": [{
                "key": "kubernetes.io/hostname", "operator": "In", "values": ["node-a"]
            }]}]}},
        }
    });
    edit(&mut pv);
    let pv: PersistentVolume = serde_json::from_value(pv)?;
    Api::<PersistentVolume>::all(fx.client.clone())
        .create(&Default::default(), &pv)
        .await?;
    Ok(())
}

async fn forged_base_path(fx: &Fixture) -> Result<String> {
    let name = format!("{}-forged-base", fx.ns);
    forged_pv(fx, &name, |_| {}).await?;
    // Consistent, so node-a's agent takes it on; then it is deleted.
    let pvs = Api::<PersistentVolume>::all(fx.client.clone());
    wait_for(
        "the agent's finalizer on the forged PV",
        EVENT_TIMEOUT,
        || async {
            let pv = pvs.get(&name).await?;
            Ok(pv
                .finalizers()
                .iter()
                .any(|f| f == "localship.io/cleanup")
                .then_some(()))
        },
    )
    .await?;
    pvs.delete(&name, &Default::default()).await?;
    let message = wait_event(&fx.client, &name, "VolumeFailedDelete").await?;
    ensure!(
        message.contains("not one of this node's base paths"),
        "{message}"
    );
    ensure!(
        fx.outside.join("forged/canary").exists(),
        "the forged target was emptied"
    );
    release(fx, &name).await?;
    Ok(message)
}

async fn forged_affinity(fx: &Fixture) -> Result<String> {
    let name = format!("{}-forged-node", fx.ns);
    forged_pv(fx, &name, |pv| {
        pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0]
            ["values"] = json!(["node-b"]);
    })
    .await?;
    let message = wait_event(&fx.client, &name, "VolumeNotOwned").await?;
    Api::<PersistentVolume>::all(fx.client.clone())
        .delete(&name, &Default::default())
        .await?;
    ensure!(
        fx.outside.join("forged/canary").exists(),
        "the forged target was emptied"
    );
    release(fx, &name).await?;
    Ok(message)
}

/// The administrator's way out for a refused PV: drop its finalizers.
async fn release(fx: &Fixture, name: &str) -> Result<()> {
    let pvs = Api::<PersistentVolume>::all(fx.client.clone());
    let patch = json!({ "metadata": { "finalizers": null } });
    match pvs
        .patch(name, &Default::default(), &kube::api::Patch::Merge(patch))
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    if let Err(e) = wait_pv_gone(&fx.client, name).await {
        let pv = pvs.get_opt(name).await?;
        let state = pv.map(|pv| serde_json::to_string(&pv.metadata).unwrap_or_default());
        anyhow::bail!("{e:#}; the PV: {state:?}");
    }
    Ok(())
}

async fn swapped_before_delete(fx: &mut Fixture) -> Result<String> {
    let pv = fx.bound_on_a("swapped").await?;
    let vol = PathBuf::from(host_path(&pv));
    std::fs::remove_dir(&vol)?;
    std::os::unix::fs::symlink(fx.outside.join("swap-target"), &vol)?;
    delete_claim_and_pod(&fx.client, &fx.ns, "swapped").await?;
    let message = wait_event(&fx.client, &pv.name_any(), "VolumeFailedDelete").await?;
    ensure!(message.contains("symlink"), "{message}");
    let kept = Api::<PersistentVolume>::all(fx.client.clone())
        .get_opt(&pv.name_any())
        .await?;
    ensure!(
        kept.is_some(),
        "the PV was deleted although its directory was not removed"
    );
    // The administrator's fix; the last row checks the agent then finishes.
    std::fs::remove_file(&vol)?;
    fx.stuck_pv = Some(pv.name_any());
    Ok(message)
}

async fn planted_before_provisioning(fx: &Fixture) -> Result<String> {
    let claim = "preplanted";
    let pvc = create_claim(&fx.client, &fx.ns, claim, &fx.class, "64Mi", json!({})).await?;
    let dir = format!("pvc-{}_{}_{claim}", pvc.uid().context("claim uid")?, fx.ns);
    let planted = fx.base_a().join(dir);
    std::os::unix::fs::symlink(fx.outside.join("pre-target"), &planted)?;
    create_pod(&fx.client, &fx.ns, claim, Some("node-a")).await?;
    let message = wait_event(&fx.client, claim, "ProvisioningFailed").await?;
    ensure!(message.contains("symlink"), "{message}");
    let pvc = Api::<PersistentVolumeClaim>::namespaced(fx.client.clone(), &fx.ns)
        .get(claim)
        .await?;
    ensure!(phase(&pvc) == "Pending", "claim is {}", phase(&pvc));
    std::fs::remove_file(&planted)?;
    let pv = wait_bound(&fx.client, &fx.ns, claim).await?;
    ensure!(PathBuf::from(host_path(&pv)) == planted);
    ensure!(
        planted.symlink_metadata()?.is_dir(),
        "{} is not a real directory",
        planted.display()
    );
    Ok(format!("{message} (bound once the symlink was removed)"))
}

/// Writes a broken config and checks the agent refuses it (the `n`th
/// refusal) and keeps provisioning under the old base path.
async fn bad_config(fx: &Fixture, n: u64, text: &str) -> Result<String> {
    std::fs::write(&fx.config, text)?;
    let agent = &fx.agents[2];
    wait_for(
        "the agent to refuse the config",
        Duration::from_secs(10),
        || async {
            let m = agent.metrics()?;
            Ok(
                m.contains(&format!(r#"config_reloads_total{{result="error"}} {n}"#))
                    .then_some(()),
            )
        },
    )
    .await?;
    let refusal = agent
        .log_tail(20)
        .lines()
        .rev()
        .find(|l| l.contains("rejected"))
        .map(plain)
        .unwrap_or_default();
    let claim = format!("after-bad-config-{n}");
    create_claim_with_pod(
        &fx.client,
        &fx.ns,
        &claim,
        &fx.config_class,
        "64Mi",
        Some("node-a"),
        json!({}),
    )
    .await?;
    let pv = wait_bound(&fx.client, &fx.ns, &claim).await?;
    let path = PathBuf::from(host_path(&pv));
    ensure!(
        path.parent() == Some(fx.config_base.as_path()),
        "bound at {}",
        path.display()
    );
    Ok(refusal)
}

async fn too_big(fx: &Fixture) -> Result<String> {
    create_claim_with_pod(
        &fx.client,
        &fx.ns,
        "huge",
        &fx.class,
        "1Pi",
        None,
        json!({}),
    )
    .await?;
    let found = wait_for("a not-enough-space Event", EVENT_TIMEOUT, || async {
        Ok(claim_events(&fx.client, &fx.ns, "huge")
            .await?
            .into_iter()
            .find(|(r, m)| r == "ProvisioningFailed" && m.contains("not enough space")))
    })
    .await;
    delete_claim_and_pod(&fx.client, &fx.ns, "huge").await?;
    let (_, message) = found?;
    ensure!(message.contains("free"), "{message}");
    Ok(message)
}

/// A log line without its terminal colours.
fn plain(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // Skip to the end of the `ESC [ ... m` sequence.
            chars.by_ref().find(|c| c.is_ascii_alphabetic());
        } else {
            out.push(c);
        }
    }
    out
}
