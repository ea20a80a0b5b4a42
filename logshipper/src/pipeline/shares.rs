//! Each source's share of the files followed at once: a source at its share finds no more
//! until some of its files have shipped, so one volume's backlog never crowds out another's.

use std::sync::Arc;

use super::Pipeline;
use crate::destination::Destination;
use crate::discover::Source;

impl<D: Destination> Pipeline<D> {
    /// Files one source may have followed at once: an even share of `max_tracked` between
    /// the sources that have any, so one volume's backlog never crowds out another's.
    pub(super) fn share(&self) -> usize {
        (self.settings.max_tracked / self.entries.sources().max(1)).max(1)
    }

    /// Holds back discovery of a source at its share.
    pub(super) fn hold_if_full(&mut self, source: &Arc<Source>) {
        let files = self.entries.count(&source.id);
        if files < self.share() || self.held.contains_key(&source.id) {
            return;
        }
        source.gate.close();
        tracing::info!(source = %source.root.display(), files, "backlog is large; finding more files in this source waits until some have shipped");
        self.held.insert(source.id.clone(), source.clone());
        if !self.backlog_was_full {
            self.backlog_was_full = true;
            self.publish_readiness();
        }
    }

    /// Lets held sources find files again once they are well under their share.
    pub(super) fn release_held(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let below = self.share() * 3 / 4;
        let entries = &self.entries;
        self.held.retain(|id, source| {
            let keep = entries.count(id) > below;
            if !keep {
                source.gate.open();
            }
            keep
        });
    }
}
