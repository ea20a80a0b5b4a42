//! Map a file's path under a source root to its object key.
//!
//! Airflow's remote log reader looks for `<remote_base_log_folder>/<relative path>` and reads
//! every key that starts with it, so the key is the relative path exactly as Airflow wrote it:
//! run ids keep their `:` and `+` (the SDK percent-encodes them on the wire, not in the key).

use std::path::{Component, Path};

/// Suffix of the key a file goes to when the destination already holds different bytes under
/// its own key (see `existing_object`).
const CONFLICT_MARK: &str = ".localship-conflict-";

/// Suffix of the side key a log that may still grow goes to beside Airflow's own uploads
/// (see `alongside`), followed by the writer's id.
const SIDE_MARK: &str = ".localship-part-";

/// Hex digits of a writer's id in a side key.
const WRITER_DIGITS: usize = 12;

/// Hex digits of the file's SHA-256 in a conflict key: enough that two versions never collide.
const CONFLICT_SHA_DIGITS: usize = 16;

/// The longest an S3 object key may be, in bytes of UTF-8.
pub const S3_MAX_KEY_BYTES: usize = 1024;

/// Whether `key`, and every key derived from it (side and conflict keys), stays within
/// `max` bytes: a log whose derived key would not fit is refused whole, before any upload.
pub fn fits(key: &str, max: usize) -> bool {
    let longest_suffix =
        (SIDE_MARK.len() + WRITER_DIGITS).max(CONFLICT_MARK.len() + CONFLICT_SHA_DIGITS);
    key.len() + longest_suffix <= max
}

/// Why a path cannot become an object key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("`{0}` is absolute; only paths inside a source root have keys")]
    Absolute(String),
    #[error("`{0}` leaves its directory through `..`")]
    ParentDir(String),
    #[error("`{0}` is not valid UTF-8, which object keys must be; rename the file")]
    NotUtf8(String),
    #[error("`{0}` holds a control character (newline, tab, …); rename the file")]
    ControlChar(String),
    #[error("the path is empty")]
    Empty,
}

/// What kind of Airflow log a relative path is, from its shape alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogKind {
    /// `dag_id=…/run_id=…/task_id=…/[map_index=…/]attempt=<n>.log`
    Task,
    /// `…/attempt=<n>.log.trigger.<id>.log`, written by the triggerer.
    Trigger,
    /// `scheduler/…`
    Scheduler,
    /// `dag_processor/…` (Airflow 3) or `dag_processor_manager/…` (Airflow 2).
    DagProcessor,
    Other,
}

impl LogKind {
    pub fn label(self) -> &'static str {
        match self {
            LogKind::Task => "task",
            LogKind::Trigger => "trigger",
            LogKind::Scheduler => "scheduler",
            LogKind::DagProcessor => "dag_processor",
            LogKind::Other => "other",
        }
    }
}

/// Checks a path relative to a source root and returns it `/`-joined, ready to be a key.
pub fn relative_key(relative: &Path) -> Result<String, KeyError> {
    let shown = || relative.to_string_lossy().into_owned();
    let mut parts = Vec::new();
    for component in relative.components() {
        match component {
            Component::Normal(name) => {
                let name = name.to_str().ok_or_else(|| KeyError::NotUtf8(shown()))?;
                if name.chars().any(char::is_control) {
                    return Err(KeyError::ControlChar(shown()));
                }
                parts.push(name);
            }
            Component::CurDir => {}
            Component::ParentDir => return Err(KeyError::ParentDir(shown())),
            Component::RootDir | Component::Prefix(_) => return Err(KeyError::Absolute(shown())),
        }
    }
    if parts.is_empty() {
        return Err(KeyError::Empty);
    }
    Ok(parts.join("/"))
}

/// Normalises a destination prefix: no leading, trailing or doubled `/`.
pub fn normalize_prefix(prefix: &str) -> String {
    prefix
        .split('/')
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join("/")
}

/// `<prefix>/<relative>`, or just `<relative>` when the prefix is empty.
pub fn object_key(prefix: &str, relative: &str) -> String {
    if prefix.is_empty() {
        relative.to_owned()
    } else {
        format!("{prefix}/{relative}")
    }
}

/// The key a file goes to when its own key holds different bytes: a sibling that starts with
/// the original key, so Airflow's reader (which reads every key starting with the log's key)
/// shows both versions, and named by content, so it is never overwritten with other bytes.
pub fn conflict_key(key: &str, sha256_hex: &str) -> String {
    let digits = &sha256_hex[..sha256_hex.len().min(CONFLICT_SHA_DIGITS)];
    format!("{key}{CONFLICT_MARK}{digits}")
}

/// The side key of one writer's part of a log: a sibling that starts with the log's key, so
/// Airflow's reader shows it, and is distinct per writer, so workers never overwrite each
/// other's parts.
pub fn side_key(key: &str, writer: &str) -> String {
    format!("{key}{SIDE_MARK}{writer}")
}

/// Whether `key` is a side key rather than a log's own (or conflict) key.
pub fn is_side_key(key: &str) -> bool {
    key.rsplit_once(SIDE_MARK).is_some_and(|(_, writer)| {
        writer.len() == WRITER_DIGITS && writer.bytes().all(|b| b.is_ascii_hexdigit())
    })
}

/// A writer's id: the same for one source on one host across restarts, different between
/// hosts and between sources (two workers' volumes), so their side keys never meet.
pub fn writer_id(host: &str, source: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{host}\0{source}"));
    hex::encode(digest)[..WRITER_DIGITS].to_owned()
}

/// Tells task, triggerer, scheduler and dag-processor logs apart.
pub fn log_kind(relative: &str) -> LogKind {
    let first = relative.split('/').next().unwrap_or_default();
    let last = relative.rsplit('/').next().unwrap_or_default();
    match first {
        "scheduler" => return LogKind::Scheduler,
        "dag_processor" | "dag_processor_manager" => return LogKind::DagProcessor,
        _ => {}
    }
    if !first.starts_with("dag_id=") {
        return LogKind::Other;
    }
    let Some(rest) = last.strip_prefix("attempt=") else {
        return LogKind::Other;
    };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return LogKind::Other;
    }
    match &rest[digits..] {
        ".log" => LogKind::Task,
        tail if tail.starts_with(".log.trigger.") && tail.ends_with(".log") => LogKind::Trigger,
        _ => LogKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn side_keys_start_with_the_logs_key_and_differ_per_writer() {
        let key = "logs/dag_id=a/run_id=r/task_id=t/attempt=1.log";
        let (one, two) = (writer_id("node-a", "/v/1"), writer_id("node-b", "/v/1"));
        assert_ne!(one, two);
        assert_eq!(one, writer_id("node-a", "/v/1"));
        assert_ne!(one, writer_id("node-a", "/v/2"));
        let side = side_key(key, &one);
        assert!(side.starts_with(key) && is_side_key(&side), "{side}");
        assert!(!is_side_key(key));
        assert!(!is_side_key(&conflict_key(key, &"ab".repeat(32))));
    }
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    use std::path::PathBuf;

    const MANUAL: &str =
        "dag_id=etl/run_id=manual__2024-01-01T00:00:00+00:00/task_id=load/attempt=1.log";

    fn key(relative: &str) -> Result<String, KeyError> {
        relative_key(Path::new(relative))
    }

    #[test]
    fn airflow_paths_map_to_themselves() {
        let cases = [
            MANUAL,
            "dag_id=etl/run_id=scheduled__2024-03-05T06:00:00+00:00/task_id=extract/attempt=3.log",
            "dag_id=etl/run_id=scheduled__2024-03-05T06:00:00+00:00/task_id=fan/map_index=17/attempt=2.log",
            "dag_id=etl/run_id=manual__2024-01-01T00:00:00+00:00/task_id=wait/attempt=1.log.trigger.42.log",
            "dag_id=etl/run_id=dataset_triggered__2024-01-01T00:00:00.123456+00:00/task_id=t/attempt=1.log",
            "dag_id=my.dag-v2/run_id=backfill__2024-01-01T00:00:00+00:00/task_id=group.task/attempt=10.log",
        ];
        for relative in cases {
            assert_eq!(key(relative).unwrap(), relative);
            assert_eq!(
                object_key("logs", &key(relative).unwrap()),
                format!("logs/{relative}")
            );
        }
    }

    #[test]
    fn run_id_characters_are_not_encoded() {
        let k = object_key("airflow/logs", &key(MANUAL).unwrap());
        assert!(
            k.contains("run_id=manual__2024-01-01T00:00:00+00:00/"),
            "{k}"
        );
        assert!(!k.contains('%'));
    }

    #[test]
    fn prefix_is_normalised() {
        assert_eq!(normalize_prefix(""), "");
        assert_eq!(normalize_prefix("/"), "");
        assert_eq!(normalize_prefix("/logs/"), "logs");
        assert_eq!(normalize_prefix("a//b/"), "a/b");
        assert_eq!(object_key("", "x/attempt=1.log"), "x/attempt=1.log");
        assert_eq!(object_key(&normalize_prefix("logs/"), "x"), "logs/x");
    }

    #[test]
    fn curdir_components_are_dropped() {
        assert_eq!(
            key("./dag_id=a/./attempt=1.log").unwrap(),
            "dag_id=a/attempt=1.log"
        );
    }

    #[test]
    fn unsafe_paths_are_rejected() {
        assert!(matches!(key("/etc/passwd"), Err(KeyError::Absolute(_))));
        assert!(matches!(
            key("dag_id=a/../../etc/passwd"),
            Err(KeyError::ParentDir(_))
        ));
        assert!(matches!(
            key("dag_id=a/attempt=1\n.log"),
            Err(KeyError::ControlChar(_))
        ));
        assert!(matches!(
            key("dag_id=a/attempt=1\t.log"),
            Err(KeyError::ControlChar(_))
        ));
        assert!(matches!(
            key("dag_id=a/\u{7f}.log"),
            Err(KeyError::ControlChar(_))
        ));
        assert_eq!(key(""), Err(KeyError::Empty));
        assert_eq!(key("."), Err(KeyError::Empty));
        let not_utf8: PathBuf = Path::new("dag_id=a").join(OsStr::from_bytes(b"attempt=\xff.log"));
        assert!(matches!(relative_key(&not_utf8), Err(KeyError::NotUtf8(_))));
    }

    #[test]
    fn conflict_key_starts_with_the_key() {
        let sha = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let k = conflict_key("logs/dag_id=a/attempt=1.log", sha);
        assert_eq!(
            k,
            "logs/dag_id=a/attempt=1.log.localship-conflict-0123456789abcdef"
        );
        assert!(k.starts_with("logs/dag_id=a/attempt=1.log"));
    }

    #[test]
    fn log_kinds() {
        assert_eq!(log_kind(MANUAL), LogKind::Task);
        assert_eq!(
            log_kind("dag_id=a/run_id=r/task_id=t/map_index=3/attempt=2.log"),
            LogKind::Task
        );
        assert_eq!(
            log_kind("dag_id=a/run_id=r/task_id=t/attempt=1.log.trigger.7.log"),
            LogKind::Trigger
        );
        assert_eq!(
            log_kind("scheduler/2024-01-01/etl.py.log"),
            LogKind::Scheduler
        );
        assert_eq!(log_kind("scheduler/latest"), LogKind::Scheduler);
        assert_eq!(
            log_kind("dag_processor_manager/dag_processor_manager.log"),
            LogKind::DagProcessor
        );
        assert_eq!(
            log_kind("dag_processor/2024-01-01/etl.py.log"),
            LogKind::DagProcessor
        );
        assert_eq!(
            log_kind("dag_id=a/run_id=r/task_id=t/attempt=x.log"),
            LogKind::Other
        );
        assert_eq!(
            log_kind("dag_id=a/run_id=r/task_id=t/notes.txt"),
            LogKind::Other
        );
        assert_eq!(log_kind("random.log"), LogKind::Other);
    }

    #[test]
    fn a_key_fits_only_with_room_for_its_side_and_conflict_keys() {
        let key = |len: usize| "k".repeat(len);
        let longest = [
            side_key(&key(1), &"0".repeat(WRITER_DIGITS)).len(),
            conflict_key(&key(1), &"0".repeat(64)).len(),
        ]
        .into_iter()
        .max()
        .unwrap()
            - 1;
        assert!(fits(&key(S3_MAX_KEY_BYTES - longest), S3_MAX_KEY_BYTES));
        assert!(!fits(
            &key(S3_MAX_KEY_BYTES - longest + 1),
            S3_MAX_KEY_BYTES
        ));
        // Bytes, not characters: `é` is two.
        assert!(!fits(&"é".repeat(S3_MAX_KEY_BYTES / 2), S3_MAX_KEY_BYTES));
    }
}
