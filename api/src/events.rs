//! Events on claims and PVs, for whoever owns them to read in `kubectl describe`.
//!
//! kube-runtime's `Recorder` follows events.k8s.io: an Event is known by its type, reason,
//! action and object, not by its note, so a second note with the same reason only raises
//! the first one's count, and what it said is lost for the recorder's six minutes. Our notes
//! say what to fix ("2 files with an object key over the store's limit", "only 3 GiB free"),
//! so a new note must be a new Event. Each distinct note gets a recorder of its own: the
//! same note again is still counted on its Event, as the API intends.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
pub use kube::runtime::events::EventType;
use kube::runtime::events::{Event, Recorder, Reporter};
use kube::Client;

/// How long a note is remembered: as long as a `Recorder` would count repeats of it.
const REMEMBERED: Duration = Duration::from_secs(6 * 60);
/// Notes remembered at most; past that the oldest is forgotten (its next repeat is a new
/// Event, which is only less tidy).
const MAX_REMEMBERED: usize = 1024;
/// The API refuses notes over 1 KiB.
pub const NOTE_MAX_BYTES: usize = 1000;

/// Publishes Events as one component on one node.
pub struct Events {
    client: Client,
    reporter: Reporter,
    hasher: RandomState,
    recorders: Mutex<Notes>,
}

impl Events {
    /// `instance` tells apart agents of the same `controller`, e.g. by node name.
    pub fn new(client: Client, controller: &str, instance: Option<String>) -> Self {
        Self {
            client,
            reporter: Reporter {
                controller: controller.into(),
                instance,
            },
            hasher: RandomState::new(),
            recorders: Mutex::new(Notes::default()),
        }
    }

    /// Publishes an Event on `on`; a note over the API's limit is cut. Failing to publish is
    /// logged, never an error: an Event tells, it decides nothing.
    pub async fn publish(
        &self,
        on: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let note = cut(note, NOTE_MAX_BYTES);
        let key = self.hasher.hash_one((
            type_ == EventType::Warning,
            reason,
            action,
            &on.uid,
            &on.namespace,
            &on.name,
            &on.kind,
            &note,
        ));
        let recorder =
            self.recorders
                .lock()
                .expect("not poisoned")
                .recorder(key, Instant::now(), || {
                    Recorder::new(self.client.clone(), self.reporter.clone())
                });
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, on).await {
            tracing::warn!(error = %e, reason, "could not publish Event");
        }
    }
}

/// A recorder per note recently published, oldest forgotten first.
struct Notes<R = Recorder> {
    by_key: HashMap<u64, (R, Instant)>,
}

impl<R> Default for Notes<R> {
    fn default() -> Self {
        Self {
            by_key: HashMap::new(),
        }
    }
}

impl<R: Clone> Notes<R> {
    fn recorder(&mut self, key: u64, now: Instant, new: impl FnOnce() -> R) -> R {
        self.by_key
            .retain(|_, (_, used)| now.saturating_duration_since(*used) < REMEMBERED);
        if !self.by_key.contains_key(&key) && self.by_key.len() >= MAX_REMEMBERED {
            let oldest = self.by_key.iter().min_by_key(|(_, (_, used))| *used);
            if let Some(oldest) = oldest.map(|(k, _)| *k) {
                self.by_key.remove(&oldest);
            }
        }
        let (recorder, used) = self.by_key.entry(key).or_insert_with(|| (new(), now));
        *used = now;
        recorder.clone()
    }
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn cut(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut at = max;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_note_keeps_its_recorder_and_another_gets_a_new_one() {
        let mut notes = Notes::default();
        let mut made = 0;
        let now = Instant::now();
        let mut get = |notes: &mut Notes<u32>, key, at| {
            notes.recorder(key, at, || {
                made += 1;
                made
            })
        };
        assert_eq!(get(&mut notes, 1, now), 1);
        assert_eq!(get(&mut notes, 1, now + Duration::from_secs(60)), 1);
        assert_eq!(get(&mut notes, 2, now + Duration::from_secs(61)), 2);
        // Unused for longer than a recorder counts repeats: forgotten, so a new Event.
        assert_eq!(
            get(&mut notes, 1, now + Duration::from_secs(60) + REMEMBERED),
            3
        );
    }

    #[test]
    fn at_most_so_many_notes_are_remembered_the_oldest_going_first() {
        let mut notes = Notes::default();
        let start = Instant::now();
        for key in 0..MAX_REMEMBERED as u64 + 10 {
            notes.recorder(key, start + Duration::from_millis(key), || key);
        }
        assert_eq!(notes.by_key.len(), MAX_REMEMBERED);
        assert!(!notes.by_key.contains_key(&9));
        assert!(notes.by_key.contains_key(&10));
    }

    #[test]
    fn long_notes_are_cut_on_a_character_boundary() {
        assert_eq!(cut("é".repeat(600), NOTE_MAX_BYTES).len(), NOTE_MAX_BYTES);
        assert_eq!(cut("é".repeat(600), 999).len(), 998);
        assert_eq!(cut("short".into(), NOTE_MAX_BYTES), "short");
    }
}
