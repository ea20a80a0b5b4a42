//! What the ledger says of a source, read in one pass as its first walk starts, and a
//! drained volume's records forgotten once it is gone for good.

use std::sync::Arc;

use super::seen::Seen;
use super::Pipeline;
use crate::destination::Destination;
use crate::discover::Source;
use crate::key::is_side_key;

impl<D: Destination> Pipeline<D> {
    /// A drained volume is gone for good: its records go too, once those still queued are
    /// committed, so the ledger does not grow with every volume a node ever served.
    pub(super) fn forget_records(&self, source: Arc<Source>) {
        let (ledger, recorder) = (self.ctx.ledger.clone(), self.ctx.recorder.clone());
        tokio::spawn(async move {
            let _ = recorder.flush().await;
            let id = source.id.clone();
            let removed = tokio::task::spawn_blocking(move || ledger.remove_source(&id)).await;
            match removed {
                Ok(Ok(files)) => {
                    tracing::info!(source = %source.root.display(), files, "forgot the records of a drained volume")
                }
                Ok(Err(e)) => {
                    tracing::warn!(source = %source.root.display(), error = %e, "cannot forget the records of a drained volume")
                }
                Err(_) => {}
            }
        });
    }

    /// Reads what the ledger holds for `source`, off the loop.
    pub(super) fn load_ledger(&mut self, source: Arc<Source>) {
        let ledger = self.ctx.ledger.clone();
        let destination = self.ctx.destination_id(&source).to_owned();
        self.loading.spawn_blocking(move || {
            let mut seen = Seen::new();
            let read = ledger.each(&source.id, |relative, record| {
                // A log under its side key is not final: it is looked at again.
                if record.destination == destination && !is_side_key(&record.key) {
                    seen.insert(&source.id, relative, record.stat);
                }
            });
            // What was read is still right; the rest is looked up file by file.
            if let Err(e) = read {
                tracing::warn!(source = %source.root.display(), error = %e, "cannot read the whole ledger at once; looking files up one by one");
            }
            (source.id.clone(), seen)
        });
    }
}
