//! Faults against the provisioner on the real control plane: agents killed
//! mid-burst, the apiserver restarted mid-burst, the agents' path to it cut
//! without closing, and a table of hostile inputs. Each scenario works in
//! namespaces and under a provisioner name of its own.

mod audit;
mod blackhole;
mod burst;
mod hostile;
mod outage;

use crate::report::Scenario;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario::new(
            "provisioner kill -9 during a 200-claim burst (20 rounds)",
            burst::kill_9_during_burst,
        ),
        Scenario::new(
            "apiserver restart mid-burst",
            outage::apiserver_restart_mid_burst,
        ),
        Scenario::new(
            "apiserver path blackholed mid-burst",
            blackhole::apiserver_path_blackholed,
        ),
        Scenario::new("hostile inputs (provisioner)", hostile::hostile_inputs),
    ]
}
