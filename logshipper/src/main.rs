//! `localship-logshipper`: ships finished Airflow task logs; see `--help`.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use localship_logshipper::cli::{Args, LogFormat};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

/// Some file could not be shipped (`--once`).
const EXIT_INCOMPLETE: u8 = 1;
/// The shipper could not start: configuration, ledger or destination.
const EXIT_FAILED: u8 = 2;

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    init_tracing(args.log_format);
    let once = args.once;
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("stopping");
        let _ = stop_tx.send(true);
    });
    match localship_logshipper::run(args, stop).await {
        Ok(summary) => {
            if once {
                println!("{summary}");
            } else {
                tracing::info!(%summary, "stopped");
            }
            if summary.failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_INCOMPLETE)
            }
        }
        Err(e) => {
            let e = anyhow::Error::from(e);
            tracing::error!(error = format!("{e:#}"), "cannot ship logs");
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn wait_for_signal() {
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
