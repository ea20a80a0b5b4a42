//! Ships finished Apache Airflow task logs to S3 (or MinIO) or a directory, byte-identical,
//! under the key Airflow's own reader looks for, exactly once, nothing lost.
//!
//! Read top-down: `discover` finds log files, `settle` decides when one is finished, `key`
//! names its object, `ship` uploads it to a `destination` (checking first what is already
//! there, by the rule in `coexist`) and records it in the `ledger`; `retain` removes local
//! files once shipped. `pipeline` runs the loop, `health` keeps an eye on the destination;
//! `metrics` and `http` show it. In Kubernetes mode, `kubernetes` turns this node's opted-in
//! volumes into sources and holds each deleted one until its logs are shipped.

pub mod alongside;
pub mod cli;
pub mod coexist;
pub mod destination;
pub mod discover;
pub mod health;
pub mod http;
pub mod key;
pub mod kubernetes;
pub mod ledger;
pub mod local_file;
pub mod metrics;
pub mod pipeline;
pub mod report;
pub mod retain;
pub mod retry;
pub mod select;
pub mod settle;
pub mod ship;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};

use crate::cli::Args;
use crate::destination::file::FileDestination;
use crate::destination::s3::{S3Destination, S3Settings};
use crate::destination::{Destination, DestinationUrl};
use crate::discover::Sources;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::pipeline::{Pipeline, Settings};
use crate::report::Summary;
use crate::select::Filter;
use crate::ship::Context;

/// Events from discovery waiting for the loop; beyond this, discovery waits.
const EVENT_QUEUE: usize = 4096;

/// How often a daemon hands freed heap back to the kernel.
const HEAP_EVERY: Duration = Duration::from_secs(15);

/// Everything that can go wrong, as data: what to fix is in the message.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("source `{}`: {source} — create it or fix --source", path.display())]
    Source {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Glob(#[from] select::GlobError),
    #[error(transparent)]
    Ledger(#[from] ledger::LedgerError),
    #[error(transparent)]
    Destination(#[from] destination::DestinationError),
    #[error("cannot read `{}`: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot remove `{}`: {source}", path.display())]
    Delete {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot serve metrics on {addr}: {source} — pick another --metrics-addr")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("{0}")]
    Config(String),
    #[error(
        "no Kubernetes API client: {0} — set KUBECONFIG, or run in a pod with a service account"
    )]
    KubeClient(#[source] kube::Error),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Volume(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Names the failure in the `failures_total` metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Source { .. } => "source",
            Error::Glob(_) => "glob",
            Error::Ledger(_) => "ledger",
            Error::Destination(e) => e.metric_label(),
            Error::Read { .. } => "read",
            Error::Delete { .. } => "delete",
            Error::Listen { .. } => "listen",
            Error::Metrics(_) => "metrics",
            Error::Config(_) => "config",
            Error::KubeClient(_) => "kube_client",
            Error::Kube(_) => "kube",
            Error::Volume(_) => "volume",
        }
    }

    /// The destination refused this file's object for good; retrying cannot help.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Error::Destination(e) if e.is_permanent())
    }

    /// The destination could not be asked; the file is not at fault.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Error::Destination(e) if e.is_unreachable())
    }
}

/// Builds the destination `--dest` names and runs until `stop` turns true (or, with
/// `--once`, until everything found is shipped).
pub async fn run(args: Args, stop: watch::Receiver<bool>) -> Result<Summary> {
    args.validate()?;
    // One store for every namespace's prefix; each volume's source carries its own.
    match args.dest.shared() {
        DestinationUrl::S3 { bucket, prefix } => {
            let settings = S3Settings {
                bucket,
                prefix,
                endpoint: args.s3_endpoint.clone(),
                region: args.s3_region.clone(),
                path_style: args.s3_path_style,
                create_bucket: args.create_bucket,
                multipart_threshold: args.multipart_threshold,
                part_size: args.part_size,
                concurrency: args.upload_concurrency,
                conditional_writes: !args.s3_no_conditional_writes,
            };
            run_with(args, S3Destination::connect(settings).await, stop).await
        }
        DestinationUrl::File { dir } => run_with(args, FileDestination::new(&dir)?, stop).await,
    }
}

/// The start-up path with the destination given, so tests can pass their own.
pub async fn run_with<D: Destination>(
    args: Args,
    destination: D,
    stop: watch::Receiver<bool>,
) -> Result<Summary> {
    let filter = Filter::new(&args.include, &args.exclude)?;
    let ledger = Ledger::open(&args.ledger)?;
    let metrics = Arc::new(Metrics::new()?);
    let (ready_tx, ready_rx) = watch::channel(false);
    // Kubernetes mode is ready only once this node's volumes are known.
    let (synced_tx, synced_rx) = watch::channel(args.node_name.is_none());
    let server = match args.metrics_addr() {
        Some(addr) => {
            let mut stopping = stop.clone();
            let shutdown = async move {
                let _ = stopping.wait_for(|stop| *stop).await;
            };
            let router = http::router(metrics.clone(), vec![ready_rx, synced_rx], ledger.health());
            Some(tokio::spawn(http::serve(addr, router, shutdown).await?))
        }
        None => None,
    };

    let mirror = tokio::spawn(health::mirror_ledger(ledger.health(), metrics.clone()));
    let alongside = args.alongside();
    let ctx = Arc::new(Context {
        destination,
        recorder: ledger.recorder(),
        ledger,
        alongside,
        max_file_size: args.max_file_size,
    });
    let (ok_tx, ok_rx) = watch::channel(false);
    let recheck = Arc::new(Notify::new());
    let checker = if args.once {
        ctx.destination.check().await?;
        ok_tx.send_replace(true);
        metrics.destination_up.set(1);
        None
    } else {
        let watch = health::watch_destination(ctx.clone(), ok_tx, recheck.clone(), metrics.clone());
        Some(tokio::spawn(watch))
    };
    // A burst of logs leaves its peak resident otherwise; `--once` exits instead.
    let heap = (!args.once).then(|| tokio::spawn(localship_heap::give_back_every(HEAP_EVERY)));
    tracing::info!(
        destination = ctx.destination.id(),
        once = args.once,
        beside_airflow = ctx.alongside.is_some(),
        "starting"
    );

    let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
    let rescan = (!args.once).then_some(args.rescan);
    let mut sources =
        Sources::new(filter, events_tx, rescan).max_watches_per_source(args.max_watches_per_source);
    let (drains_tx, drains_rx) = mpsc::unbounded_channel();
    let (refused_tx, refused_rx) = mpsc::unbounded_channel();
    // Only a volume's claim has an owner to tell; standalone, the log and metrics say it.
    let refusals = args.node_name.is_some().then_some(refused_tx);
    // Kubernetes mode hands the sources to the volume watch; --source is not used then.
    let (sources, volumes) = match &args.node_name {
        Some(node) => {
            let watch = kubernetes::watch_volumes(
                &args,
                node,
                sources,
                kubernetes::FromPipeline {
                    drained: drains_rx,
                    refused: refused_rx,
                },
                metrics.clone(),
                synced_tx,
                stop.clone(),
            );
            (None, Some(watch.await?))
        }
        None => {
            for root in &args.sources {
                sources.add(root).map_err(|source| Error::Source {
                    path: root.clone(),
                    source,
                })?;
            }
            (Some(sources), None)
        }
    };
    let settings = Settings {
        settle: args.settle,
        once: args.once,
        workers: args.upload_concurrency,
        delete_after: args.delete_after,
        sweep_every: args.rescan,
        final_after: args.final_after,
        initial_sources: sources.as_ref().map_or(0, Sources::len),
        max_tracked: pipeline::MAX_TRACKED,
    };
    let mut pipeline =
        Pipeline::new(ctx, metrics, settings, ok_rx, recheck, ready_tx).report_drains(drains_tx);
    if let Some(refusals) = refusals {
        pipeline = pipeline.report_refusals(refusals);
    }
    let summary = pipeline.run(events_rx, stop).await;
    drop(sources);
    // Reconciles are idempotent and the PVs hold what matters: stopping mid-way is safe.
    if let Some(volumes) = volumes {
        volumes.abort();
    }
    if let Some(checker) = checker {
        checker.abort();
    }
    if let Some(heap) = heap {
        heap.abort();
    }
    mirror.abort();
    if let Some(server) = server {
        if args.once {
            server.abort();
        }
        let _ = server.await;
    }
    Ok(summary)
}
