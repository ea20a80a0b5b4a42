//! Ships finished Apache Airflow task logs to S3 (or MinIO) or a directory, byte-identical,
//! under the key Airflow's own reader looks for, exactly once, nothing lost.
//!
//! Read top-down: `run` wires it all; `discover` finds log files (those `filter` selects),
//! `settle` decides when one is finished, `key` names its object, `ship` uploads it to a
//! `destination` (deciding by `existing_object`'s rule, or beside Airflow's own uploads by
//! `alongside`'s, what to do with what is already there) and records it in the `ledger`;
//! `retain` removes local files once shipped. `pipeline` runs the loop; `health` watches
//! what shipping depends on (the destination, the ledger), which `metrics` and `http` show.
//! Failures are `error`'s `Error`. In Kubernetes mode, `kubernetes` turns this node's opted-in
//! volumes into sources and holds each deleted one until its logs are shipped.

pub mod alongside;
pub mod cli;
pub mod destination;
pub mod discover;
mod error;
pub mod existing_object;
pub mod file_hash;
pub mod filter;
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
mod run;
pub mod settle;
pub mod ship;

pub use error::{Error, Result};
pub use run::{run, run_with};
