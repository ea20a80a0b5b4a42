//! What must hold after a burst of claims, whatever was killed or restarted
//! meanwhile: every claim Bound to exactly one PV, whose directory exists
//! under the base path of the node its pod was placed on, and no directory
//! without a PV; once everything is deleted, no PV and no directory left.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Result;
use futures::{stream, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, ListParams};
use kube::{Client, ResourceExt};
use localship_tests::claims::{
    affinity_node, create_claim_with_pod, host_path, phase, pod_name, pvs_in, wait_all_bound,
};
use localship_tests::{wait_for, ControlPlane, ProvisionerAgent, NODES};

use crate::report::Tally;

/// One agent per node, all answering to `provisioner`.
pub async fn start_agents(cp: &ControlPlane, provisioner: &str) -> Result<Vec<ProvisionerAgent>> {
    let mut agents = Vec::new();
    for node in NODES {
        agents.push(ProvisionerAgent::start(cp, node, provisioner, &[]).await?);
    }
    Ok(agents)
}

/// Creates `names` as claims of `class`, each with an unpinned pod, a few at
/// a time, the i-th no sooner than `i * pace` from now. With `retry_for`, a
/// failed create is retried until then (the apiserver may be down); without,
/// the first failure is returned. Returns how many creates were retried.
pub async fn burst(
    client: &Client,
    ns: &str,
    class: &str,
    names: &[String],
    pace: Duration,
    retry_for: Option<Duration>,
) -> Result<u64> {
    let retries = std::sync::atomic::AtomicU64::new(0);
    let start = tokio::time::Instant::now();
    stream::iter(names.iter().enumerate())
        .map(|(i, name)| {
            let retries = &retries;
            async move {
                tokio::time::sleep_until(start + pace * i as u32).await;
                let deadline = Instant::now() + retry_for.unwrap_or_default();
                loop {
                    match create_claim_with_pod(
                        client,
                        ns,
                        name,
                        class,
                        "64Mi",
                        None,
                        serde_json::json!({}),
                    )
                    .await
                    {
                        Ok(()) => return Ok(()),
                        Err(_) if Instant::now() < deadline => {
                            retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(250)).await;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        })
        .buffer_unordered(8)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(retries.into_inner())
}

/// Waits until `count` claims are Bound and every pod is placed on a node.
/// A timeout is not an error: what is still pending shows up in the audit.
pub async fn wait_settled(client: &Client, ns: &str, count: usize, timeout: Duration) {
    let start = Instant::now();
    if let Err(e) = wait_all_bound(client, ns, count, timeout).await {
        eprintln!("faults: {e:#}");
        return;
    }
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    let left = timeout
        .saturating_sub(start.elapsed())
        .max(Duration::from_secs(10));
    let placed = wait_for("every pod to be placed on a node", left, || async {
        let all = pods.list(&ListParams::default()).await?.items;
        Ok(all
            .iter()
            .all(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some())
            .then_some(()))
    })
    .await;
    if let Err(e) = placed {
        eprintln!("faults: {e:#}");
    }
}

/// Invariant violations found by [`audit`]; each counts as lost.
#[derive(Debug, Default)]
pub struct Findings {
    pub claims: usize,
    /// Claims with exactly one PV, its directory, and the pod on its node.
    pub verified: usize,
    pub pending: Vec<String>,
    /// PVs beyond the first for one claim.
    pub duplicates: usize,
    /// PVs whose claim does not exist.
    pub stray_pvs: Vec<String>,
    /// Directories under a base path that no PV points at.
    pub orphan_dirs: Vec<PathBuf>,
    /// PVs whose directory is not there.
    pub missing_dirs: Vec<PathBuf>,
    /// PV, directory and pod not on the same node.
    pub misplaced: Vec<String>,
}

impl Findings {
    pub fn lost(&self) -> u64 {
        (self.pending.len()
            + self.duplicates
            + self.stray_pvs.len()
            + self.orphan_dirs.len()
            + self.missing_dirs.len()
            + self.misplaced.len()) as u64
    }
}

impl fmt::Display for Findings {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "{} claims, {} verified; pending {:?}, duplicate PVs {}, stray PVs {:?}, \
             orphan dirs {:?}, missing dirs {:?}, misplaced {:?}",
            self.claims,
            self.verified,
            self.pending,
            self.duplicates,
            self.stray_pvs,
            self.orphan_dirs,
            self.missing_dirs,
            self.misplaced
        )
    }
}

/// Every volume directory directly under a base path (the default pattern is
/// one level).
pub fn dirs(base: &Path) -> BTreeSet<PathBuf> {
    localship_tests::claims::volume_dirs(base)
}

/// Checks claims, PVs, directories and pods of `ns` against each other.
pub async fn audit(client: &Client, ns: &str, agents: &[ProvisionerAgent]) -> Result<Findings> {
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?
        .items;
    let pods: HashMap<String, Option<String>> = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|p| (p.name_any(), p.spec.and_then(|s| s.node_name)))
        .collect();
    let mut by_uid: HashMap<String, Vec<_>> = HashMap::new();
    for pv in pvs_in(client, ns).await? {
        let uid = pv
            .spec
            .as_ref()
            .and_then(|s| s.claim_ref.as_ref())
            .and_then(|r| r.uid.clone())
            .unwrap_or_default();
        by_uid.entry(uid).or_default().push(pv);
    }
    let base_of: HashMap<&str, PathBuf> = agents
        .iter()
        .map(|a| (a.node.as_str(), a.base_path()))
        .collect();
    let mut found = Findings {
        claims: claims.len(),
        ..Findings::default()
    };
    let mut pv_paths = BTreeSet::new();
    for claim in &claims {
        let name = claim.name_any();
        if phase(claim) != "Bound" {
            found.pending.push(name.clone());
        }
        let pvs = by_uid
            .remove(&claim.uid().unwrap_or_default())
            .unwrap_or_default();
        found.duplicates += pvs.len().saturating_sub(1);
        for pv in &pvs {
            pv_paths.insert(PathBuf::from(host_path(pv)));
        }
        let [pv] = pvs.as_slice() else {
            continue;
        };
        let path = PathBuf::from(host_path(pv));
        let node = affinity_node(pv)?;
        let placed = pods.get(&pod_name(&name)).cloned().flatten();
        let under_base = base_of
            .get(node.as_str())
            .is_some_and(|b| path.parent() == Some(b.as_path()));
        if !path.is_dir() {
            continue; // counted below as a missing directory
        }
        if !under_base || placed.as_deref() != Some(node.as_str()) {
            found.misplaced.push(format!(
                "{name}: PV on {node} at {}, pod on {placed:?}",
                path.display()
            ));
            continue;
        }
        if phase(claim) == "Bound" {
            found.verified += 1;
        }
    }
    found.stray_pvs = by_uid
        .into_values()
        .flatten()
        .map(|pv| {
            pv_paths.insert(PathBuf::from(host_path(&pv)));
            pv.name_any()
        })
        .collect();
    let on_disk: BTreeSet<PathBuf> = agents.iter().flat_map(|a| dirs(&a.base_path())).collect();
    found.orphan_dirs = on_disk.difference(&pv_paths).cloned().collect();
    found.missing_dirs = pv_paths.difference(&on_disk).cloned().collect();
    Ok(found)
}

/// How a scenario of one fault ends: the agents still run, `ns` is audited (printed as
/// found `when`), then everything is deleted and must be gone within `timeout`.
pub async fn audit_then_delete_all(
    client: &Client,
    ns: &str,
    agents: &mut [ProvisionerAgent],
    when: &str,
    timeout: Duration,
) -> Result<Tally> {
    for agent in agents.iter_mut() {
        agent.check_running()?;
    }
    let found = audit(client, ns, agents).await?;
    eprintln!("faults: {when}: {found}");
    delete_all(client, ns).await?;
    let bases: Vec<_> = agents.iter().map(|a| a.base_path()).collect();
    let left = wait_all_gone(client, ns, &bases, timeout).await?;
    eprintln!("faults: {left} PVs or directories left after deleting everything");
    Ok(Tally {
        rounds: 1,
        faults: 1,
        checked: found.verified as u64,
        lost: found.lost() + left,
    })
}

/// Deletes every pod (at once: no kubelet) and claim of `ns`.
pub async fn delete_all(client: &Client, ns: &str) -> Result<()> {
    let now = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    Api::<Pod>::namespaced(client.clone(), ns)
        .delete_collection(&now, &ListParams::default())
        .await?;
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await?;
    Ok(())
}

/// Waits for every PV of `ns` and every directory under `bases` to go;
/// returns how many of either are left after `timeout`.
pub async fn wait_all_gone(
    client: &Client,
    ns: &str,
    bases: &[PathBuf],
    timeout: Duration,
) -> Result<u64> {
    let left = || async {
        let pvs = pvs_in(client, ns).await?.len();
        let dirs: usize = bases.iter().map(|b| dirs(b).len()).sum();
        anyhow::Ok((pvs, dirs))
    };
    let gone = wait_for("every PV and directory to be gone", timeout, || async {
        let (pvs, dirs) = left().await?;
        if pvs + dirs == 0 {
            return Ok(Some(()));
        }
        anyhow::bail!("{pvs} PVs and {dirs} directories left")
    })
    .await;
    if let Err(e) = gone {
        eprintln!("faults: {e:#}");
    }
    let (pvs, dirs) = left().await?;
    Ok((pvs + dirs) as u64)
}
