//! Multipart uploads: parts streamed from disk in order and sent a few at a time, each with
//! the CRC-64/NVME computed by the read that hashed the file (before, or while, the parts go).
//! The server refuses a part whose bytes do not match, so a file changed since it was hashed
//! cannot be stored under its hash; the upload is completed only if every part arrived, and
//! aborted otherwise.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::complete_multipart_upload::CompleteMultipartUploadOutput;
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{ChecksumAlgorithm, ChecksumType, CompletedMultipartUpload, CompletedPart};
use crc_fast::CrcAlgorithm;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{base64, blocking_read, read_error, S3Destination, MIN_PART_SIZE};
use crate::destination::{DestinationError, LocalContent, ObjectInfo, SHA256_METADATA};
use crate::file_hash::{hash_for_upload, hash_in_parts, Extra, Parts};

/// Most parts S3 accepts in one multipart upload.
const MAX_PARTS: u64 = 10_000;

/// Read size when streaming a part from disk.
const STREAM_CHUNK: usize = 256 << 10;

type PartResult = (
    u64,
    String,
    Result<
        aws_sdk_s3::operation::upload_part::UploadPartOutput,
        SdkError<aws_sdk_s3::operation::upload_part::UploadPartError>,
    >,
);

impl S3Destination {
    /// Part size for a file of `size` bytes, if it goes in parts.
    pub(super) fn multipart_part_size(&self, size: u64) -> Option<u64> {
        (size >= self.settings.multipart_threshold)
            .then(|| part_plan(size, self.settings.part_size).0)
    }

    /// Uploads a file already hashed; its SHA-256 goes into the object's metadata.
    pub(super) async fn put_multipart(
        &self,
        key: &str,
        content: &LocalContent,
    ) -> Result<ObjectInfo, DestinationError> {
        let parts = self.parts_of(content).await?;
        let (crcs, checksums) = mpsc::unbounded_channel();
        for &crc in &parts.crc64 {
            let _ = crcs.send(crc);
        }
        drop(crcs);
        let upload_id = self.create_upload(key, Some(&content.sha256)).await?;
        let sent = self
            .upload_parts(key, &upload_id, content, &parts_count(&parts), checksums)
            .await;
        let whole = base64(&whole_crc64(&parts, content.size).to_be_bytes());
        let out = self.complete(key, &upload_id, sent, &whole).await?;
        Ok(object_info(content, out, &whole))
    }

    /// Uploads a file while it is being hashed: each part goes as soon as the read that
    /// hashes the file has passed it, so sending starts at once instead of after a whole
    /// read (measured in BENCHMARKS.md, S2). The SHA-256 is known only at the end, too late for the object's
    /// metadata; it goes to the ledger, which tells the object by its ETag.
    pub(super) async fn put_multipart_hashing(
        &self,
        key: &str,
        file: Arc<File>,
        path: PathBuf,
        size: u64,
    ) -> Result<(LocalContent, ObjectInfo), DestinationError> {
        let (part_size, count) = part_plan(size, self.settings.part_size);
        let (crcs, checksums) = mpsc::unbounded_channel();
        let mut content = LocalContent::new(file, path, size, String::new(), Extra::Nothing);
        let hashing = {
            let file = content.file.clone();
            tokio::task::spawn_blocking(move || {
                hash_in_parts(&file, size, part_size, |crc| {
                    let _ = crcs.send(crc);
                })
            })
        };
        let upload_id = self.create_upload(key, None).await?;
        let sent = self
            .upload_parts(key, &upload_id, &content, &(part_size, count), checksums)
            .await;
        let hashed = hashing
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        let (sha256, parts) = match hashed {
            Ok(hashed) => hashed,
            Err(source) => {
                self.abort(key, &upload_id).await;
                return Err(read_error(&content, source));
            }
        };
        let whole = base64(&whole_crc64(&parts, size).to_be_bytes());
        let out = self.complete(key, &upload_id, sent, &whole).await?;
        content.sha256 = sha256;
        content.parts = Some(parts);
        let info = object_info(&content, out, &whole);
        Ok((content, info))
    }

    async fn create_upload(
        &self,
        key: &str,
        sha256: Option<&str>,
    ) -> Result<String, DestinationError> {
        let mut request = self
            .client
            .create_multipart_upload()
            .bucket(self.bucket())
            .key(key)
            .checksum_algorithm(ChecksumAlgorithm::Crc64Nvme)
            .checksum_type(ChecksumType::FullObject);
        if let Some(sha256) = sha256 {
            request = request.metadata(SHA256_METADATA, sha256);
        }
        let created = request
            .send()
            .await
            .map_err(|e| self.classify("CreateMultipartUpload", key, e))?;
        Ok(created.upload_id().unwrap_or_default().to_owned())
    }

    /// Completes the upload if every part was sent, with the whole object's checksum the
    /// store must agree with; aborts it otherwise.
    async fn complete(
        &self,
        key: &str,
        upload_id: &str,
        sent: Result<Vec<CompletedPart>, DestinationError>,
        whole: &str,
    ) -> Result<CompleteMultipartUploadOutput, DestinationError> {
        let completed = match sent {
            Ok(sent) => self
                .client
                .complete_multipart_upload()
                .bucket(self.bucket())
                .key(key)
                .upload_id(upload_id)
                .checksum_type(ChecksumType::FullObject)
                .checksum_crc64_nvme(whole)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(sent))
                        .build(),
                )
                .send()
                .await
                .map_err(|e| self.classify("CompleteMultipartUpload", key, e)),
            Err(e) => Err(e),
        };
        if completed.is_err() {
            self.abort(key, upload_id).await;
        }
        completed
    }

    /// The part checksums from the read that hashed the file, or, when that read did not
    /// compute them for this plan, from a new read that must hash the same.
    async fn parts_of(&self, content: &LocalContent) -> Result<Parts, DestinationError> {
        let (part_size, count) = part_plan(content.size, self.settings.part_size);
        if let Some(parts) = &content.parts {
            if parts.size == part_size && parts.crc64.len() as u64 == count {
                return Ok(parts.clone());
            }
        }
        let (file, size) = (content.file.clone(), content.size);
        let (sha, extra) = blocking_read(content, move || {
            hash_for_upload(&file, size, 0, Some(part_size))
        })
        .await?;
        match extra {
            Extra::Parts(parts) if sha == content.sha256 => Ok(parts),
            _ => Err(DestinationError::FileChanged {
                path: content.path.clone(),
            }),
        }
    }

    /// Sends `count` parts of `size` bytes concurrently, each with the checksum that comes
    /// next from `checksums`; each part holds a request permit from read to upload.
    async fn upload_parts(
        &self,
        key: &str,
        upload_id: &str,
        content: &LocalContent,
        &(size, count): &(u64, u64),
        mut checksums: mpsc::UnboundedReceiver<u64>,
    ) -> Result<Vec<CompletedPart>, DestinationError> {
        let mut running = JoinSet::new();
        let mut sent = Vec::with_capacity(count as usize);
        for index in 0..count {
            let number = index + 1;
            let permit = self
                .requests
                .clone()
                .acquire_owned()
                .await
                .expect("never closed");
            while let Some(done) = running.try_join_next() {
                sent.push(self.finish_part(key, content, done)?);
            }
            // No checksum: the read stopped early; the hashing's own error tells why.
            let Some(crc) = checksums.recv().await else {
                return Err(DestinationError::FileChanged {
                    path: content.path.clone(),
                });
            };
            let offset = index * size;
            let len = size.min(content.size - offset);
            let body = part_body(content, offset, len).await?;
            let checksum = base64(&crc.to_be_bytes());
            let request = self
                .client
                .upload_part()
                .bucket(self.bucket())
                .key(key)
                .upload_id(upload_id)
                .part_number(number as i32)
                .content_length(len as i64)
                .checksum_crc64_nvme(&checksum)
                .body(body)
                .customize()
                .disable_payload_signing();
            running.spawn(async move {
                let _permit = permit;
                (number, checksum, request.send().await)
            });
        }
        while let Some(done) = running.join_next().await {
            sent.push(self.finish_part(key, content, done)?);
        }
        sent.sort_by_key(|p| p.part_number());
        Ok(sent)
    }

    fn finish_part(
        &self,
        key: &str,
        content: &LocalContent,
        done: Result<PartResult, tokio::task::JoinError>,
    ) -> Result<CompletedPart, DestinationError> {
        let (number, checksum, sent) = done.map_err(|e| DestinationError::Io {
            path: key.into(),
            source: std::io::Error::other(e),
        })?;
        let out = match sent {
            Ok(out) => out,
            // The bytes read now are not the bytes hashed before.
            Err(SdkError::ServiceError(e)) if checksum_mismatch(e.err().code()) => {
                return Err(DestinationError::FileChanged {
                    path: content.path.clone(),
                })
            }
            Err(e) => return Err(self.classify("UploadPart", key, e)),
        };
        Ok(CompletedPart::builder()
            .part_number(number as i32)
            .set_e_tag(out.e_tag().map(str::to_owned))
            .checksum_crc64_nvme(checksum)
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

/// A part streamed from the file in chunks, so memory does not grow with the part size.
/// The file is reopened through its descriptor, never by its path: the bytes are those of
/// the file that was hashed even if its name now points elsewhere. Each retry reopens it.
async fn part_body(
    content: &LocalContent,
    offset: u64,
    len: u64,
) -> Result<ByteStream, DestinationError> {
    let own = format!("/proc/self/fd/{}", content.file.as_raw_fd());
    ByteStream::read_from()
        .path(own)
        .offset(offset)
        .length(Length::Exact(len))
        .buffer_size(STREAM_CHUNK)
        .build()
        .await
        .map_err(|e| match std::error::Error::source(&e) {
            // The file is shorter than when it was hashed.
            None => DestinationError::FileChanged {
                path: content.path.clone(),
            },
            Some(_) => DestinationError::Io {
                path: content.path.clone(),
                source: std::io::Error::other(e),
            },
        })
}

/// What a completed upload stored, confirmed when the store's checksum of the whole object
/// is ours: every part was checked on arrival against the checksum of the bytes that were
/// hashed, and the whole object's checksum shows it is exactly those parts in that order.
fn object_info(
    content: &LocalContent,
    out: CompleteMultipartUploadOutput,
    whole: &str,
) -> ObjectInfo {
    ObjectInfo {
        size: content.size,
        sha256: Some(content.sha256.clone()),
        etag: out.e_tag().map(str::to_owned),
        version_id: out.version_id().map(str::to_owned),
        confirmed: out.checksum_crc64_nvme() == Some(whole),
    }
}

fn parts_count(parts: &Parts) -> (u64, u64) {
    (parts.size, parts.crc64.len() as u64)
}

/// AWS S3 answers a checksum that does not match the body with `BadDigest`, MinIO with
/// `XAmzContentChecksumMismatch`.
fn checksum_mismatch(code: Option<&str>) -> bool {
    matches!(code, Some("BadDigest" | "XAmzContentChecksumMismatch"))
}

/// Part size and count for a file: the configured size, grown if the file would need more
/// parts than S3 allows.
fn part_plan(size: u64, part_size: u64) -> (u64, u64) {
    let part_size = part_size.max(MIN_PART_SIZE).max(size.div_ceil(MAX_PARTS));
    (part_size, size.div_ceil(part_size).max(1))
}

/// CRC-64/NVME of the whole file, combined from its parts' (S3's full-object checksum).
fn whole_crc64(parts: &Parts, size: u64) -> u64 {
    let mut left = size;
    let mut whole = crc_fast::checksum(CrcAlgorithm::Crc64Nvme, b"");
    for &crc in &parts.crc64 {
        let len = parts.size.min(left);
        whole = crc_fast::checksum_combine(CrcAlgorithm::Crc64Nvme, whole, crc, len);
        left -= len;
    }
    whole
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
    fn the_whole_checksum_combines_the_parts_in_order() {
        let bytes: Vec<u8> = (0..2500u32).map(|i| (i * 13 % 241) as u8).collect();
        let crc = |b: &[u8]| crc_fast::checksum(CrcAlgorithm::Crc64Nvme, b);
        let parts = Parts {
            size: 1000,
            crc64: vec![
                crc(&bytes[..1000]),
                crc(&bytes[1000..2000]),
                crc(&bytes[2000..]),
            ],
        };
        assert_eq!(whole_crc64(&parts, 2500), crc(&bytes));
        let swapped = Parts {
            size: 1000,
            crc64: vec![parts.crc64[1], parts.crc64[0], parts.crc64[2]],
        };
        assert_ne!(whole_crc64(&swapped, 2500), crc(&bytes));
        let empty = Parts {
            size: 1000,
            crc64: vec![crc(b"")],
        };
        assert_eq!(whole_crc64(&empty, 0), crc(b""));
    }

    #[test]
    fn a_checksum_mismatch_is_told_apart() {
        assert!(checksum_mismatch(Some("BadDigest")));
        assert!(checksum_mismatch(Some("XAmzContentChecksumMismatch")));
        assert!(!checksum_mismatch(Some("InternalError")));
        assert!(!checksum_mismatch(None));
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
