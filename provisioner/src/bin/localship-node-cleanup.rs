use std::time::Duration;

use clap::Parser;
use localship_provisioner::cli::LogFormat;
use localship_provisioner::node_cleanup::Cleanup;
use localship_provisioner::startup;
use tokio::signal::unix::{signal, SignalKind};

/// Lets go of the volumes of nodes that left the cluster for good.
///
/// One replica for the cluster (a Deployment). When a Node object has been gone for
/// --grace, its localship PVs that are released (or being deleted) are removed: their
/// finalizers go, since there is no disk left to clean. A PV still bound stays until its
/// claim is deleted; claims annotated `localship.io/node-loss: delete-claim` (or whose
/// StorageClass has that parameter) are deleted for you, so a StatefulSet makes them anew
/// on a live node. Logs on that node that were not shipped are gone with it.
#[derive(Debug, Parser)]
#[command(name = "localship-node-cleanup", version, about, long_about)]
struct Args {
    /// How long a node must be gone before its volumes are let go. A node deleted and
    /// registered again within it keeps everything.
    #[arg(long, env = "LOCALSHIP_NODE_GRACE", default_value = "5m", value_parser = humantime::parse_duration)]
    grace: Duration,

    /// How often to look.
    #[arg(long, env = "LOCALSHIP_NODE_CHECK_PERIOD", default_value = "10s", value_parser = humantime::parse_duration)]
    period: Duration,

    /// Log format.
    #[arg(long, env = "LOCALSHIP_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

fn main() -> anyhow::Result<()> {
    localship_heap::one_arena();
    tokio::runtime::Runtime::new()?.block_on(serve())
}

async fn serve() -> anyhow::Result<()> {
    let args = Args::parse();
    startup::init_logging(args.log_format);
    let client = startup::client().await?;
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = Cleanup::new(client, args.grace).run(args.period) => r?,
        _ = term.recv() => tracing::info!("shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("shutting down"),
    }
    Ok(())
}
