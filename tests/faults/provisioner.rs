//! Faults against the provisioner on the real control plane.

use crate::report::Scenario;

pub fn scenarios() -> Vec<Scenario> {
    Vec::new()
}
