//! kill -9 of the agents, over and over, while a burst of claims is being
//! provisioned and again while it is being deleted: every step of
//! provisioning and reclaiming must be idempotent, so each claim still ends
//! with one PV and one directory, and nothing is left behind.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Result;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{Api, ListParams};
use localship_tests::claims::{phase, provisioner_name, pvs_in, storage_class};
use localship_tests::{control_plane, ProvisionerAgent};

use super::audit::{audit, burst, delete_all, start_agents, wait_all_gone, wait_settled};
use crate::jitter::Jitter;
use crate::report::Tally;

const CLAIMS: usize = 200;
/// Kills while the burst is provisioned, and while it is deleted.
const KILLS: u64 = 20;
const KILLS_ON_DELETE: u64 = 5;

pub async fn kill_9_during_burst() -> Result<Tally> {
    let cp = control_plane()?;
    let client = cp.client().await?;
    let ns = cp.namespace("faults-kill").await?;
    let prov = provisioner_name(&ns);
    let mut agents = start_agents(cp, &prov).await?;
    let bases: Vec<_> = agents.iter().map(|a| a.base_path()).collect();
    let class = format!("{ns}-local");
    storage_class(&client, &class, &prov, "Delete", "").await?;
    let mut jitter = Jitter::new("kill -9 burst");
    let names: Vec<String> = (0..CLAIMS).map(|i| format!("burst-{i:03}")).collect();

    let start = Instant::now();
    let create = async {
        burst(&client, &ns, &class, &names, Duration::ZERO, None).await?;
        eprintln!(
            "faults: {CLAIMS} claims and pods created in {:.1}s",
            start.elapsed().as_secs_f64()
        );
        anyhow::Ok(())
    };
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns);
    let bound = || async {
        let all = claims.list(&ListParams::default()).await?.items;
        anyhow::Ok(all.iter().filter(|c| phase(c) == "Bound").count())
    };
    let kills = kill_loop(&mut agents, &mut jitter, KILLS, "bound", bound);
    let (created, killed) = tokio::join!(create, kills);
    created?;
    killed?;
    wait_settled(&client, &ns, CLAIMS, Duration::from_secs(120)).await;
    eprintln!("faults: settled at {:.1}s", start.elapsed().as_secs_f64());
    for agent in &mut agents {
        agent.check_running()?;
    }
    let found = audit(&client, &ns, &agents).await?;
    eprintln!("faults: after the burst: {found}");

    delete_all(&client, &ns).await?;
    let pvs_left = || async { anyhow::Ok(pvs_in(&client, &ns).await?.len()) };
    kill_loop(
        &mut agents,
        &mut jitter,
        KILLS_ON_DELETE,
        "PVs left",
        pvs_left,
    )
    .await?;
    let left = wait_all_gone(&client, &ns, &bases, Duration::from_secs(90)).await?;
    eprintln!(
        "faults: {left} PVs or directories left after deleting everything, at {:.1}s",
        start.elapsed().as_secs_f64()
    );
    for agent in &mut agents {
        agent.check_running()?;
    }
    Ok(Tally {
        rounds: KILLS + KILLS_ON_DELETE,
        faults: KILLS + KILLS_ON_DELETE,
        checked: found.verified as u64,
        lost: found.lost() + left,
    })
}

/// `kills` times: wait 0.5–3 s, kill -9 one agent at random, leave it down
/// up to 0.5 s, restart it. Prints what `progress` counted at each kill, so
/// the log shows the kills landed while work was in flight.
async fn kill_loop<F, Fut>(
    agents: &mut [ProvisionerAgent],
    jitter: &mut Jitter,
    kills: u64,
    what: &str,
    progress: F,
) -> Result<()>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<usize>>,
{
    let mut seen = Vec::new();
    for _ in 0..kills {
        tokio::time::sleep(jitter.millis(500, 3000)).await;
        let agent = &mut agents[jitter.below(agents.len() as u64) as usize];
        agent.kill();
        seen.push(format!("{}@{}", agent.node, progress().await?));
        tokio::time::sleep(jitter.millis(0, 500)).await;
        agent.restart().await?;
    }
    eprintln!("faults: killed (node@{what}): {}", seen.join(" "));
    Ok(())
}
