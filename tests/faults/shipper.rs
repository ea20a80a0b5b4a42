//! Faults against the log shipper and its destination: kill -9 mid-upload, a MinIO outage
//! while logs keep finishing, and hostile inputs. Each checks the object store against an
//! in-memory copy of every log written, since retention removes the files themselves.

mod blackhole;
mod hostile;
mod kill;
mod ledger;
mod outage;
mod rewritten;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use localship_tests::Minio;
use sha2::{Digest, Sha256};

use crate::report::Scenario;

const BUCKET: &str = "airflow";
const PREFIX: &str = "logs";

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario::new("shipper kill -9 mid-upload (20 rounds)", kill::run),
        Scenario::new("MinIO down while logs keep finishing", outage::run),
        Scenario::new("hostile inputs (shipper)", hostile::run),
        Scenario::new("shipper ledger on a full disk, and unreadable", ledger::run),
        Scenario::new("shipper's apiserver path blackholed", blackhole::run),
    ]
}

fn dest() -> String {
    format!("s3://{BUCKET}/{PREFIX}")
}

fn key(relative: &str) -> String {
    format!("{PREFIX}/{relative}")
}

/// Every log written, as its final bytes, by path relative to the source.
type Logs = BTreeMap<String, Vec<u8>>;

fn write_log(root: &Path, relative: &str, bytes: &[u8]) -> Result<()> {
    let path = root.join(relative);
    std::fs::create_dir_all(path.parent().context("a parent")?)?;
    std::fs::write(&path, bytes).with_context(|| format!("write {}", path.display()))
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// SHA-256 of each log's final bytes, by path relative to the source.
fn hashes(logs: &Logs) -> BTreeMap<String, String> {
    logs.iter().map(|(r, b)| (r.clone(), sha256(b))).collect()
}

/// What the bucket holds compared with `logs`: (objects equal to their file, violations).
async fn compare_bucket(minio: &Minio, logs: &Logs) -> Result<(u64, u64)> {
    compare_hashes(minio, &hashes(logs)).await
}

/// [`compare_bucket`] against SHA-256s. A violation is a log whose object is missing or
/// differs, or a key that no log explains.
async fn compare_hashes(minio: &Minio, logs: &BTreeMap<String, String>) -> Result<(u64, u64)> {
    let (mut same, mut lost) = (0, 0);
    for (relative, want) in logs {
        let got = minio.get_object(BUCKET, &key(relative)).await?;
        match got {
            Some(got) if sha256(&got) == *want => same += 1,
            Some(got) => {
                lost += 1;
                eprintln!(
                    "  LOST: {relative}: object of {} bytes differs from the file",
                    got.len()
                );
            }
            None => {
                lost += 1;
                eprintln!("  LOST: {relative}: no object");
            }
        }
    }
    for extra in minio.list_keys(BUCKET).await?.into_iter().filter(|k| {
        k.strip_prefix(&format!("{PREFIX}/"))
            .is_none_or(|r| !logs.contains_key(r))
    }) {
        lost += 1;
        eprintln!("  LOST: unexpected key {extra}");
    }
    Ok((same, lost))
}
