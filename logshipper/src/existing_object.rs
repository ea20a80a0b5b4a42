//! What to do when the destination already holds an object under a file's key, as it does
//! when Airflow's own remote logging uploaded the log first, or we shipped an earlier version.
//!
//! The rule never replaces an object with less and never loses a byte:
//!
//! 1. No object: upload.
//! 2. The object holds exactly the file's bytes: record the file as shipped, upload nothing.
//! 3. The object is a strict byte-prefix of the file: overwrite it. Airflow only appends to a
//!    log, so this is the same log with more lines (Airflow uploaded before the last lines, a
//!    resumed attempt appended, or we shipped an earlier version).
//! 4. The file is a strict byte-prefix of the object: keep the object, it already holds every
//!    byte of the file; record the file as shipped.
//! 5. Otherwise they differ: keep the object untouched and upload the file beside it as
//!    `<key>.localship-conflict-<first 16 hex of the file's SHA-256>`, and count a conflict.
//!    Airflow's reader lists every key that starts with the log's key and shows them one after
//!    the other, so the UI shows both versions instead of hiding one. Being named by content,
//!    the copy is never overwritten with other bytes; if the file changes again, the next
//!    version gets its own copy.

use crate::key::conflict_key;

/// Which prefix must be hashed to compare a file with an object of another size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefixCheck {
    /// Same size: compare whole hashes.
    None,
    /// The object is shorter: hash the file's first `n` bytes.
    FileFirst(u64),
    /// The file is shorter: hash the object's first `n` bytes.
    ObjectFirst(u64),
}

pub fn prefix_check(file_size: u64, object_size: u64) -> PrefixCheck {
    match object_size.cmp(&file_size) {
        std::cmp::Ordering::Equal => PrefixCheck::None,
        std::cmp::Ordering::Less => PrefixCheck::FileFirst(object_size),
        std::cmp::Ordering::Greater => PrefixCheck::ObjectFirst(file_size),
    }
}

/// How the object under the key relates to the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Relation {
    Absent,
    Same,
    ObjectIsPrefix,
    FileIsPrefix,
    Diverged,
}

/// Size and SHA-256 (hex) of some bytes.
#[derive(Clone, Copy, Debug)]
pub struct Content<'a> {
    pub size: u64,
    pub sha256: &'a str,
}

/// Relates `file` to `object`. `prefix_sha256` is the hash asked for by [`prefix_check`]:
/// of the file's first bytes when the object is shorter, of the object's when it is longer.
pub fn relation(file: Content, object: Option<Content>, prefix_sha256: Option<&str>) -> Relation {
    let Some(object) = object else {
        return Relation::Absent;
    };
    match prefix_check(file.size, object.size) {
        PrefixCheck::None if object.sha256 == file.sha256 => Relation::Same,
        PrefixCheck::FileFirst(_) if prefix_sha256 == Some(object.sha256) => {
            Relation::ObjectIsPrefix
        }
        PrefixCheck::ObjectFirst(_) if prefix_sha256 == Some(file.sha256) => Relation::FileIsPrefix,
        _ => Relation::Diverged,
    }
}

/// What shipping a file does about the object under its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Write the file to `key` (new, or replacing a prefix of it).
    Upload { key: String, replaces: bool },
    /// The object under `key` already holds the file's bytes; record, do not upload.
    Keep { key: String },
    /// Keep the object; write the file to the conflict key beside it.
    Beside { key: String },
}

pub fn plan(relation: Relation, key: &str, file_sha256: &str) -> Plan {
    let key = key.to_owned();
    match relation {
        Relation::Absent => Plan::Upload {
            key,
            replaces: false,
        },
        Relation::ObjectIsPrefix => Plan::Upload {
            key,
            replaces: true,
        },
        Relation::Same | Relation::FileIsPrefix => Plan::Keep { key },
        Relation::Diverged => Plan::Beside {
            key: conflict_key(&key, file_sha256),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaa";
    const B: &str = "bbbb";
    const KEY: &str = "logs/dag_id=a/run_id=r/task_id=t/attempt=1.log";

    fn c(size: u64, sha256: &str) -> Content<'_> {
        Content { size, sha256 }
    }

    #[test]
    fn prefix_checks() {
        assert_eq!(prefix_check(10, 10), PrefixCheck::None);
        assert_eq!(prefix_check(10, 4), PrefixCheck::FileFirst(4));
        assert_eq!(prefix_check(4, 10), PrefixCheck::ObjectFirst(4));
        assert_eq!(prefix_check(10, 0), PrefixCheck::FileFirst(0));
    }

    #[test]
    fn relations() {
        assert_eq!(relation(c(10, A), None, None), Relation::Absent);
        assert_eq!(relation(c(10, A), Some(c(10, A)), None), Relation::Same);
        assert_eq!(relation(c(10, A), Some(c(10, B)), None), Relation::Diverged);
        // Object shorter; the file's first 4 bytes hash to the object's hash.
        assert_eq!(
            relation(c(10, A), Some(c(4, B)), Some(B)),
            Relation::ObjectIsPrefix
        );
        assert_eq!(
            relation(c(10, A), Some(c(4, B)), Some(A)),
            Relation::Diverged
        );
        // Object longer; the object's first 10 bytes hash to the file's hash.
        assert_eq!(
            relation(c(10, A), Some(c(20, B)), Some(A)),
            Relation::FileIsPrefix
        );
        assert_eq!(
            relation(c(10, A), Some(c(20, B)), Some(B)),
            Relation::Diverged
        );
        // A missing prefix hash never counts as a match.
        assert_eq!(relation(c(10, A), Some(c(4, B)), None), Relation::Diverged);
    }

    #[test]
    fn plans_never_replace_with_less() {
        let sha = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert_eq!(
            plan(Relation::Absent, KEY, sha),
            Plan::Upload {
                key: KEY.into(),
                replaces: false
            }
        );
        assert_eq!(
            plan(Relation::ObjectIsPrefix, KEY, sha),
            Plan::Upload {
                key: KEY.into(),
                replaces: true
            }
        );
        assert_eq!(
            plan(Relation::Same, KEY, sha),
            Plan::Keep { key: KEY.into() }
        );
        assert_eq!(
            plan(Relation::FileIsPrefix, KEY, sha),
            Plan::Keep { key: KEY.into() }
        );
        let Plan::Beside { key } = plan(Relation::Diverged, KEY, sha) else {
            panic!("a diverged object must be kept");
        };
        assert!(key.starts_with(KEY) && key != KEY, "{key}");
    }
}
