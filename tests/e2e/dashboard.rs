//! The Grafana dashboard `deploy/grafana/localship-dashboard.json` only
//! queries metrics the agents really export: every metric a panel names is
//! declared in the agents' metrics code, and shows up on the /metrics of a
//! provisioner and a log shipper that did real work.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use localship_tests::agents::http_get;
use localship_tests::process::free_port;
use localship_tests::servers::localship_bin;
use localship_tests::{control_plane, scratch_dir, wait_for, Process, ProvisionerAgent};
use serde_json::{json, Value};

use crate::common::*;

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `localship_…` metric family the dashboard's queries name, with
/// histogram suffixes taken off.
fn dashboard_metrics() -> Result<BTreeSet<String>> {
    let path = workspace().join("deploy/grafana/localship-dashboard.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
        .with_context(|| format!("parse {}", path.display()))?;
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    let mut names = BTreeSet::new();
    for expr in &exprs {
        for (at, _) in expr.match_indices("localship_") {
            let name: String = expr[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            names.insert(family.to_string());
        }
    }
    Ok(names)
}

/// Panel target expressions and template variable queries.
fn collect_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "definition", Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// Families declared in a metrics module: its prefix plus each string
/// literal of it (names, help texts and labels alike; only names can match).
fn declared(file: &str, prefix: &str) -> Result<BTreeSet<String>> {
    let text = std::fs::read_to_string(workspace().join(file))?;
    Ok(text
        .split('"')
        .skip(1)
        .step_by(2)
        .map(|literal| format!("{prefix}{literal}"))
        .collect())
}

/// Family names on a /metrics page.
fn exported(page: &str) -> BTreeSet<String> {
    page.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect()
}

#[test]
fn every_dashboard_metric_is_declared_by_an_agent() -> Result<()> {
    let wanted = dashboard_metrics()?;
    assert!(wanted.len() >= 15, "only {wanted:?}");
    let mut known = declared("provisioner/src/metrics.rs", "localship_provisioner_")?;
    known.extend(declared(
        "logshipper/src/metrics.rs",
        "localship_logshipper_",
    )?);
    let unknown: Vec<_> = wanted.difference(&known).collect();
    assert!(unknown.is_empty(), "not declared by any agent: {unknown:?}");
    Ok(())
}

const LOG: &str = "dag_id=etl/run_id=manual__2024-01-01T00:00:00+00:00/task_id=t/attempt=1.log";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_metric_is_exported_by_agents_at_work() -> Result<()> {
    let cp = control_plane()?;
    let client = cp.client().await?;
    let ns = cp.namespace("dashboard").await?;

    // A provisioner that sweeps an orphan, provisions, and reloads its config.
    let dir = scratch_dir("dashboard")?;
    let base = dir.join("base");
    std::fs::create_dir_all(base.join(format!("pvc-{}_gone_claim", "0".repeat(36))))?;
    let config = dir.join("config.json");
    let write_config = |other_node: &str| {
        std::fs::write(
            &config,
            json!({ "nodePathMap": [
                { "node": "DEFAULT_PATH_FOR_NON_LISTED_NODES", "paths": [base] },
                { "node": other_node, "paths": [base] },
            ] })
            .to_string(),
        )
    };
    write_config("node-x")?;
    let args = [
        format!("--config={}", config.display()),
        "--config-poll=200ms".to_string(),
    ];
    let prov = provisioner_name(&ns);
    let agent = ProvisionerAgent::start(cp, "node-a", &prov, &args).await?;
    let class = format!("{ns}-local");
    storage_class(&client, &class, &prov, "Delete", "").await?;
    claim_with_pod(&client, &ns, "data", Some(&class), "1Gi", Some("node-a")).await?;
    wait_bound(&client, &ns, "data").await?;
    // The claim binds once the PV is written; the agent counts the provision just after.
    wait_for(
        "the provision to be counted",
        Duration::from_secs(10),
        || async {
            let page = agent.metrics()?;
            Ok(
                (page.contains("operations_total{operation=\"provision\",result=\"success\"}")
                    && page.contains("operation_duration_seconds_count{operation=\"provision\"}"))
                .then_some(()),
            )
        },
    )
    .await?;
    write_config("node-y")?;
    wait_for(
        "the reload to be counted",
        Duration::from_secs(10),
        || async {
            Ok(agent
                .metrics()?
                .contains("config_reloads_total{result=\"success\"}")
                .then_some(()))
        },
    )
    .await?;
    let mut families = exported(&agent.metrics()?);

    // A log shipper that ships a log, skips a symlink, and fails on a key
    // the destination cannot take (a directory is in its place).
    let source = dir.join("logs");
    let dest = dir.join("shipped");
    let log = source.join(LOG);
    std::fs::create_dir_all(log.parent().unwrap())?;
    std::fs::write(&log, "ran\n")?;
    std::os::unix::fs::symlink("/etc/hostname", log.with_file_name("attempt=2.log"))?;
    let blocked = log.with_file_name("attempt=3.log");
    std::fs::write(&blocked, "cannot land\n")?;
    std::fs::create_dir_all(dest.join(blocked.strip_prefix(&source)?).join("occupied"))?;
    let port = free_port();
    let shipper_args = [
        format!("--source={}", source.display()),
        format!("--dest=file://{}", dest.display()),
        format!("--ledger={}", dir.join("ledger.redb").display()),
        "--settle=1s".to_string(),
        format!("--metrics-addr=127.0.0.1:{port}"),
    ];
    let mut shipper = Process::spawn(
        "dashboard-shipper",
        &localship_bin("localship-logshipper")?,
        &shipper_args,
        &[],
        &dir,
    )?;
    let page = wait_for(
        "the shipper to ship, skip and fail",
        Duration::from_secs(60),
        || async {
            let Ok((200, page)) = http_get(port, "/metrics") else {
                return Ok(None);
            };
            Ok((page.contains("files_shipped_total{")
                && page.contains("skipped_total{")
                && page.contains("failures_total{"))
            .then_some(page))
        },
    )
    .await?;
    shipper.stop(Duration::from_secs(5));
    assert!(Path::new(&dest.join(LOG)).is_file());
    families.extend(exported(&page));

    let wanted = dashboard_metrics()?;
    let missing: Vec<_> = wanted.difference(&families).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics no agent exported: {missing:?}\nexported: {families:?}"
    );
    Ok(())
}
