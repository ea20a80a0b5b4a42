//! Logs shipped under their side keys (beside Airflow's uploads), looked at again 1 s, 2 s,
//! 4 s … then every 30 s after, so Airflow's own upload is noticed, until the log is final.

use std::cmp::Reverse;
use std::sync::Arc;
use std::time::Instant;

use super::{FileId, Pipeline, Provisional, REVISIT_CAP, REVISIT_FIRST};
use crate::destination::Destination;
use crate::discover::Source;
use crate::settle::Observation;

impl<D: Destination> Pipeline<D> {
    /// Follows again the logs under side keys whose time to be looked at has come.
    pub(super) fn revisit_due(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, _))) = self.revisits.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((at, id))) = self.revisits.pop() else {
                break;
            };
            let current = self.provisional.get(&id).is_some_and(|p| p.next_at == at);
            if !current || self.entries.contains_key(&id) {
                continue;
            }
            let provisional = &self.provisional[&id];
            let (source, obs) = (provisional.source.clone(), provisional.obs);
            self.follow(id, source, obs, false);
        }
    }

    /// A log shipped under its side key is looked at again soon, and finished once final.
    pub(super) fn revisit_later(&mut self, id: &FileId, source: Arc<Source>, obs: Observation) {
        let now = Instant::now();
        let interval = self
            .provisional
            .get(id)
            .filter(|p| p.obs.stat == obs.stat)
            .map_or(REVISIT_FIRST, |p| (p.interval * 2).min(REVISIT_CAP));
        let final_at = obs.settles_at(self.settings.final_after);
        let next_at = (now + interval).min(final_at.max(now));
        self.revisits.push(Reverse((next_at, id.clone())));
        let provisional = Provisional {
            source,
            obs,
            next_at,
            interval,
        };
        self.provisional.insert(id.clone(), provisional);
    }
}
