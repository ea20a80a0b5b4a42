//! Fault suite: kills, outages and hostile inputs against the real servers,
//! with the invariants checked after each. Runs as part of `cargo test`
//! (plain binary, no libtest) and ends with one table of tallies; it exits
//! non-zero when any invariant broke. `cargo test --release -p localship-tests --test faults --
//! <word>` runs only the scenarios whose name contains <word>.

mod jitter;
mod provisioner;
mod report;
mod shipper;

use report::{Report, Scenario};
use std::process::ExitCode;

fn main() -> ExitCode {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("start the tokio runtime");
    let mut report = Report::default();
    let scenarios: Vec<Scenario> = provisioner::scenarios()
        .into_iter()
        .chain(shipper::scenarios())
        .filter(|s| filter.is_empty() || filter.iter().any(|f| s.name.contains(f.as_str())))
        .collect();
    for scenario in scenarios {
        report.run(&runtime, scenario);
    }
    report.print();
    if report.clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
