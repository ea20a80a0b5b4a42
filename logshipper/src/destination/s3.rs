//! `s3://bucket/prefix`: AWS S3 or anything that speaks it (MinIO), via aws-sdk-s3.
//!
//! Credentials come from the standard chain (environment, shared config and profiles, web
//! identity, container and instance roles). Every upload carries a checksum the server checks
//! before it accepts the bytes (SHA-256 for a single PUT, CRC-64/NVME per part for a multipart
//! upload), and the file's SHA-256 as metadata when it is known before sending, so later
//! `head` calls can compare without downloading.
//! A single PUT is atomic; a multipart upload becomes visible only when completed, and is
//! aborted on failure, so no half object ever appears under a key.

mod errors;
mod multipart;

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use aws_config::environment::region::EnvironmentVariableRegionProvider;
use aws_config::meta::region::RegionProviderChain;
use aws_config::profile::ProfileFileRegionProvider;
use aws_config::retry::RetryConfig;
use aws_config::BehaviorVersion;
use aws_sdk_s3::config::Region;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{BucketLocationConstraint, CreateBucketConfiguration};
use aws_sdk_s3::Client;
use base64::Engine;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use super::{
    Destination, DestinationError, Fetched, LocalContent, ObjectInfo, Precondition, WhileHashing,
    SHA256_METADATA,
};
use crate::file_hash::read_at;

/// Smallest part S3 accepts (but for the last).
pub const MIN_PART_SIZE: u64 = 5 << 20;

/// Region used when neither `--s3-region` nor the AWS configuration names one.
const FALLBACK_REGION: &str = "us-east-1";

/// Attempts per request, the SDK backing off with jitter in between.
const REQUEST_ATTEMPTS: u32 = 4;

/// How to reach the bucket and how to upload to it.
#[derive(Clone, Debug)]
pub struct S3Settings {
    pub bucket: String,
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub path_style: bool,
    pub create_bucket: bool,
    pub multipart_threshold: u64,
    pub part_size: u64,
    /// Requests carrying data at once, over all files; bounds memory to this many parts.
    pub concurrency: usize,
    /// Create objects with `If-None-Match: *`, so a new log costs one request instead of a
    /// HEAD and a PUT. AWS S3 and MinIO honour it; turn it off for a store that ignores it,
    /// or an object written meanwhile by someone else could be overwritten.
    pub conditional_writes: bool,
}

pub struct S3Destination {
    client: Client,
    settings: S3Settings,
    region: String,
    endpoint: String,
    id: String,
    requests: Arc<Semaphore>,
}

impl S3Destination {
    pub async fn connect(settings: S3Settings) -> Self {
        // The environment and profiles only: the full chain would ask the EC2 metadata service,
        // which stalls start-up everywhere but on EC2.
        let region = RegionProviderChain::first_try(settings.region.clone().map(Region::new))
            .or_else(EnvironmentVariableRegionProvider::new())
            .or_else(ProfileFileRegionProvider::new())
            .or_else(Region::new(FALLBACK_REGION));
        let shared = aws_config::defaults(BehaviorVersion::latest())
            .region(region)
            .load()
            .await;
        let region = shared
            .region()
            .map_or(FALLBACK_REGION.to_owned(), |r| r.to_string());
        let mut config = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(settings.path_style)
            .retry_config(RetryConfig::standard().with_max_attempts(REQUEST_ATTEMPTS));
        if let Some(endpoint) = &settings.endpoint {
            config = config.endpoint_url(endpoint);
        }
        let endpoint = settings
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("AWS S3 ({region})"));
        let id = match settings.prefix.as_str() {
            "" => format!("s3://{}", settings.bucket),
            prefix => format!("s3://{}/{prefix}", settings.bucket),
        };
        Self {
            client: Client::from_conf(config.build()),
            requests: Arc::new(Semaphore::new(settings.concurrency.max(1))),
            settings,
            region,
            endpoint,
            id,
        }
    }

    fn bucket(&self) -> &str {
        &self.settings.bucket
    }

    async fn create_bucket(&self) -> Result<(), DestinationError> {
        let mut request = self.client.create_bucket().bucket(self.bucket());
        // us-east-1 is the one region that refuses an explicit location constraint.
        if self.region != FALLBACK_REGION {
            request = request.create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(BucketLocationConstraint::from(self.region.as_str()))
                    .build(),
            );
        }
        match request.send().await {
            Ok(_) => {
                tracing::info!(bucket = self.bucket(), "created the bucket");
                Ok(())
            }
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_bucket_already_owned_by_you()) =>
            {
                Ok(())
            }
            Err(e) => Err(self.classify("CreateBucket", "", e)),
        }
    }

    /// One PUT of the whole file; with `if_absent`, `None` when the key already holds an
    /// object (and nothing was written).
    async fn put_single(
        &self,
        key: &str,
        content: &LocalContent,
        if_absent: bool,
    ) -> Result<Option<ObjectInfo>, DestinationError> {
        let _permit = self.requests.acquire().await.expect("never closed");
        let (data, checksum) = match &content.data {
            Some(data) => (
                data.clone(),
                base64(&hex::decode(&content.sha256).unwrap_or_default()),
            ),
            None => {
                let file = content.file.clone();
                let size = content.size as usize;
                let data = blocking_read(content, move || read_at(&file, 0, size)).await?;
                let sha = Sha256::digest(&data);
                if hex::encode(sha) != content.sha256 {
                    return Err(DestinationError::FileChanged {
                        path: content.path.clone(),
                    });
                }
                (Bytes::from(data), base64(&sha))
            }
        };
        let mut request = self
            .client
            .put_object()
            .bucket(self.bucket())
            .key(key)
            .content_length(content.size as i64)
            .checksum_sha256(&checksum)
            .metadata(SHA256_METADATA, &content.sha256)
            .body(ByteStream::from(data));
        if if_absent {
            request = request.if_none_match("*");
        }
        // The server checks the body against x-amz-checksum-sha256, so signing the payload
        // too would only hash every byte once more.
        let sent = request.customize().disable_payload_signing().send().await;
        let out = match sent {
            Ok(out) => out,
            Err(e) if if_absent && precondition_failed(&e) => return Ok(None),
            Err(e) => return Err(self.classify("PutObject", key, e)),
        };
        Ok(Some(ObjectInfo {
            size: content.size,
            sha256: Some(content.sha256.clone()),
            etag: out.e_tag().map(str::to_owned),
            version_id: out.version_id().map(str::to_owned),
            // The server answers with the checksum it verified the body against.
            confirmed: out.checksum_sha256() == Some(checksum.as_str()),
        }))
    }
}

impl Destination for S3Destination {
    fn id(&self) -> &str {
        &self.id
    }

    fn prefix(&self) -> &str {
        &self.settings.prefix
    }

    async fn check(&self) -> Result<(), DestinationError> {
        // Listing answers with a reason (NoSuchBucket, InvalidAccessKeyId, …) where HEAD has
        // only a status, and Airflow's reader needs the same permission.
        let listed = self
            .client
            .list_objects_v2()
            .bucket(self.bucket())
            .prefix(&self.settings.prefix)
            .max_keys(1)
            .send()
            .await
            .map_err(|e| self.classify("ListObjectsV2", &self.settings.prefix, e));
        match listed {
            Err(DestinationError::NoSuchBucket { .. }) if self.settings.create_bucket => {
                self.create_bucket().await
            }
            other => other.map(|_| ()),
        }
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, DestinationError> {
        let out = match self
            .client
            .head_object()
            .bucket(self.bucket())
            .key(key)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if e.as_service_error().is_some_and(|e| e.is_not_found()) => return Ok(None),
            Err(e) => return Err(self.classify("HeadObject", key, e)),
        };
        Ok(Some(ObjectInfo {
            size: out.content_length().unwrap_or_default().max(0) as u64,
            sha256: out.metadata().and_then(|m| m.get(SHA256_METADATA)).cloned(),
            etag: out.e_tag().map(str::to_owned),
            version_id: out.version_id().map(str::to_owned),
            confirmed: false,
        }))
    }

    async fn sha256_prefix(&self, key: &str, len: u64) -> Result<String, DestinationError> {
        let mut hasher = Sha256::new();
        if len > 0 {
            let out = self
                .client
                .get_object()
                .bucket(self.bucket())
                .key(key)
                .range(format!("bytes=0-{}", len - 1))
                .send()
                .await
                .map_err(|e| self.classify("GetObject", key, e))?;
            let mut body = out.body;
            let mut read = 0;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| DestinationError::Unreachable {
                    endpoint: self.endpoint.clone(),
                    detail: format!("reading `{key}`: {e}"),
                })?;
                read += chunk.len() as u64;
                hasher.update(&chunk);
            }
            if read != len {
                return Err(DestinationError::Unverified {
                    key: key.to_owned(),
                    expected: format!("{len} bytes"),
                    found: format!("{read} bytes"),
                });
            }
        }
        Ok(hex::encode(hasher.finalize()))
    }

    async fn put(&self, key: &str, content: &LocalContent) -> Result<ObjectInfo, DestinationError> {
        if content.size < self.settings.multipart_threshold {
            let written = self.put_single(key, content, false).await?;
            Ok(written.expect("an unconditional PUT writes"))
        } else {
            self.put_multipart(key, content).await
        }
    }

    async fn create(
        &self,
        key: &str,
        content: &LocalContent,
    ) -> Result<Option<ObjectInfo>, DestinationError> {
        if self.settings.conditional_writes && content.size < self.settings.multipart_threshold {
            return self.put_single(key, content, true).await;
        }
        // A large file costs one HEAD more, which is nothing beside its parts.
        if self.head(key).await?.is_some() {
            return Ok(None);
        }
        self.put(key, content).await.map(Some)
    }

    async fn create_hashing(
        &self,
        key: &str,
        file: Arc<File>,
        path: PathBuf,
        size: u64,
    ) -> Result<WhileHashing, DestinationError> {
        if self.multipart_part_size(size).is_none() {
            return Ok(WhileHashing::NotHere);
        }
        if let Some(object) = self.head(key).await? {
            return Ok(WhileHashing::Taken(object));
        }
        let (content, put) = self.put_multipart_hashing(key, file, path, size).await?;
        Ok(WhileHashing::Sent(content, put))
    }

    async fn get(&self, key: &str, limit: u64) -> Result<Option<Fetched>, DestinationError> {
        let out = match self
            .client
            .get_object()
            .bucket(self.bucket())
            .key(key)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if e.as_service_error().is_some_and(|e| e.is_no_such_key()) => return Ok(None),
            Err(e) => return Err(self.classify("GetObject", key, e)),
        };
        let mut info = ObjectInfo {
            size: out.content_length().unwrap_or_default().max(0) as u64,
            sha256: out.metadata().and_then(|m| m.get(SHA256_METADATA)).cloned(),
            etag: out.e_tag().map(str::to_owned),
            version_id: out.version_id().map(str::to_owned),
            confirmed: false,
        };
        if info.size > limit {
            return Ok(Some(Fetched { info, data: None }));
        }
        let data = out
            .body
            .collect()
            .await
            .map_err(|e| DestinationError::Unreachable {
                endpoint: self.endpoint.clone(),
                detail: format!("reading `{key}`: {e}"),
            })?
            .into_bytes();
        // Metadata names what we wrote; someone else may have written since.
        info.size = data.len() as u64;
        info.sha256 = Some(hex::encode(Sha256::digest(&data)));
        Ok(Some(Fetched {
            info,
            data: Some(data),
        }))
    }

    async fn put_bytes(
        &self,
        key: &str,
        data: Bytes,
        when: Precondition,
    ) -> Result<Option<ObjectInfo>, DestinationError> {
        let _permit = self.requests.acquire().await.expect("never closed");
        let sha = Sha256::digest(&data);
        let (sha256, checksum, size) = (hex::encode(sha), base64(&sha), data.len());
        let mut request = self
            .client
            .put_object()
            .bucket(self.bucket())
            .key(key)
            .content_length(size as i64)
            .checksum_sha256(&checksum)
            .metadata(SHA256_METADATA, &sha256)
            .body(ByteStream::from(data));
        let conditional = match &when {
            Precondition::Always => false,
            Precondition::Absent => {
                request = request.if_none_match("*");
                true
            }
            Precondition::Unchanged(read) => match &read.etag {
                Some(etag) => {
                    request = request.if_match(etag);
                    true
                }
                None => false,
            },
        };
        let sent = request.customize().disable_payload_signing().send().await;
        let out = match sent {
            Ok(out) => out,
            Err(e) if conditional && precondition_failed(&e) => return Ok(None),
            Err(e) => return Err(self.classify("PutObject", key, e)),
        };
        Ok(Some(ObjectInfo {
            size: size as u64,
            confirmed: out.checksum_sha256() == Some(checksum.as_str()),
            sha256: Some(sha256),
            etag: out.e_tag().map(str::to_owned),
            version_id: out.version_id().map(str::to_owned),
        }))
    }

    async fn delete(&self, key: &str) -> Result<(), DestinationError> {
        self.client
            .delete_object()
            .bucket(self.bucket())
            .key(key)
            .send()
            .await
            .map_err(|e| self.classify("DeleteObject", key, e))?;
        Ok(())
    }

    fn max_key_bytes(&self) -> Option<usize> {
        Some(crate::key::S3_MAX_KEY_BYTES)
    }

    fn in_memory_limit(&self) -> u64 {
        self.settings.multipart_threshold
    }

    fn part_size(&self, size: u64) -> Option<u64> {
        self.multipart_part_size(size)
    }
}

/// The key already held an object (`If-None-Match: *`), or a concurrent conditional write
/// to it was in progress.
fn precondition_failed<E: ProvideErrorMetadata>(err: &SdkError<E>) -> bool {
    let SdkError::ServiceError(e) = err else {
        return false;
    };
    match e.raw().status().as_u16() {
        412 => true,
        409 => e.err().code() == Some("ConditionalRequestConflict"),
        _ => false,
    }
}

fn base64(digest: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(digest)
}

async fn blocking_read<T: Send + 'static>(
    content: &LocalContent,
    read: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, DestinationError> {
    let result = tokio::task::spawn_blocking(read)
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    result.map_err(|source| read_error(content, source))
}

/// A failed read of the file: cut short means it changed since it was opened.
fn read_error(content: &LocalContent, source: std::io::Error) -> DestinationError {
    match source.kind() {
        std::io::ErrorKind::UnexpectedEof => DestinationError::FileChanged {
            path: content.path.clone(),
        },
        _ => DestinationError::Io {
            path: content.path.clone(),
            source,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[tokio::test]
    async fn an_unreachable_endpoint_says_so() {
        // Port 1 on loopback: nothing listens, the connection is refused at once.
        std::env::set_var("AWS_ACCESS_KEY_ID", "test");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
        let dest = S3Destination::connect(S3Settings {
            bucket: "airflow".into(),
            prefix: "logs".into(),
            endpoint: Some("http://127.0.0.1:1".into()),
            region: Some("us-east-1".into()),
            path_style: true,
            create_bucket: false,
            multipart_threshold: 16 * MIB,
            part_size: 8 * MIB,
            concurrency: 2,
            conditional_writes: true,
        })
        .await;
        assert_eq!(dest.id(), "s3://airflow/logs");
        let err = dest.check().await.unwrap_err();
        assert!(err.is_unreachable(), "{err}");
        assert!(err.to_string().contains("http://127.0.0.1:1"), "{err}");
    }
}
