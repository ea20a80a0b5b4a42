//! What each scenario counted, and the closing table.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

/// A scenario's own counts. `lost` is anything the invariants say must be
/// zero: a duplicate PV, an orphan directory, a claim left Pending, an object
/// that differs from its file, a file deleted unshipped, a path outside the
/// base path that changed.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub rounds: u64,
    pub faults: u64,
    pub checked: u64,
    pub lost: u64,
}

type Body = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = anyhow::Result<Tally>>>>>;

pub struct Scenario {
    pub name: &'static str,
    body: Body,
}

impl Scenario {
    pub fn new<F, Fut>(name: &'static str, body: F) -> Self
    where
        F: FnOnce() -> Fut + 'static,
        Fut: Future<Output = anyhow::Result<Tally>> + 'static,
    {
        Scenario {
            name,
            body: Box::new(move || Box::pin(body())),
        }
    }
}

struct Row {
    name: &'static str,
    tally: Tally,
    took: Duration,
    error: Option<String>,
}

#[derive(Default)]
pub struct Report {
    rows: Vec<Row>,
}

impl Report {
    /// Runs one scenario; an error is recorded and the suite goes on.
    pub fn run(&mut self, runtime: &tokio::runtime::Runtime, scenario: Scenario) {
        eprintln!("faults: {} ...", scenario.name);
        let start = Instant::now();
        let (tally, error) = match runtime.block_on((scenario.body)()) {
            Ok(tally) => (tally, None),
            Err(e) => (Tally::default(), Some(format!("{e:#}"))),
        };
        let took = start.elapsed();
        eprintln!(
            "faults: {} {} in {:.1}s",
            scenario.name,
            if error.is_none() && tally.lost == 0 {
                "ok"
            } else {
                "FAILED"
            },
            took.as_secs_f64()
        );
        self.rows.push(Row {
            name: scenario.name,
            tally,
            took,
            error,
        });
    }

    pub fn clean(&self) -> bool {
        !self.rows.is_empty()
            && self
                .rows
                .iter()
                .all(|r| r.error.is_none() && r.tally.lost == 0)
    }

    pub fn print(&self) {
        println!(
            "\n{:<48} {:>7} {:>7} {:>8} {:>5} {:>8}",
            "scenario", "rounds", "faults", "checked", "lost", "seconds"
        );
        let mut total = Tally::default();
        for row in &self.rows {
            let t = &row.tally;
            println!(
                "{:<48} {:>7} {:>7} {:>8} {:>5} {:>8.1}",
                row.name,
                t.rounds,
                t.faults,
                t.checked,
                t.lost,
                row.took.as_secs_f64()
            );
            if let Some(e) = &row.error {
                println!("  error: {e}");
            }
            total.rounds += t.rounds;
            total.faults += t.faults;
            total.checked += t.checked;
            total.lost += t.lost;
        }
        let failed = self
            .rows
            .iter()
            .filter(|r| r.error.is_some() || r.tally.lost > 0)
            .count();
        // One line CI's closing tally reads.
        println!(
            "faults result: {} scenarios, {} failed; {} rounds, {} faults injected, {} checked, lost = {}",
            self.rows.len(),
            failed,
            total.rounds,
            total.faults,
            total.checked,
            total.lost
        );
    }
}
