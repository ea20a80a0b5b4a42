//! The shipping loop: follows what discovery finds until it settles, ships settled files a
//! few at a time, retries failures with backoff while everything else goes on, waits while
//! the destination is away, and keeps the backlog metrics and the `--once` progress line.
//! A draining source (its volume is being deleted) ships at once and is reported when done.
//!
//! Here: the loop, what each event and each finished shipment does, and dispatch. Beside it:
//! `followed` (the files followed, counted per source), `shares` (each source's share of
//! them), `turns` (due files taken from the sources in turns), `revisits` (logs under side
//! keys looked at again), `ledgered` (the ledger read per source), `drain`, `refusals`
//! (files that will not ship, told once a minute), `seen` and `tally` (the counting).

#[cfg(test)]
mod alongside_tests;
#[cfg(test)]
mod backlog_tests;
mod drain;
mod followed;
mod ledgered;
mod refusals;
mod revisits;
mod seen;
mod shares;
mod tally;
mod turns;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinSet;

use crate::destination::Destination;
use crate::discover::{Event, SkipReason, Source};
use crate::key::is_side_key;
use crate::local_file::FileStat;
use crate::metrics::Metrics;
use crate::report::Summary;
use crate::retain;
use crate::retry::Backoff;
use crate::settle::Observation;
use crate::ship::{self, Context, Job, Outcome};
pub use drain::DrainReport;
use drain::Drains;
use followed::{FileId, Followed};
use refusals::Refusals;
pub use refusals::{RefusalReport, Refused, REFUSALS_EVERY};
use seen::Seen;
use turns::Turns;

/// Retries of a file that failed, doubling up to a few minutes.
const FILE_BACKOFF: Backoff = Backoff {
    base: Duration::from_secs(1),
    cap: Duration::from_secs(300),
};

/// In `--once`, a file that fails this often is given up and the run fails.
const ONCE_ATTEMPTS: u32 = 4;

/// A file whose destination was unreachable waits at least this long before it is tried
/// again, so a dying connection does not spin the loop before the check catches up.
const UNREACHABLE_PAUSE: Duration = Duration::from_secs(1);

/// A log shipped under its side key is looked at again this soon, then at doubling
/// intervals up to the cap, so Airflow's own upload is noticed (and the side key removed)
/// within seconds, until the log is final.
const REVISIT_FIRST: Duration = Duration::from_secs(1);
const REVISIT_CAP: Duration = Duration::from_secs(30);

const BACKLOG_EVERY: Duration = Duration::from_secs(2);
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// How long a stopping daemon lets running uploads finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

#[derive(Clone, Debug)]
pub struct Settings {
    pub settle: Duration,
    /// Ship what is there and stop: after one settle period, files still changing are
    /// shipped as they are (the next run re-ships them once they grew).
    pub once: bool,
    /// Files shipped at once.
    pub workers: usize,
    pub delete_after: Option<Duration>,
    /// How often retention runs in daemon mode.
    pub sweep_every: Duration,
    /// Sources whose first walk must finish before `--once` can end or the daemon is ready.
    pub initial_sources: usize,
    /// Beside Airflow's uploads: a log quiet this long is final, and its canonical key is
    /// written (see `alongside`).
    pub final_after: Duration,
    /// Files followed at once (found and not shipped yet), shared between the sources that
    /// have any. A source at its share waits to find more: the rest of its backlog stays on
    /// disk, not in memory, and other sources go on.
    pub max_tracked: usize,
}

/// The default for [`Settings::max_tracked`]: about 4 MiB of bookkeeping.
pub const MAX_TRACKED: usize = 10_000;

struct Entry {
    source: Arc<Source>,
    obs: Observation,
    generation: u64,
    in_flight: bool,
    attempts: u32,
    retry_at: Option<Instant>,
    /// Found by a draining source: due now, settled or not.
    drain: bool,
}

type Finished = (FileId, crate::Result<Outcome>, Duration);

/// A log shipped under its side key, waiting to be looked at again.
struct Provisional {
    source: Arc<Source>,
    obs: Observation,
    next_at: Instant,
    interval: Duration,
}

pub struct Pipeline<D> {
    ctx: Arc<Context<D>>,
    metrics: Arc<Metrics>,
    settings: Settings,
    entries: Followed<Entry>,
    due: Turns,
    /// Uploads under way, per source.
    in_flight: HashMap<String, usize>,
    /// Sources whose discovery waits until enough of their followed files have shipped, by
    /// id: the very source whose gate was closed, to open it again.
    held: HashMap<String, Arc<Source>>,
    /// Files shipped or skipped, as they looked then: the same sighting again needs nothing.
    settled: Seen,
    /// Per source, during its first walk: what the ledger says was shipped to this
    /// destination, read in one pass as the walk starts rather than one lookup per file.
    ledgered: HashMap<String, Seen>,
    /// Ledger reads under way; discovery's events wait for them.
    loading: JoinSet<(String, Seen)>,
    sources: HashMap<String, Arc<Source>>,
    walks_left: usize,
    /// Discovery has waited for the backlog at least once: as caught up as memory allows.
    backlog_was_full: bool,
    running: JoinSet<Finished>,
    generation: u64,
    summary: Summary,
    destination_ok: watch::Receiver<bool>,
    recheck: Arc<Notify>,
    ready: watch::Sender<bool>,
    started: Instant,
    force_at: Option<Instant>,
    drains: Drains,
    refusals: Refusals,
    /// Logs shipped under their side keys, and when each is looked at again.
    provisional: HashMap<FileId, Provisional>,
    revisits: BinaryHeap<Reverse<(Instant, FileId)>>,
}

impl<D: Destination> Pipeline<D> {
    pub fn new(
        ctx: Arc<Context<D>>,
        metrics: Arc<Metrics>,
        settings: Settings,
        destination_ok: watch::Receiver<bool>,
        recheck: Arc<Notify>,
        ready: watch::Sender<bool>,
    ) -> Self {
        let started = Instant::now();
        Self {
            force_at: settings.once.then(|| started + settings.settle),
            walks_left: settings.initial_sources,
            backlog_was_full: false,
            ctx,
            metrics,
            settings,
            entries: Followed::new(),
            due: Turns::default(),
            in_flight: HashMap::new(),
            held: HashMap::new(),
            settled: Seen::new(),
            ledgered: HashMap::new(),
            loading: JoinSet::new(),
            sources: HashMap::new(),
            running: JoinSet::new(),
            generation: 0,
            summary: Summary::default(),
            destination_ok,
            recheck,
            ready,
            started,
            drains: Drains::default(),
            refusals: Refusals::new(None),
            provisional: HashMap::new(),
            revisits: BinaryHeap::new(),
        }
    }

    /// Tells `report` the source of each finished drain.
    pub fn report_drains(mut self, report: DrainReport) -> Self {
        self.drains = Drains::new(Some(report));
        self
    }

    /// Tells `report` each source's files that will not ship, at most once a minute each.
    pub fn report_refusals(mut self, report: RefusalReport) -> Self {
        self.refusals = Refusals::new(Some(report));
        self
    }

    /// Runs until `--once` has shipped everything found, or until `stop` turns true.
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<Event>,
        mut stop: watch::Receiver<bool>,
    ) -> Summary {
        let mut backlog = tokio::time::interval(BACKLOG_EVERY);
        let start = tokio::time::Instant::now();
        let mut progress = tokio::time::interval_at(start + PROGRESS_EVERY, PROGRESS_EVERY);
        let sweep_every = self.settings.sweep_every;
        let mut sweep = tokio::time::interval_at(start + sweep_every, sweep_every);
        let sweeping = self.settings.delete_after.is_some() && !self.settings.once;
        let mut sweeper: Option<tokio::task::JoinHandle<u64>> = None;
        loop {
            self.revisit_due();
            self.dispatch();
            self.release_held();
            let entries = &self.entries;
            self.drains.report_finished(|id| entries.count(id) > 0);
            if self.settings.once && self.finished() {
                break;
            }
            let wake = self.next_due().map(tokio::time::Instant::from_std);
            tokio::select! {
                _ = stop_requested(&mut stop) => break,
                // Events wait meanwhile, so nothing about the source can come first.
                Some(loaded) = self.loading.join_next(), if !self.loading.is_empty() => {
                    if let Ok((id, seen)) = loaded {
                        self.ledgered.insert(id, seen);
                    }
                }
                Some(event) = events.recv(), if self.loading.is_empty() => self.on_event(event),
                Some(done) = self.running.join_next(), if !self.running.is_empty() => {
                    self.on_done(done.expect("shipping tasks do not panic"));
                }
                _ = tokio::time::sleep_until(wake.unwrap_or(start)), if wake.is_some() => {}
                Ok(()) = self.destination_ok.changed() => self.publish_readiness(),
                _ = backlog.tick() => {
                    self.update_backlog();
                    self.refusals.tell_due(Instant::now());
                }
                _ = progress.tick(), if self.settings.once => self.print_progress(),
                _ = sweep.tick(), if sweeping && sweeper.as_ref().is_none_or(|s| s.is_finished()) => {
                    if let Some(done) = sweeper.take() {
                        self.summary.deleted += done.await.unwrap_or(0);
                    }
                    sweeper = Some(self.start_sweep());
                }
            }
        }
        if self.settings.once && !self.finished() {
            let left = self.entries.len() as u64;
            tracing::error!(files = left, "stopped before these files were shipped");
            self.summary.failed += left;
        }
        if !self.settings.once && !self.running.is_empty() {
            tracing::info!(
                uploads = self.running.len(),
                "stopping: letting running uploads finish"
            );
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
                while let Some(done) = self.running.join_next().await {
                    self.on_done(done.expect("shipping tasks do not panic"));
                }
            })
            .await;
        }
        self.update_backlog();
        self.refusals.tell_all();
        if let Some(done) = sweeper.take() {
            self.summary.deleted += done.await.unwrap_or(0);
        }
        // Retention below and the next start rely on committed records.
        if let Err(e) = self.ctx.recorder.flush().await {
            tracing::error!(error = %e, "cannot commit the last shipped files to the ledger; they are checked against the destination again after a restart");
        }
        if self.settings.once && self.settings.delete_after.is_some() {
            self.summary.deleted += self.start_sweep().await.unwrap_or(0);
        }
        self.summary
    }

    fn finished(&self) -> bool {
        self.walks_left == 0 && self.entries.is_empty() && self.running.is_empty()
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Found {
                source,
                relative,
                stat,
            } => self.on_found(source, relative, stat),
            Event::Gone { source, relative } => {
                let id = (source.id.clone(), relative);
                self.settled.remove(&id.0, &id.1);
                if self.entries.get(&id).is_some_and(|e| !e.in_flight) {
                    self.entries.remove(&id);
                }
                // Its side key goes if Airflow's object now holds it (see `ship::gone`).
                if let Some(provisional) = self.provisional.remove(&id) {
                    if !self.entries.contains_key(&id) {
                        self.follow(id, provisional.source, provisional.obs, true);
                    }
                }
            }
            Event::Skipped {
                source,
                path,
                reason,
            } => {
                self.count_skipped(reason);
                let relative = path.strip_prefix(&source.root).unwrap_or(&path);
                let relative = relative.to_string_lossy();
                if self.refusals.add(&source, &relative, reason.label()) {
                    tracing::warn!(file = %path.display(), reason = reason.label(), "not shipping this file; more are summed up once a minute");
                }
            }
            Event::WalkStarted { source } => self.load_ledger(source),
            Event::WalkDone { source } if source.draining => {
                tracing::info!(source = %source.root.display(), "final walk done; draining");
                self.ledgered.remove(&source.id);
                self.drains.walked(source);
            }
            Event::WalkDone { source } => {
                tracing::info!(source = %source.root.display(), "first walk done");
                self.ledgered.remove(&source.id);
                // The walk's threads and the ledger's read leave freed heap behind.
                localship_heap::give_back();
                self.sources.insert(source.id.clone(), source);
                self.walks_left = self.walks_left.saturating_sub(1);
                self.publish_readiness();
            }
            Event::SourceRemoved { source, gone } => {
                tracing::info!(source = %source.root.display(), "source removed");
                // Drained and gone for good; a drain walked again still needs them.
                if source.draining && gone {
                    self.forget_records(source.clone());
                }
                self.drains.removed(&source.id);
                self.refusals.removed(&source.id);
                self.ledgered.remove(&source.id);
                self.sources.remove(&source.id);
                self.entries.retain_source(&source.id, |e| e.in_flight);
                self.due.remove_source(&source.id);
                self.held.remove(&source.id);
                self.provisional.retain(|(id, _), _| *id != source.id);
                self.settled.remove_source(&source.id);
            }
        }
    }

    fn on_found(&mut self, source: Arc<Source>, relative: String, stat: FileStat) {
        let id = (source.id.clone(), relative);
        // A draining volume's logs under side keys are finished now.
        let finish_now = source.draining && self.provisional.contains_key(&id);
        if self.settled.is(&id.0, &id.1, stat) && !finish_now {
            return;
        }
        let shipped = self
            .ledgered
            .get(&id.0)
            .is_some_and(|ledgered| ledgered.is(&id.0, &id.1, stat));
        if shipped {
            return self.unchanged(&id, stat);
        }
        let (now, wall) = (Instant::now(), SystemTime::now());
        if let Some(entry) = self.entries.get_mut(&id) {
            let obs = entry.obs.observe(stat, now, wall);
            let now_draining = source.draining && !entry.drain;
            entry.drain |= source.draining;
            if obs != entry.obs || now_draining {
                entry.obs = obs;
                if !entry.in_flight {
                    self.schedule(&id);
                }
            }
            return;
        }
        match self.ctx.ledger.get(&source.id, &id.1) {
            Ok(Some(record))
                if record.covers(stat, self.ctx.destination_id(&source))
                    && !is_side_key(&record.key) =>
            {
                return self.unchanged(&id, stat);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, file = %id.1, "cannot read the ledger; asking the destination instead")
            }
        }
        self.sources
            .entry(source.id.clone())
            .or_insert_with(|| source.clone());
        let drain = source.draining;
        self.follow(id, source, Observation::first(stat, now, wall), drain);
    }

    /// Starts following a file.
    fn follow(&mut self, id: FileId, source: Arc<Source>, obs: Observation, drain: bool) {
        let entry = Entry {
            drain,
            source: source.clone(),
            obs,
            generation: 0,
            in_flight: false,
            attempts: 0,
            retry_at: None,
        };
        self.entries.insert(id.clone(), entry);
        self.schedule(&id);
        self.hold_if_full(&source);
    }

    /// A file found as the ledger says it was shipped.
    fn unchanged(&mut self, id: &FileId, stat: FileStat) {
        self.settled.insert(&id.0, &id.1, stat);
        self.count_unchanged();
    }

    /// (Re)computes when a file is due and queues it; older queue entries go stale.
    fn schedule(&mut self, id: &FileId) {
        let Some(entry) = self.entries.get_mut(id) else {
            return;
        };
        self.generation += 1;
        entry.generation = self.generation;
        let due = due_at(entry, self.settings.settle, self.force_at);
        self.due.push(&id.0, due, self.generation, id.1.clone());
    }

    fn next_due(&self) -> Option<Instant> {
        if !*self.destination_ok.borrow() || self.running.len() >= self.settings.workers {
            return None;
        }
        let revisit = self.revisits.peek().map(|Reverse((at, _))| *at);
        self.due.next_due().into_iter().chain(revisit).min()
    }

    /// Starts the files that are due, the sources taking turns; a source may take more than
    /// half the workers only while no other source has a file due.
    fn dispatch(&mut self) {
        if !*self.destination_ok.borrow() {
            return;
        }
        let now = Instant::now();
        let most = (self.settings.workers / 2).max(1);
        while self.running.len() < self.settings.workers {
            let in_flight = &self.in_flight;
            let busy = |source: &str| in_flight.get(source).is_some_and(|n| *n >= most);
            let Some((source_id, relative, generation)) = self.due.take(now, busy) else {
                break;
            };
            let id = (source_id, relative);
            let Some(entry) = self.entries.get_mut(&id) else {
                continue;
            };
            if entry.generation != generation || entry.in_flight {
                continue;
            }
            if due_at(entry, self.settings.settle, self.force_at) > now {
                self.schedule(&id);
                continue;
            }
            if !entry.obs.is_settled(now, self.settings.settle) {
                self.summary.unsettled += 1;
            }
            entry.in_flight = true;
            let job = Job {
                source: entry.source.clone(),
                relative: id.1.clone(),
                expected: entry.obs.stat,
                finished: entry.drain || entry.obs.is_settled(now, self.settings.final_after),
            };
            *self.in_flight.entry(id.0.clone()).or_default() += 1;
            let ctx = self.ctx.clone();
            self.running.spawn(async move {
                let started = Instant::now();
                let result = ship::ship(&ctx, &job).await;
                (id, result, started.elapsed())
            });
        }
    }

    fn on_done(&mut self, (id, result, elapsed): Finished) {
        if let Some(n) = self.in_flight.get_mut(&id.0) {
            *n -= 1;
            if *n == 0 {
                self.in_flight.remove(&id.0);
            }
        }
        let Some(entry) = self.entries.get_mut(&id) else {
            return;
        };
        entry.in_flight = false;
        let file = entry.source.root.join(&id.1);
        let now = Instant::now();
        match result {
            Ok(Outcome::Shipped(shipped)) => {
                let unchanged_since = entry.obs.stat == shipped.stat;
                self.count_shipped(&id.1, shipped.how, shipped.stat.size, elapsed);
                tracing::info!(file = %file.display(), key = %shipped.key, how = ?shipped.how, bytes = shipped.stat.size, "shipped");
                self.settled.insert(&id.0, &id.1, shipped.stat);
                if !unchanged_since {
                    self.schedule(&id);
                } else if let Some(entry) = self.entries.remove(&id) {
                    if shipped.provisional() && !self.settings.once {
                        self.revisit_later(&id, entry.source, entry.obs);
                    } else {
                        self.provisional.remove(&id);
                    }
                }
            }
            Ok(Outcome::Changed(stat)) => {
                entry.obs = entry.obs.observe(stat, now, SystemTime::now());
                self.schedule(&id);
            }
            Ok(Outcome::Gone) => {
                self.entries.remove(&id);
                self.provisional.remove(&id);
            }
            Ok(Outcome::Skipped(reason)) => {
                if self.refuse(&id, reason) {
                    tracing::warn!(file = %file.display(), reason = reason.label(), "not shipping this file; more are summed up once a minute");
                }
            }
            // Not retried: the same request can only be refused again. Changed, it is tried anew.
            Err(e) if e.is_permanent() => {
                self.metrics
                    .failures
                    .with_label_values(&[e.metric_label()])
                    .inc();
                if self.refuse(&id, SkipReason::Refused) {
                    tracing::warn!(file = %file.display(), error = %e, "the destination refuses this file for good; not shipping it");
                }
            }
            Err(e) => {
                self.metrics
                    .failures
                    .with_label_values(&[e.metric_label()])
                    .inc();
                if e.is_unreachable() && !self.settings.once {
                    entry.retry_at = Some(now + UNREACHABLE_PAUSE);
                    self.recheck.notify_one();
                } else {
                    entry.attempts += 1;
                    if self.settings.once && entry.attempts >= ONCE_ATTEMPTS {
                        tracing::error!(file = %file.display(), error = %e, "giving up on this file");
                        self.summary.failed += 1;
                        self.entries.remove(&id);
                        return;
                    }
                    let delay = FILE_BACKOFF.next(entry.attempts);
                    tracing::warn!(file = %file.display(), error = %e, retry_in = ?delay, "shipping failed");
                    entry.retry_at = Some(now + delay);
                }
                self.schedule(&id);
            }
        }
    }

    /// A file that will not ship as it is: counted, told about, and left alone until it
    /// changes; `true` when it is the first of its source this minute, to warn of.
    fn refuse(&mut self, id: &FileId, reason: SkipReason) -> bool {
        let Some(entry) = self.entries.remove(id) else {
            return false;
        };
        self.count_skipped(reason);
        self.settled.insert(&id.0, &id.1, entry.obs.stat);
        self.provisional.remove(id);
        self.refusals.add(&entry.source, &id.1, reason.label())
    }

    fn publish_readiness(&self) {
        // A backlog too large to follow at once must not hold readiness for as long as it
        // takes to ship: the daemon is then doing what it is there for.
        let caught_up = self.walks_left == 0 || self.backlog_was_full;
        let ready = caught_up && *self.destination_ok.borrow();
        self.ready
            .send_if_modified(|r| std::mem::replace(r, ready) != ready);
    }

    /// Runs retention over every known source, off the loop; yields the files removed.
    fn start_sweep(&self) -> tokio::task::JoinHandle<u64> {
        let delete_after = self.settings.delete_after.unwrap_or(Duration::MAX);
        let sources: Vec<(Arc<Source>, String)> = self
            .sources
            .values()
            .map(|s| (s.clone(), self.ctx.destination_id(s).to_owned()))
            .collect();
        let ledger = self.ctx.ledger.clone();
        let metrics = self.metrics.clone();
        tokio::task::spawn_blocking(move || {
            let files = retain::sweep_all(&ledger, &sources, delete_after);
            metrics.deleted.inc_by(files);
            files
        })
    }
}

/// Completes once `stop` turns true; never, if its sender is gone.
async fn stop_requested(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// When a file should next be looked at: once settled (or at the `--once` deadline, or now
/// when draining), and not before its retry time.
fn due_at(entry: &Entry, settle: Duration, force_at: Option<Instant>) -> Instant {
    if entry.drain {
        return entry
            .retry_at
            .map_or(entry.obs.seen_at, |retry| retry.max(entry.obs.seen_at));
    }
    let settles = entry.obs.settles_at(settle);
    let settles = force_at.map_or(settles, |force| settles.min(force));
    entry.retry_at.map_or(settles, |retry| retry.max(settles))
}
