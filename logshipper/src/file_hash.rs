//! One read of a log to be shipped: its SHA-256 and, in the same pass, either its bytes (a
//! small file, sent from memory) or the CRC-64/NVME of each part (a file sent in parts);
//! and reading a file's beginning to compare it with an object.

use std::cell::Cell;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::sync_channel;

use bytes::Bytes;
use crc_fast::CrcAlgorithm;
use sha2::{Digest, Sha256};

/// Read size when hashing or copying.
const CHUNK: usize = 1 << 20;

/// Lowercase hex SHA-256 of the first `len` bytes of `file`; fails if it is shorter.
pub fn sha256_prefix(file: &File, len: u64) -> io::Result<String> {
    let mut hasher = Sha256::new();
    copy_prefix(file, len, |chunk| {
        hasher.update(chunk);
        Ok(())
    })?;
    Ok(hex::encode(hasher.finalize()))
}

/// What one read of a file to be shipped yields besides its SHA-256 (hex).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Extra {
    Nothing,
    /// The bytes themselves, for a file small enough to send from memory.
    Data(Bytes),
    /// The CRC-64/NVME of each part, for a file sent in parts.
    Parts(Parts),
}

/// A file cut into parts of `size` bytes (the last may be shorter) and each part's
/// CRC-64/NVME, the checksum S3 verifies per part; computed in the read that hashes the
/// file, so sending the parts later needs a read but no hashing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parts {
    pub size: u64,
    pub crc64: Vec<u64>,
}

/// SHA-256 (hex) of the first `len` bytes, and in the same read either those bytes (when
/// `len` is below `limit`) or their part checksums (when `part_size` is given).
pub fn hash_for_upload(
    file: &File,
    len: u64,
    limit: u64,
    part_size: Option<u64>,
) -> io::Result<(String, Extra)> {
    if len < limit {
        let data = read_at(file, 0, len as usize)?;
        return Ok((
            hex::encode(Sha256::digest(&data)),
            Extra::Data(Bytes::from(data)),
        ));
    }
    let Some(part_size) = part_size.filter(|&size| size > 0) else {
        return Ok((sha256_prefix(file, len)?, Extra::Nothing));
    };
    let (sha, parts) = hash_in_parts(file, len, part_size, |_| {})?;
    Ok((sha, Extra::Parts(parts)))
}

/// SHA-256 (hex) of the first `len` bytes and, in the same read, the CRC-64/NVME of each
/// part of `part_size` bytes, handed to `on_part` as soon as the part is read, so the part
/// can be sent while the rest is still being hashed.
pub fn hash_in_parts(
    file: &File,
    len: u64,
    part_size: u64,
    mut on_part: impl FnMut(u64),
) -> io::Result<(String, Parts)> {
    let mut sha = Sha256::new();
    let mut crc = crc_fast::Digest::new(CrcAlgorithm::Crc64Nvme);
    let mut crc64 = Vec::with_capacity(len.div_ceil(part_size) as usize);
    let mut left = part_size;
    copy_prefix(file, len, |mut chunk| {
        sha.update(chunk);
        while !chunk.is_empty() {
            let n = chunk.len().min(left as usize);
            crc.update(&chunk[..n]);
            chunk = &chunk[n..];
            left -= n as u64;
            if left == 0 {
                crc64.push(crc.finalize_reset());
                on_part(crc64[crc64.len() - 1]);
                left = part_size;
            }
        }
        Ok(())
    })?;
    if left != part_size || crc64.is_empty() {
        crc64.push(crc.finalize());
        on_part(crc64[crc64.len() - 1]);
    }
    let parts = Parts {
        size: part_size,
        crc64,
    };
    Ok((hex::encode(sha.finalize()), parts))
}

/// Feeds the first `len` bytes of `file` to `sink` in chunks, reading by offset so several
/// readers can share one open file. A large file is read one chunk ahead on a second
/// thread, so copying from the page cache and hashing overlap (BENCHMARKS.md, S2).
pub fn copy_prefix(
    file: &File,
    len: u64,
    mut sink: impl FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<()> {
    if len <= 2 * CHUNK as u64 {
        let spare = Cell::new(Some(vec![0; CHUNK.min(len as usize).max(1)]));
        return read_chunks(
            file,
            len,
            || spare.take(),
            |chunk, n| {
                sink(&chunk[..n])?;
                spare.set(Some(chunk));
                Ok(true)
            },
        );
    }
    std::thread::scope(|scope| {
        let (full, filled) = sync_channel::<io::Result<(Vec<u8>, usize)>>(READ_AHEAD);
        let (free, empty) = sync_channel::<Vec<u8>>(READ_AHEAD + 1);
        for _ in 0..=READ_AHEAD {
            free.send(vec![0; CHUNK]).expect("room for every buffer");
        }
        scope.spawn(move || {
            let done = read_chunks(
                file,
                len,
                || empty.recv().ok(),
                |chunk, n| Ok(full.send(Ok((chunk, n))).is_ok()),
            );
            if let Err(e) = done {
                let _ = full.send(Err(e));
            }
        });
        // Ends when the reader is done or failed; returning early drops both channels, which
        // stops the reader.
        while let Ok(read) = filled.recv() {
            let (chunk, n) = read?;
            sink(&chunk[..n])?;
            let _ = free.send(chunk);
        }
        Ok(())
    })
}

/// Chunks read ahead of the sink for a large file.
const READ_AHEAD: usize = 2;

/// Reads `len` bytes into buffers from `next` and hands each to `put` with its length,
/// stopping early when either gives up (no buffer, or `false`).
fn read_chunks(
    file: &File,
    len: u64,
    mut next: impl FnMut() -> Option<Vec<u8>>,
    mut put: impl FnMut(Vec<u8>, usize) -> io::Result<bool>,
) -> io::Result<()> {
    let mut offset = 0;
    while offset < len {
        let Some(mut buf) = next() else {
            return Ok(());
        };
        let want = buf.len().min((len - offset) as usize);
        let n = file.read_at(&mut buf[..want], offset)?;
        if n == 0 {
            return Err(shorter(len, offset));
        }
        offset += n as u64;
        if !put(buf, n)? {
            return Ok(());
        }
    }
    Ok(())
}

/// Reads exactly `len` bytes at `offset`.
pub fn read_at(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0; len];
    file.read_exact_at(&mut buf, offset)
        .map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => shorter(offset + len as u64, offset),
            _ => e,
        })?;
    Ok(buf)
}

fn shorter(expected: u64, got: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("file shrank while being read: expected {expected} bytes, found about {got}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local_file::open_beneath;

    #[test]
    fn one_read_gives_the_hash_and_either_the_bytes_or_the_part_checksums() {
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..2500u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(dir.path().join("log"), &bytes).unwrap();
        let (file, _) = open_beneath(dir.path(), "log").unwrap();
        let sha = hex::encode(Sha256::digest(&bytes));
        let crc = |b: &[u8]| crc_fast::checksum(CrcAlgorithm::Crc64Nvme, b);

        let small = hash_for_upload(&file, 2500, 4096, None).unwrap();
        assert_eq!(
            small,
            (sha.clone(), Extra::Data(Bytes::from(bytes.clone())))
        );
        let whole = hash_for_upload(&file, 2500, 1000, None).unwrap();
        assert_eq!(whole, (sha.clone(), Extra::Nothing));

        // 1000-byte parts: two whole ones and a short last one, cut across read chunks.
        let (hashed, extra) = hash_for_upload(&file, 2500, 1000, Some(1000)).unwrap();
        assert_eq!(hashed, sha);
        let expected = vec![
            crc(&bytes[..1000]),
            crc(&bytes[1000..2000]),
            crc(&bytes[2000..]),
        ];
        assert_eq!(
            extra,
            Extra::Parts(Parts {
                size: 1000,
                crc64: expected
            })
        );
        // An exact multiple has no empty last part; an empty file has one empty part.
        let (_, extra) = hash_for_upload(&file, 2000, 1000, Some(1000)).unwrap();
        assert!(matches!(extra, Extra::Parts(p) if p.crc64.len() == 2));
        let (_, extra) = hash_for_upload(&file, 0, 0, Some(1000)).unwrap();
        assert_eq!(
            extra,
            Extra::Parts(Parts {
                size: 1000,
                crc64: vec![crc(b"")]
            })
        );
    }

    #[test]
    fn large_files_are_read_ahead_in_order_and_errors_stop_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..(5 * CHUNK + 3) as u32)
            .map(|i| (i % 253) as u8)
            .collect();
        std::fs::write(dir.path().join("big"), &bytes).unwrap();
        let (file, _) = open_beneath(dir.path(), "big").unwrap();
        let len = bytes.len() as u64;
        assert_eq!(
            sha256_prefix(&file, len).unwrap(),
            hex::encode(Sha256::digest(&bytes))
        );
        let mut seen = 0;
        let stopped = copy_prefix(&file, len, |chunk| {
            seen += chunk.len();
            Err(io::Error::other("sink full"))
        });
        assert_eq!(stopped.unwrap_err().to_string(), "sink full");
        assert_eq!(seen, CHUNK);
        let short = sha256_prefix(&file, len + 1).unwrap_err();
        assert_eq!(short.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn hashing_more_than_the_file_holds_fails() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("log"), b"hello\n").unwrap();
        let (file, _) = open_beneath(dir.path(), "log").unwrap();
        assert!(sha256_prefix(&file, 7).is_err());
        assert!(read_at(&file, 4, 3).is_err());
    }
}
