//! The start-up path: builds the destination `--dest` names, opens the ledger, serves
//! metrics, starts discovery (or, in Kubernetes mode, the volume watch) and runs the
//! pipeline until stopped.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};

use crate::cli::Args;
use crate::destination::file::FileDestination;
use crate::destination::s3::{S3Destination, S3Settings};
use crate::destination::{Destination, DestinationUrl};
use crate::discover::Sources;
use crate::filter::Filter;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::pipeline::{self, Pipeline, Settings};
use crate::report::Summary;
use crate::ship::Context;
use crate::{health, http, kubernetes, Error, Result};

/// Events from discovery waiting for the loop; beyond this, discovery waits.
const EVENT_QUEUE: usize = 4096;

/// How often a daemon hands freed heap back to the kernel.
const HEAP_EVERY: Duration = Duration::from_secs(15);

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
        destination: Arc::new(destination),
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
        let watch = health::watch_destination(
            ctx.destination.clone(),
            ok_tx,
            recheck.clone(),
            metrics.clone(),
        );
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
            let settings = kubernetes::Settings {
                node: node.clone(),
                annotation: args.opt_in_annotation.clone(),
                dest: args.dest.clone(),
            };
            let watch = kubernetes::watch_volumes(
                &settings,
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
