//! Shipping beside Airflow's own remote logging, without ever causing a repeated line.
//!
//! Airflow's upload (the amazon provider's `S3RemoteLogIO.upload`) reads whatever the log's
//! key holds and writes it back with the whole local file after it (joined by `"\n"` in
//! Airflow 2's provider; on a line of its own in Airflow 3's, which then empties the local
//! file); its reader lists every key that starts with the log's key and shows them all. So anything we put under the canonical key
//! before Airflow's last upload is shown twice. The rule:
//!
//! - While the log may still grow, what Airflow's object (if any) lacks goes under a side key
//!   of ours (`<key>.localship-<writer>`), which the reader lists too and Airflow never
//!   appends to. The canonical key is left to Airflow.
//! - Once Airflow's object holds every byte of the file, the side key is deleted.
//! - Once the log is final (quiet for `--final-after`, or its volume is going away), the
//!   canonical key gets what it lacked appended, as Airflow would have, and the side key goes.
//! - An object holding the file and, just before it, a copy of the file's beginning (Airflow
//!   appended a file that still held what it had uploaded before, or we finalised a log that
//!   then grew) is rewritten without the copy: every byte of it is in the file.
//!
//! Every decision reads the object's bytes: a log up to [`COMPARE_LIMIT`]. Larger logs keep
//! the sole-writer rule of `existing_object`.

/// Largest file or object compared byte for byte.
pub const COMPARE_LIMIT: u64 = 16 << 20;

/// How much comparing may cost, in bytes looked at per byte of file and object, before the
/// object counts as unrelated: a file of identical lines cannot make the search quadratic.
const WORK_PER_BYTE: usize = 8;

/// What the object under a log's canonical key means for the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The object holds every byte of the file, at the start of a line.
    Covered,
    /// As `Covered`, but a copy of the file's beginning stands just before it: the object
    /// as it should be, without that copy.
    Repair(Vec<u8>),
    /// The object ends with the file's first `covered` bytes (0: none of the file is in it;
    /// also when there is no object). `base` is the object without a redundant copy before
    /// them, when it had one.
    Remainder {
        covered: usize,
        base: Option<Vec<u8>>,
    },
}

/// Relates a local log to the object under its canonical key.
pub fn decide(object: Option<&[u8]>, file: &[u8]) -> Decision {
    let object = object.unwrap_or_default();
    if file.is_empty() {
        return Decision::Covered;
    }
    let mut budget = WORK_PER_BYTE * (object.len() + file.len());
    let (start, covered) = match whole_at_line_start(object, file, &mut budget) {
        Some(start) => (start, file.len()),
        None => match longest_tail_prefix(object, file, &mut budget) {
            Some(found) => found,
            None => {
                return Decision::Remainder {
                    covered: 0,
                    base: None,
                }
            }
        },
    };
    let repaired = redundant_before(object, start, file, &mut budget)
        .map(|cut| [&object[..cut], &object[start..]].concat());
    match (covered == file.len(), repaired) {
        (true, None) => Decision::Covered,
        (true, Some(repaired)) => Decision::Repair(repaired),
        (false, base) => Decision::Remainder { covered, base },
    }
}

/// What the canonical key should hold once the log is final: the object (or its repaired
/// form) with what it lacks of the file, joined as Airflow joins an upload to what was there.
pub fn finished(
    object: Option<&[u8]>,
    file: &[u8],
    covered: usize,
    base: Option<&[u8]>,
) -> Vec<u8> {
    let object = base.or(object).unwrap_or_default();
    let rest = &file[covered..];
    if object.is_empty() {
        return rest.to_vec();
    }
    // The object ends with the covered part: the rest continues it. With nothing covered,
    // the file is another part of the log, on a line of its own as Airflow 3 puts it.
    let join: &[u8] = if covered == 0 && !object.ends_with(b"\n") {
        b"\n"
    } else {
        b""
    };
    [object, join, rest].concat()
}

/// Whether `object` holds `part` whole, starting at a line.
pub fn holds(object: &[u8], part: &[u8]) -> bool {
    let mut budget = WORK_PER_BYTE * (object.len() + part.len());
    part.is_empty() || whole_at_line_start(object, part, &mut budget).is_some()
}

fn at_line_start(bytes: &[u8], at: usize) -> bool {
    at == 0 || bytes[at - 1] == b'\n'
}

/// Where the whole file stands in the object at the start of a line, the last such place.
fn whole_at_line_start(object: &[u8], file: &[u8], budget: &mut usize) -> Option<usize> {
    let mut end = object.len();
    while end >= file.len() && spend(budget, end) {
        let at = memchr::memmem::rfind(&object[..end], file)?;
        if at_line_start(object, at) {
            return Some(at);
        }
        end = at + file.len() - 1;
    }
    None
}

/// The longest tail of the object, starting at a line, that the file begins with:
/// `(where it starts, its length)`.
fn longest_tail_prefix(object: &[u8], file: &[u8], budget: &mut usize) -> Option<(usize, usize)> {
    let first_line = &file[..memchr::memchr(b'\n', file).map_or(file.len(), |i| i + 1)];
    line_starts(object)
        .filter(|&at| at < object.len() && object.len() - at <= file.len())
        .find(|&at| {
            let tail = &object[at..];
            // Cheap test first: the tail begins with the file's first line.
            let quick = tail.len().min(first_line.len());
            if tail[..quick] != first_line[..quick] {
                return false;
            }
            spend(budget, tail.len()) && file.starts_with(tail)
        })
        .map(|at| (at, object.len() - at))
}

/// Where a redundant copy of the file's beginning starts, when one stands just before
/// `start`: whole lines, then, from Airflow 2's provider, the empty line it puts between what
/// it found and the file (Airflow 3's adds none after a line break).
fn redundant_before(object: &[u8], start: usize, file: &[u8], budget: &mut usize) -> Option<usize> {
    if start == 0 || object[start - 1] != b'\n' {
        return None;
    }
    let head = &object[..start];
    let head = head
        .strip_suffix(b"\n\n")
        .map_or(head, |h| &object[..h.len() + 1]);
    line_starts(head)
        .filter(|&at| at < head.len() && head.len() - at <= file.len())
        .find(|&at| spend(budget, head.len() - at) && file.starts_with(&head[at..]))
}

fn line_starts(bytes: &[u8]) -> impl Iterator<Item = usize> + '_ {
    std::iter::once(0).chain(memchr::memchr_iter(b'\n', bytes).map(|i| i + 1))
}

fn spend(budget: &mut usize, bytes: usize) -> bool {
    match budget.checked_sub(bytes) {
        Some(left) => {
            *budget = left;
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Airflow 2's upload leaves under the key: `old + "\n" + file`, or the file alone.
    fn airflow_append(old: Option<&[u8]>, file: &[u8]) -> Vec<u8> {
        match old {
            Some(old) if !old.is_empty() => [old, b"\n", file].concat(),
            _ => file.to_vec(),
        }
    }

    /// What Airflow 3's upload leaves: the file on a line of its own after what was there.
    fn airflow3_append(old: Option<&[u8]>, file: &[u8]) -> Vec<u8> {
        match old {
            Some(old) if !old.is_empty() && !old.ends_with(b"\n") => [old, b"\n", file].concat(),
            Some(old) => [old, file].concat(),
            None => file.to_vec(),
        }
    }

    const A: &[u8] = b"[t1] a1\n[t2] a2\n";
    const B: &[u8] = b"[t3] b1\nTraceback:\n  line\n";
    const C: &[u8] = b"[t4] c1\n";

    fn remainder(covered: usize) -> Decision {
        Decision::Remainder {
            covered,
            base: None,
        }
    }

    #[test]
    fn nothing_there_means_nothing_covered() {
        assert_eq!(decide(None, A), remainder(0));
        assert_eq!(decide(Some(b""), A), remainder(0));
        assert_eq!(finished(None, A, 0, None), A);
    }

    #[test]
    fn airflows_object_of_the_whole_file_covers_it() {
        assert_eq!(decide(Some(A), A), Decision::Covered);
        // Another worker's part first, this file after it.
        let object = airflow_append(Some(C), A);
        assert_eq!(decide(Some(&object), A), Decision::Covered);
        // This file's part, then a later worker's.
        let object = airflow_append(Some(A), C);
        assert_eq!(decide(Some(&object), A), Decision::Covered);
        assert_eq!(decide(None, b""), Decision::Covered);
    }

    #[test]
    fn an_object_holding_the_files_beginning_leaves_the_rest() {
        let file = [A, B].concat();
        assert_eq!(decide(Some(A), &file), remainder(A.len()));
        assert_eq!(finished(Some(A), &file, A.len(), None), file);
        // Deferred on another worker (C), this worker's first part (A) uploaded after it.
        let object = airflow_append(Some(C), A);
        assert_eq!(decide(Some(&object), &file), remainder(A.len()));
        assert_eq!(
            finished(Some(&object), &file, A.len(), None),
            airflow_append(Some(C), &file)
        );
        let object = airflow3_append(Some(C), A);
        assert_eq!(decide(Some(&object), &file), remainder(A.len()));
    }

    #[test]
    fn an_unrelated_object_is_kept_and_the_file_goes_after_it() {
        assert_eq!(decide(Some(C), A), remainder(0));
        assert_eq!(finished(Some(C), A, 0, None), airflow3_append(Some(C), A));
        assert_eq!(
            finished(Some(b"c"), A, 0, None),
            airflow3_append(Some(b"c"), A)
        );
        // A match in the middle of a line is no match.
        let file = b"a1\n".as_slice();
        assert_eq!(decide(Some(b"xa1\n"), file), remainder(0));
    }

    #[test]
    fn a_copy_of_the_files_beginning_before_it_is_repaired_away() {
        // We finalised A; the task then wrote B and Airflow appended the whole file.
        let file = [A, B].concat();
        let object = airflow_append(Some(A), &file);
        assert_eq!(decide(Some(&object), &file), Decision::Repair(file.clone()));
        // The same after another worker's part, which stays.
        let object = airflow_append(Some(&airflow_append(Some(C), A)), &file);
        assert_eq!(
            decide(Some(&object), &file),
            Decision::Repair(airflow_append(Some(C), &file))
        );
        // And as Airflow 3 joins them.
        let object = airflow3_append(Some(&airflow3_append(Some(C), A)), &file);
        assert_eq!(
            decide(Some(&object), &file),
            Decision::Repair(airflow3_append(Some(C), &file))
        );
    }

    #[test]
    fn a_copy_before_a_covered_beginning_is_dropped_when_finishing() {
        // Airflow uploaded A twice (a resume on the same worker); the file has grown since.
        let file = [A, B, C].concat();
        let twice = [A, B].concat();
        let object = airflow_append(Some(A), &twice);
        let Decision::Remainder { covered, base } = decide(Some(&object), &file) else {
            panic!("the file's end is not in the object");
        };
        assert_eq!(
            (covered, base.as_deref()),
            (twice.len(), Some(twice.as_slice()))
        );
        assert_eq!(
            finished(Some(&object), &file, covered, base.as_deref()),
            file
        );
    }

    #[test]
    fn a_part_is_held_only_whole_and_at_a_line() {
        let object = airflow_append(Some(C), &[A, B].concat());
        assert!(holds(&object, B) && holds(&object, C) && holds(&object, b""));
        assert!(!holds(&object, b"b1\n") && !holds(C, B));
    }

    #[test]
    fn identical_lines_cannot_make_the_search_quadratic() {
        let file = b"x\n".repeat(200_000);
        let object = [b"y\n".as_slice(), &b"x\n".repeat(100_000)].concat();
        // Found well within the budget: the object's tail is the file's beginning.
        assert_eq!(decide(Some(&object), &file), remainder(200_000));
        // Lines without timestamps cannot be told apart: more of the same lines count as
        // an earlier copy of the file's beginning.
        let other = b"x\n".repeat(300_000);
        assert_eq!(decide(Some(&other), &file), Decision::Repair(file.clone()));
    }

    #[test]
    fn every_line_is_kept_exactly_once_whatever_order_the_writers_take() {
        // Worker 1 wrote A and B with a quiet spell between; Airflow uploads at the end.
        // Whatever we saw and wrote before, the key ends with each line once.
        let file = [A, B].concat();
        type Append = fn(Option<&[u8]>, &[u8]) -> Vec<u8>;
        let appends: [Append; 2] = [airflow_append, airflow3_append];
        for (object, append) in [None, Some(A.to_vec()), Some(file.clone())]
            .into_iter()
            .flat_map(|o| appends.map(|a| (o.clone(), a)))
        {
            let after_airflow = append(object.as_deref(), &file);
            let settled = match decide(Some(&after_airflow), &file) {
                Decision::Covered => after_airflow,
                Decision::Repair(fixed) => fixed,
                other => panic!("{other:?}"),
            };
            assert_eq!(settled, file, "from {object:?}");
        }
    }
}
