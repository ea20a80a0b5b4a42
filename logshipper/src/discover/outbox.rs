//! Events from one walking thread, sent to the pipeline in bursts.

use std::sync::atomic::Ordering;

use super::scan::Scan;
use super::Event;

/// Events sent together.
const BURST: usize = 64;

/// Events from one thread on their way to the pipeline. They go in bursts, so the pipeline
/// is woken once per burst rather than once per file (a sixth of a walk's time went to
/// wake-ups); what is left goes when the outbox is dropped, at the end of a walk or look.
pub(super) struct Outbox<'a> {
    scan: &'a Scan,
    queued: Vec<Event>,
}

impl<'a> Outbox<'a> {
    pub(super) fn new(scan: &'a Scan) -> Self {
        Self {
            scan,
            queued: Vec::new(),
        }
    }

    pub(super) fn send(&mut self, event: Event) {
        self.queued.push(event);
        if self.queued.len() >= BURST {
            self.flush();
        }
    }

    /// Called from blocking threads only; waits while the pipeline holds this source back.
    fn flush(&mut self) {
        if !self.queued.is_empty() {
            self.scan.source.gate.wait_open();
        }
        for event in self.queued.drain(..) {
            if self.scan.source.removed.load(Ordering::SeqCst) {
                break;
            }
            let _ = self.scan.events.blocking_send(event);
        }
    }
}

impl Drop for Outbox<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}
