//! Faults against the log shipper and its destination.

use crate::report::Scenario;

pub fn scenarios() -> Vec<Scenario> {
    Vec::new()
}
