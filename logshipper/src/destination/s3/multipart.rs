//! Multipart uploads: parts read from disk in order and sent a few at a time, each with its
//! own SHA-256; the upload is completed only if every part arrived and the bytes read still
//! hash to the file's SHA-256, and aborted otherwise.

use aws_sdk_s3::error::{DisplayErrorContext, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use base64::Engine;
use sha2::{Digest, Sha256};
use tokio::task::JoinSet;

use super::{base64, blocking_read, S3Destination, MIN_PART_SIZE};
use crate::destination::{DestinationError, LocalContent, ObjectInfo, SHA256_METADATA};
use crate::local_file::read_at;

/// Most parts S3 accepts in one multipart upload.
const MAX_PARTS: u64 = 10_000;

type PartResult = (
    u64,
    String,
    Result<
        aws_sdk_s3::operation::upload_part::UploadPartOutput,
        SdkError<aws_sdk_s3::operation::upload_part::UploadPartError>,
    >,
);

impl S3Destination {
    pub(super) async fn put_multipart(
        &self,
        key: &str,
        content: &LocalContent,
    ) -> Result<ObjectInfo, DestinationError> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(self.bucket())
            .key(key)
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .metadata(SHA256_METADATA, &content.sha256)
            .send()
            .await
            .map_err(|e| self.classify("CreateMultipartUpload", key, e))?;
        let upload_id = created.upload_id().unwrap_or_default().to_owned();
        let mut composite = None;
        let completed = match self.upload_parts(key, &upload_id, content).await {
            Ok(parts) => {
                composite = Some(composite_checksum(&parts));
                self.client
                    .complete_multipart_upload()
                    .bucket(self.bucket())
                    .key(key)
                    .upload_id(&upload_id)
                    .multipart_upload(
                        CompletedMultipartUpload::builder()
                            .set_parts(Some(parts))
                            .build(),
                    )
                    .send()
                    .await
                    .map_err(|e| self.classify("CompleteMultipartUpload", key, e))
            }
            Err(e) => Err(e),
        };
        match completed {
            Ok(out) => Ok(ObjectInfo {
                size: content.size,
                sha256: Some(content.sha256.clone()),
                etag: out.e_tag().map(str::to_owned),
                version_id: out.version_id().map(str::to_owned),
                // Every part was checked against its SHA-256 on arrival and the bytes read
                // hashed to the file's; the checksum of the part checksums shows the object
                // is exactly those parts in that order.
                confirmed: composite.is_some() && out.checksum_sha256() == composite.as_deref(),
            }),
            Err(e) => {
                self.abort(key, &upload_id).await;
                Err(e)
            }
        }
    }

    /// Reads parts in order (hashing the whole file on the way, to catch a change) and uploads
    /// them concurrently; each part holds a request permit from read to upload.
    async fn upload_parts(
        &self,
        key: &str,
        upload_id: &str,
        content: &LocalContent,
    ) -> Result<Vec<CompletedPart>, DestinationError> {
        let (part_size, count) = part_plan(content.size, self.settings.part_size);
        let mut whole = Sha256::new();
        let mut running = JoinSet::new();
        let mut parts = Vec::with_capacity(count as usize);
        for number in 1..=count {
            let permit = self
                .requests
                .clone()
                .acquire_owned()
                .await
                .expect("never closed");
            while let Some(done) = running.try_join_next() {
                parts.push(self.finish_part(key, done)?);
            }
            let offset = (number - 1) * part_size;
            let len = part_size.min(content.size - offset) as usize;
            let file = content.file.clone();
            let (data, sha, hashed) = blocking_read(content, move || {
                let data = read_at(&file, offset, len)?;
                whole.update(&data);
                let sha = Sha256::digest(&data);
                Ok((data, sha, whole))
            })
            .await?;
            whole = hashed;
            let checksum = base64(&sha);
            let request = self
                .client
                .upload_part()
                .bucket(self.bucket())
                .key(key)
                .upload_id(upload_id)
                .part_number(number as i32)
                .content_length(len as i64)
                .checksum_sha256(&checksum)
                .body(ByteStream::from(data))
                .customize()
                .disable_payload_signing();
            running.spawn(async move {
                let _permit = permit;
                (number, checksum, request.send().await)
            });
        }
        while let Some(done) = running.join_next().await {
            parts.push(self.finish_part(key, done)?);
        }
        if hex::encode(whole.finalize()) != content.sha256 {
            return Err(DestinationError::FileChanged {
                path: content.path.clone(),
            });
        }
        parts.sort_by_key(|p| p.part_number());
        Ok(parts)
    }

    fn finish_part(
        &self,
        key: &str,
        done: Result<PartResult, tokio::task::JoinError>,
    ) -> Result<CompletedPart, DestinationError> {
        let (number, checksum, sent) = done.map_err(|e| DestinationError::Io {
            path: key.into(),
            source: std::io::Error::other(e),
        })?;
        let out = sent.map_err(|e| self.classify("UploadPart", key, e))?;
        Ok(CompletedPart::builder()
            .part_number(number as i32)
            .set_e_tag(out.e_tag().map(str::to_owned))
            .checksum_sha256(checksum)
            .build())
    }

    async fn abort(&self, key: &str, upload_id: &str) {
        let aborted = self
            .client
            .abort_multipart_upload()
            .bucket(self.bucket())
            .key(key)
            .upload_id(upload_id)
            .send()
            .await;
        if let Err(e) = aborted {
            // Invisible under the key either way; a lifecycle rule reclaims the parts.
            tracing::warn!(key, upload_id, error = %DisplayErrorContext(&e), "could not abort a multipart upload");
        }
    }
}

/// Part size and count for a file: the configured size, grown if the file would need more
/// parts than S3 allows.
fn part_plan(size: u64, part_size: u64) -> (u64, u64) {
    let part_size = part_size.max(MIN_PART_SIZE).max(size.div_ceil(MAX_PARTS));
    (part_size, size.div_ceil(part_size).max(1))
}

/// S3's checksum of a multipart object: the SHA-256 of the parts' raw SHA-256 digests in
/// order, then `-<number of parts>`.
fn composite_checksum(parts: &[CompletedPart]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        let digest = part
            .checksum_sha256()
            .and_then(|c| base64::engine::general_purpose::STANDARD.decode(c).ok())
            .unwrap_or_default();
        hasher.update(digest);
    }
    format!("{}-{}", base64(&hasher.finalize()), parts.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn parts_cover_the_file() {
        assert_eq!(part_plan(16 * MIB, 8 * MIB), (8 * MIB, 2));
        assert_eq!(part_plan(16 * MIB + 1, 8 * MIB), (8 * MIB, 3));
        assert_eq!(part_plan(0, 8 * MIB), (8 * MIB, 1));
    }

    #[test]
    fn the_composite_checksum_hashes_the_part_digests_in_order() {
        let part = |n: i32, bytes: &[u8]| {
            CompletedPart::builder()
                .part_number(n)
                .checksum_sha256(base64(&Sha256::digest(bytes)))
                .build()
        };
        let parts = [part(1, b"first"), part(2, b"second")];
        let mut both = Sha256::digest(b"first").to_vec();
        both.extend_from_slice(&Sha256::digest(b"second"));
        assert_eq!(
            composite_checksum(&parts),
            format!("{}-2", base64(&Sha256::digest(&both)))
        );
        let swapped = [part(1, b"second"), part(2, b"first")];
        assert_ne!(composite_checksum(&swapped), composite_checksum(&parts));
    }

    #[test]
    fn parts_are_never_below_the_s3_minimum() {
        assert_eq!(part_plan(20 * MIB, MIB), (5 * MIB, 4));
    }

    #[test]
    fn huge_files_fit_in_ten_thousand_parts() {
        let size = 200 * 1024 * MIB;
        let (part_size, count) = part_plan(size, 8 * MIB);
        assert!(count <= MAX_PARTS);
        assert!(part_size * count >= size);
    }
}
