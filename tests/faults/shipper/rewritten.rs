//! A large log rewritten in place (same length) after the shipper hashed it and before its
//! parts went out: the store must refuse the changed part, so nothing is stored under the
//! file's hash, and no upload is left open. Driven through the shipper's S3 destination in
//! this process, because only that way does the rewrite land exactly between the two reads.
//! A log sent while it is hashed is checked the same way, whole and cut short.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use anyhow::{Context, Result};
use localship_logshipper::destination::s3::{S3Destination, S3Settings};
use localship_logshipper::destination::{
    Destination, DestinationError, LocalContent, WhileHashing,
};
use localship_logshipper::file_hash::hash_for_upload;
use localship_logshipper::local_file::open_beneath;
use localship_tests::{scratch_dir, Minio};
use sha2::{Digest, Sha256};

use super::{hostile::Rows, BUCKET, PREFIX};

const MIB: u64 = 1 << 20;

pub async fn run(minio: &Minio, rows: &mut Rows) -> Result<()> {
    // Every MinIO of the harness has the same credentials; the destination reads them
    // through the standard chain, and scenarios run one at a time.
    for (name, value) in minio.aws_env() {
        std::env::set_var(name, value);
    }
    let dest = S3Destination::connect(S3Settings {
        bucket: BUCKET.into(),
        prefix: PREFIX.into(),
        endpoint: Some(minio.endpoint()),
        region: None,
        path_style: true,
        create_bucket: false,
        multipart_threshold: 5 * MIB,
        part_size: 5 * MIB,
        concurrency: 2,
        conditional_writes: true,
    })
    .await;
    let source = scratch_dir("rewritten-logs")?;
    // 23 MiB: four whole parts and a short one; every line differs, so an edit shows.
    let bytes: Vec<u8> = (0u64..)
        .flat_map(|i| format!("{i:010} a line of a large task log\n").into_bytes())
        .take(23 * MIB as usize)
        .collect();
    std::fs::write(source.join("big.log"), &bytes)?;
    let content = |with_parts: bool| -> Result<LocalContent> {
        let (file, stat) = open_beneath(&source, "big.log").context("open the log")?;
        let part_size = with_parts.then(|| dest.part_size(stat.size)).flatten();
        let (sha256, extra) = hash_for_upload(&file, stat.size, 5 * MIB, part_size)?;
        let path = source.join("big.log");
        Ok(LocalContent::new(
            Arc::new(file),
            path,
            stat.size,
            sha256,
            extra,
        ))
    };

    // Unchanged: stored, and confirmed by the store's own full-object checksum.
    let key = format!("{PREFIX}/unchanged.log");
    let put = dest.put(&key, &content(true)?).await?;
    let stored = minio.get_object(BUCKET, &key).await?;
    rows.row(
        "large log sent in parts",
        put.confirmed && stored.as_ref() == Some(&bytes),
        &format!("confirmed by the store: {}", put.confirmed),
    );

    // Sent while hashed: the store confirms the bytes the hash was computed from.
    let key = format!("{PREFIX}/while-hashed.log");
    let (file, stat) = open_beneath(&source, "big.log").context("open the log")?;
    let path = source.join("big.log");
    let created = dest
        .create_hashing(&key, Arc::new(file), path.clone(), stat.size)
        .await?;
    let stored = minio.get_object(BUCKET, &key).await?;
    let want = hex::encode(Sha256::digest(&bytes));
    let (confirmed, sha) = match &created {
        WhileHashing::Sent(content, info) => (info.confirmed, content.sha256.as_str()),
        _ => (false, ""),
    };
    rows.row(
        "large log sent while hashed",
        confirmed && sha == want && stored.as_ref() == Some(&bytes),
        &format!(
            "confirmed by the store: {confirmed}; SHA-256 as hashed: {}",
            sha == want
        ),
    );

    // The same again: the key is taken, so nothing is sent and the object comes back.
    let (file, stat) = open_beneath(&source, "big.log").context("open the log")?;
    let again = dest
        .create_hashing(&key, Arc::new(file), path.clone(), stat.size)
        .await?;
    let uploads = leftovers(minio, &key).await?.1;
    let taken = matches!(&again, WhileHashing::Taken(info) if info.size == stat.size);
    rows.row(
        "large log whose key is taken is not sent again",
        taken && uploads == 0,
        &format!(
            "create: {}; open uploads: {uploads}",
            match again {
                WhileHashing::Sent(..) => "sent again",
                WhileHashing::Taken(_) => "key taken, nothing sent",
                WhileHashing::NotHere => "declined",
            }
        ),
    );

    // Cut short after it was opened: the hashing read ends early, nothing is stored.
    let key = format!("{PREFIX}/cut-short.log");
    let (file, stat) = open_beneath(&source, "big.log").context("open the log")?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)?
        .set_len(12 * MIB)?;
    let result = dest
        .create_hashing(&key, Arc::new(file), path.clone(), stat.size)
        .await;
    let left = leftovers(minio, &key).await?;
    rows.row(
        "large log cut short while sent as hashed",
        matches!(result, Err(DestinationError::FileChanged { .. })) && left == (false, 0),
        &format!(
            "create: {}; object stored: {}; open uploads: {}",
            outcome(&result),
            left.0,
            left.1
        ),
    );

    // Rewritten in the fourth part, after hashing, with the same length.
    for (with_parts, name) in [
        (true, "large log rewritten after hashing"),
        (
            false,
            "large log rewritten after hashing, parts summed at upload",
        ),
    ] {
        let key = format!("{PREFIX}/rewritten-{with_parts}.log");
        std::fs::write(source.join("big.log"), &bytes)?;
        let content = content(with_parts)?;
        let edit = std::fs::OpenOptions::new()
            .write(true)
            .open(source.join("big.log"))?;
        edit.write_all_at(b"EDITED", 16 * MIB + 3)?;
        let result = dest.put(&key, &content).await;
        let left = leftovers(minio, &key).await?;
        let refused = matches!(result, Err(DestinationError::FileChanged { .. }));
        rows.row(
            name,
            refused && left == (false, 0),
            &format!(
                "put: {}; object stored: {}; open uploads: {}",
                outcome(&result),
                left.0,
                left.1
            ),
        );
    }
    Ok(())
}

/// Whether an object is stored under `key`, and how many uploads to it are still open.
async fn leftovers(minio: &Minio, key: &str) -> Result<(bool, usize)> {
    let uploads = minio
        .client()
        .list_multipart_uploads()
        .bucket(BUCKET)
        .prefix(key)
        .send()
        .await?;
    let stored = minio.get_object(BUCKET, key).await?;
    Ok((stored.is_some(), uploads.uploads().len()))
}

fn outcome<T>(result: &Result<T, DestinationError>) -> String {
    match result {
        Ok(_) => "accepted".to_owned(),
        Err(e) => e.to_string(),
    }
}
