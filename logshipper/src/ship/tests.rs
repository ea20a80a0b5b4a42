//! Shipping one file to a `file://` destination, each rule's case end to end.

use super::*;
use crate::destination::file::FileDestination;
use crate::destination::Place;
use crate::key::{side_key, writer_id};

const REL: &str = "dag_id=a/run_id=manual__2024-01-01T00:00:00+00:00/task_id=t/attempt=1.log";

struct Setup {
    _dir: tempfile::TempDir,
    ctx: Context<FileDestination>,
    source: Arc<Source>,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("logs")).unwrap();
        let ledger = Ledger::open(&dir.path().join("ledger.redb")).unwrap();
        let ctx = Context {
            destination: Arc::new(FileDestination::new(&dir.path().join("out")).unwrap()),
            recorder: ledger.recorder(),
            ledger,
            alongside: None,
            max_file_size: u64::MAX,
        };
        let source = Arc::new(Source::new(&dir.path().join("logs")).unwrap());
        Self {
            _dir: dir,
            ctx,
            source,
        }
    }

    fn write_local(&self, bytes: &[u8]) -> FileStat {
        let path = self.source.root.join(REL);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        FileStat::of(&std::fs::metadata(&path).unwrap())
    }

    fn write_object(&self, key: &str, bytes: &[u8]) {
        let path = self.ctx.destination.root().join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    fn object(&self, key: &str) -> Option<Vec<u8>> {
        std::fs::read(self.ctx.destination.root().join(key)).ok()
    }

    /// Beside Airflow's uploads, as `--airflow-remote-logging on` ships.
    fn alongside() -> Self {
        let mut s = Self::new();
        s.ctx.alongside = Some(Alongside {
            host: "node-a".into(),
        });
        s
    }

    fn side(&self) -> String {
        side_key(REL, &writer_id("node-a", &self.source.id))
    }

    async fn ship(&self, expected: FileStat) -> Outcome {
        self.ship_as(expected, false).await
    }

    fn path(&self) -> std::path::PathBuf {
        self.source.root.join(REL)
    }

    async fn ship_final(&self, expected: FileStat) -> Shipped {
        match self.ship_as(expected, true).await {
            Outcome::Shipped(shipped) => shipped,
            other => panic!("not shipped: {other:?}"),
        }
    }

    async fn ship_as(&self, expected: FileStat, finished: bool) -> Outcome {
        let job = Job {
            source: self.source.clone(),
            relative: REL.into(),
            expected,
            finished,
        };
        let outcome = ship(&self.ctx, &job).await.unwrap();
        self.ctx.recorder.flush().await.unwrap();
        outcome
    }

    async fn shipped(&self, expected: FileStat) -> Shipped {
        match self.ship(expected).await {
            Outcome::Shipped(shipped) => shipped,
            other => panic!("not shipped: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_new_file_is_uploaded_and_recorded() {
    let s = Setup::new();
    let stat = s.write_local(b"hello\n");
    let shipped = s.shipped(stat).await;
    assert_eq!(shipped.how, How::Uploaded);
    assert_eq!(shipped.key, REL);
    assert_eq!(s.object(REL).unwrap(), b"hello\n");
    let record = s.ctx.ledger.get(&s.source.id, REL).unwrap().unwrap();
    assert!(record.covers(stat, s.ctx.destination.id()));
    assert_eq!(record.key, REL);
}

#[tokio::test]
async fn a_touched_file_is_recorded_without_asking_the_destination() {
    let s = Setup::new();
    let stat = s.write_local(b"hello\n");
    s.shipped(stat).await;
    std::fs::remove_file(s.ctx.destination.root().join(REL)).unwrap();
    let touched = s.write_local(b"hello\n");
    let touched = FileStat {
        mtime_ns: touched.mtime_ns + 1,
        ..touched
    };
    let file = std::fs::File::options()
        .write(true)
        .open(s.source.root.join(REL))
        .unwrap();
    let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(touched.mtime_ns as u64);
    file.set_modified(mtime).unwrap();
    assert_eq!(s.shipped(touched).await.how, How::Unchanged);
    assert_eq!(s.object(REL), None, "the destination was not written");
}

#[tokio::test]
async fn a_source_with_a_place_of_its_own_ships_there_and_records_it() {
    let mut s = Setup::new();
    let stat = s.write_local(b"team a\n");
    let place = |namespace: &str| Place {
        id: format!("s3://airflow/logs/{namespace}"),
        prefix: format!("logs/{namespace}"),
    };
    let mut source = Source::new(&s.source.root).unwrap();
    source.place = Some(place("team-a"));
    s.source = Arc::new(source);
    let shipped = s.shipped(stat).await;
    let key = format!("logs/team-a/{REL}");
    assert_eq!((shipped.how, &shipped.key), (How::Uploaded, &key));
    assert_eq!(s.object(&key).unwrap(), b"team a\n");
    assert_eq!(
        s.object(REL),
        None,
        "nothing under the destination's own prefix"
    );
    let record = s.ctx.ledger.get(&s.source.id, REL).unwrap().unwrap();
    assert!(record.covers(stat, "s3://airflow/logs/team-a"));
    assert!(!record.covers(stat, s.ctx.destination.id()));
    // Its place changed: what was shipped elsewhere does not count, it ships anew.
    let mut source = Source::new(&s.source.root).unwrap();
    source.place = Some(place("team-b"));
    s.source = Arc::new(source);
    let shipped = s.shipped(stat).await;
    assert_eq!(shipped.key, format!("logs/team-b/{REL}"));
    assert_eq!(shipped.how, How::Uploaded);
}

#[tokio::test]
async fn beside_airflow_a_place_of_its_own_holds_the_side_key_too() {
    let mut s = Setup::alongside();
    let mut source = Source::new(&s.source.root).unwrap();
    source.place = Some(Place {
        id: "s3://airflow/logs/team-a".into(),
        prefix: "logs/team-a".into(),
    });
    s.source = Arc::new(source);
    let stat = s.write_local(b"a1\n");
    let shipped = s.shipped(stat).await;
    let key = format!("logs/team-a/{REL}");
    let side = side_key(&key, &writer_id("node-a", &s.source.id));
    assert_eq!((shipped.how, &shipped.key), (How::Side, &side));
    assert_eq!(s.object(&side).unwrap(), b"a1\n");
    let shipped = s.ship_final(stat).await;
    assert_eq!((shipped.how, &shipped.key), (How::Uploaded, &key));
    assert_eq!(s.object(&side), None);
}

#[tokio::test]
async fn the_same_bytes_already_there_are_kept() {
    let s = Setup::new();
    s.write_object(REL, b"hello\n");
    let stat = s.write_local(b"hello\n");
    assert_eq!(s.shipped(stat).await.how, How::AlreadyThere);
    assert!(s.ctx.ledger.get(&s.source.id, REL).unwrap().is_some());
}

#[tokio::test]
async fn an_object_that_is_a_prefix_is_replaced() {
    let s = Setup::new();
    s.write_object(REL, b"line 1\n");
    let stat = s.write_local(b"line 1\nline 2\n");
    assert_eq!(s.shipped(stat).await.how, How::Replaced);
    assert_eq!(s.object(REL).unwrap(), b"line 1\nline 2\n");
}

#[tokio::test]
async fn an_object_holding_more_than_the_file_is_kept() {
    let s = Setup::new();
    s.write_object(REL, b"line 1\nline 2\n");
    let stat = s.write_local(b"line 1\n");
    let shipped = s.shipped(stat).await;
    assert_eq!(shipped.how, How::AlreadyThere);
    assert_eq!(s.object(REL).unwrap(), b"line 1\nline 2\n");
}

#[tokio::test]
async fn a_different_object_is_kept_and_the_file_goes_beside_it() {
    let s = Setup::new();
    s.write_object(REL, b"theirs\n");
    let stat = s.write_local(b"mine\n");
    let shipped = s.shipped(stat).await;
    assert_eq!(shipped.how, How::Conflict);
    assert!(
        shipped
            .key
            .starts_with(&format!("{REL}.localship-conflict-")),
        "{}",
        shipped.key
    );
    assert_eq!(s.object(REL).unwrap(), b"theirs\n");
    assert_eq!(s.object(&shipped.key).unwrap(), b"mine\n");
    // Shipping the same version again finds its copy in place.
    s.ctx.ledger.remove(&s.source.id, REL).unwrap();
    let again = s.shipped(stat).await;
    assert_eq!((again.how, again.key), (How::Conflict, shipped.key));
}

#[tokio::test]
async fn sparse_and_oversized_files_are_refused_before_they_are_read() {
    let mut s = Setup::new();
    s.write_local(b"");
    let file = std::fs::File::options().write(true).open(s.path()).unwrap();
    file.set_len(4 << 40).unwrap();
    let stat = FileStat::of(&file.metadata().unwrap());
    assert_eq!(s.ship(stat).await, Outcome::Skipped(SkipReason::Sparse));
    assert_eq!(s.object(REL), None);
    // A small hole is not refused; a file over the limit is.
    s.write_local(b"x");
    let file = std::fs::File::options().write(true).open(s.path()).unwrap();
    file.set_len(64 << 10).unwrap();
    let stat = FileStat {
        size: 64 << 10,
        ..FileStat::of(&file.metadata().unwrap())
    };
    assert!(matches!(s.ship(stat).await, Outcome::Shipped(_)));
    s.ctx.max_file_size = 1024;
    let stat = s.write_local(&[b'a'; 2048]);
    assert_eq!(s.ship(stat).await, Outcome::Skipped(SkipReason::TooLarge));
}

#[tokio::test]
async fn a_file_that_changed_since_it_settled_is_not_shipped() {
    let s = Setup::new();
    let stat = s.write_local(b"one\n");
    let now = s.write_local(b"one\ntwo\n");
    assert_eq!(s.ship(stat).await, Outcome::Changed(now));
    assert_eq!(s.object(REL), None);
}

#[tokio::test]
async fn symlinks_and_vanished_files_are_not_shipped() {
    let s = Setup::new();
    let stat = s.write_local(b"x");
    std::fs::remove_file(s.source.root.join(REL)).unwrap();
    assert_eq!(s.ship(stat).await, Outcome::Gone);
    std::os::unix::fs::symlink("/etc/passwd", s.source.root.join(REL)).unwrap();
    assert_eq!(s.ship(stat).await, Outcome::Skipped(SkipReason::Symlink));
    assert_eq!(s.object(REL), None);
}

#[tokio::test]
async fn beside_airflow_a_growing_log_goes_to_its_side_key_and_the_key_is_left_alone() {
    let s = Setup::alongside();
    let stat = s.write_local(b"a1\n");
    let shipped = s.shipped(stat).await;
    assert_eq!((shipped.how, &shipped.key), (How::Side, &s.side()));
    assert!(shipped.provisional());
    assert_eq!(s.object(&s.side()).unwrap(), b"a1\n");
    assert_eq!(
        s.object(REL),
        None,
        "the log's key is Airflow's until the log is final"
    );
    // Looked at again with nothing new: the side key is not written again.
    std::fs::remove_file(s.ctx.destination.root().join(s.side())).unwrap();
    assert_eq!(s.shipped(stat).await.how, How::SideKept);
    assert_eq!(s.object(&s.side()), None);
    std::fs::write(s.ctx.destination.root().join(s.side()), b"a1\n").unwrap();
    // Airflow uploaded the first part at a deferral; only the rest goes beside it.
    s.write_object(REL, b"a1\n");
    let stat = s.write_local(b"a1\nb1\n");
    assert_eq!(s.shipped(stat).await.how, How::Side);
    assert_eq!(s.object(&s.side()).unwrap(), b"b1\n");
    assert_eq!(s.object(REL).unwrap(), b"a1\n");
}

#[tokio::test]
async fn beside_airflow_an_empty_log_needs_no_object_until_final() {
    let s = Setup::alongside();
    let stat = s.write_local(b"");
    let shipped = s.shipped(stat).await;
    assert_eq!((shipped.how, &shipped.key), (How::SideKept, &s.side()));
    assert!(shipped.provisional(), "looked at again until final");
    assert_eq!((s.object(REL), s.object(&s.side())), (None, None));
    // Final and still empty (killed before its first line): an empty log, not none.
    let shipped = s.ship_final(stat).await;
    assert_eq!((shipped.how, shipped.key.as_str()), (How::Uploaded, REL));
    assert_eq!(s.object(REL).unwrap(), b"");
}

#[tokio::test]
async fn beside_airflow_its_upload_of_the_whole_log_removes_the_side_key() {
    let s = Setup::alongside();
    let stat = s.write_local(b"a1\n");
    s.shipped(stat).await;
    let stat = s.write_local(b"a1\nb1\n");
    // Airflow's upload at the end: nothing was under the key, so the file alone.
    s.write_object(REL, b"a1\nb1\n");
    let shipped = s.shipped(stat).await;
    assert_eq!(
        (shipped.how, shipped.key.as_str()),
        (How::AlreadyThere, REL)
    );
    assert!(!shipped.provisional());
    assert_eq!(s.object(&s.side()), None);
    assert_eq!(s.object(REL).unwrap(), b"a1\nb1\n");
}

#[tokio::test]
async fn beside_airflow_a_final_log_completes_its_key_and_drops_the_side_key() {
    let s = Setup::alongside();
    // Another worker's part is there (Airflow uploaded it at a deferral).
    s.write_object(REL, b"w1\n");
    let stat = s.write_local(b"w2\n");
    assert_eq!(s.shipped(stat).await.how, How::Side);
    let shipped = s.ship_final(stat).await;
    assert_eq!((shipped.how, shipped.key.as_str()), (How::Replaced, REL));
    assert_eq!(s.object(REL).unwrap(), b"w1\nw2\n");
    assert_eq!(s.object(&s.side()), None);
    // Seen again, final and unchanged: nothing more to do.
    assert_eq!(s.ship_final(stat).await.how, How::Unchanged);
}

#[tokio::test]
async fn beside_airflow_a_repeat_of_the_logs_beginning_is_written_away() {
    let s = Setup::alongside();
    let stat = s.write_local(b"a1\n");
    s.ship_final(stat).await;
    assert_eq!(s.object(REL).unwrap(), b"a1\n");
    // The task was only quiet: it went on, and Airflow appended the whole file.
    let stat = s.write_local(b"a1\nb1\n");
    s.write_object(REL, b"a1\n\na1\nb1\n");
    assert_eq!(s.shipped(stat).await.how, How::Repaired);
    assert_eq!(s.object(REL).unwrap(), b"a1\nb1\n");
}

#[tokio::test]
async fn beside_airflow_a_log_removed_after_airflows_upload_leaves_no_side_key() {
    let s = Setup::alongside();
    let stat = s.write_local(b"a1\n");
    s.shipped(stat).await;
    // `delete_local_logs`: Airflow uploads, then removes the folder.
    s.write_object(REL, b"a1\nb1\n");
    std::fs::remove_file(s.source.root.join(REL)).unwrap();
    assert_eq!(s.ship(stat).await, Outcome::Gone);
    assert_eq!(s.object(&s.side()), None);
    // Removed before Airflow's upload held it: the side key is the log's copy, kept.
    let s = Setup::alongside();
    let stat = s.write_local(b"a1\n");
    s.shipped(stat).await;
    std::fs::remove_file(s.source.root.join(REL)).unwrap();
    assert_eq!(s.ship(stat).await, Outcome::Gone);
    assert_eq!(s.object(&s.side()).unwrap(), b"a1\n");
}

#[test]
fn an_object_without_a_hash_takes_the_ledgers_only_if_it_is_that_object() {
    let previous = Record {
        stat: FileStat {
            size: 10,
            mtime_ns: 1,
        },
        sha256: "ab".repeat(32),
        destination: "s3://b/p".into(),
        key: "p/x.log".into(),
        etag: Some("\"e-3\"".into()),
        version_id: None,
        shipped_at_ms: 1,
        part_sha256: None,
    };
    let object = ObjectInfo {
        size: 10,
        sha256: None,
        etag: Some("\"e-3\"".into()),
        version_id: None,
        confirmed: false,
    };
    assert_eq!(
        recorded_sha(&previous, "p/x.log", &object),
        Some(previous.sha256.clone())
    );
    assert_eq!(recorded_sha(&previous, "p/y.log", &object), None);
    let rewritten = ObjectInfo {
        etag: Some("\"f-3\"".into()),
        ..object.clone()
    };
    assert_eq!(recorded_sha(&previous, "p/x.log", &rewritten), None);
    let grown = ObjectInfo {
        size: 11,
        ..object.clone()
    };
    assert_eq!(recorded_sha(&previous, "p/x.log", &grown), None);
    let no_etag = ObjectInfo {
        etag: None,
        ..object
    };
    let previous = Record {
        etag: None,
        ..previous
    };
    assert_eq!(recorded_sha(&previous, "p/x.log", &no_etag), None);
}
