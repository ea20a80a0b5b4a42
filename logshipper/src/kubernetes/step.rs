//! What the controller does next with one of this node's PVs. Pure: from the PV, whether
//! this process ships from it already, and its opt-in when that had to be looked up.

use k8s_openapi::api::core::v1::PersistentVolume;
use kube::Resource;

use super::finalizer;
use super::opt_in::OptIn;
use super::volume::Volume;

#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Deleted without our finalizer: nothing of ours to do.
    Ignore,
    /// Did not opt in: asked again later, for an annotation added since.
    Recheck,
    /// Asks to be shipped as this shipper cannot: said in an Event, asked again later.
    Refuse(String),
    /// Held by us, yet refused: said in an Event, and our finalizer released rather than
    /// kept for ever.
    RefuseAndRelease(String),
    /// Deleted while held: everything in it ships now, then it is let go.
    Drain,
    /// Its annotations do not hold up: said in an Event, and its directory left alone.
    Unusable(String),
    /// Shipped from; `hold` adds our finalizer first.
    Ship { volume: Volume, hold: bool },
}

/// Whether the volume's opt-in must be looked up (a read of its claim and class). The
/// provisioner holds a volume for us from its creation when its claim asks, so a held one
/// is checked once per process, when it is not shipped from yet.
pub fn asks_opt_in(pv: &PersistentVolume, shipping: bool) -> bool {
    let held = finalizer::holds(pv);
    let deleting = pv.meta().deletion_timestamp.is_some();
    if deleting && !held {
        // Nothing of ours: see [`Step::Ignore`].
        return false;
    }
    !held || !shipping
}

/// The next step for `pv` on `node`; `opt_in` is `None` when [`asks_opt_in`] said it need
/// not be looked up.
pub fn next(pv: &PersistentVolume, node: &str, opt_in: Option<OptIn>) -> Step {
    let held = finalizer::holds(pv);
    let deleting = pv.meta().deletion_timestamp.is_some();
    if deleting && !held {
        return Step::Ignore;
    }
    match opt_in {
        Some(OptIn::Refused(why)) if held => {
            return Step::RefuseAndRelease(format!("{why}; released the PV"))
        }
        Some(OptIn::No) if !held => return Step::Recheck,
        Some(OptIn::Refused(why)) => return Step::Refuse(why),
        Some(OptIn::Yes | OptIn::No) | None => {}
    }
    if deleting {
        return Step::Drain;
    }
    match Volume::of(pv, node) {
        Ok(volume) => Step::Ship {
            volume,
            hold: !held,
        },
        Err(why) => Step::Unusable(format!("{why}; its logs are not shipped")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use localship_names::{BASE_PATH, HOST_PATH, NODE, SHIP_LOGS_FINALIZER};
    use serde_json::json;
    use std::path::PathBuf;

    const HOST: &str = "/data/pvc-1_airflow_logs";

    /// One of node-a's volumes, as the provisioner writes it.
    fn pv(finalizers: &[&str]) -> PersistentVolume {
        serde_json::from_value(json!({
            "metadata": {
                "name": "pvc-1",
                "annotations": { NODE: "node-a", HOST_PATH: HOST, BASE_PATH: "/data" },
                "finalizers": finalizers,
            },
            "spec": {
                "hostPath": { "path": HOST },
                "claimRef": { "namespace": "airflow", "name": "logs" },
            },
        }))
        .unwrap()
    }

    fn held() -> PersistentVolume {
        pv(&["localship.io/cleanup", SHIP_LOGS_FINALIZER])
    }

    fn not_held() -> PersistentVolume {
        pv(&["localship.io/cleanup"])
    }

    fn deleted(mut pv: PersistentVolume) -> PersistentVolume {
        pv.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        pv
    }

    fn volume() -> Volume {
        Volume {
            name: "pvc-1".into(),
            host_path: PathBuf::from(HOST),
            base_path: PathBuf::from("/data"),
            namespace: Some("airflow".into()),
        }
    }

    fn refused() -> OptIn {
        OptIn::Refused("asks for s3://other".into())
    }

    #[test]
    fn an_opted_in_volume_is_held_then_shipped() {
        assert_eq!(
            next(&not_held(), "node-a", Some(OptIn::Yes)),
            Step::Ship {
                volume: volume(),
                hold: true
            }
        );
        // Held already by the provisioner, as it does when the claim asks.
        assert_eq!(
            next(&held(), "node-a", Some(OptIn::Yes)),
            Step::Ship {
                volume: volume(),
                hold: false
            }
        );
    }

    #[test]
    fn the_opt_in_is_looked_up_until_a_held_volume_is_shipped_from() {
        assert!(asks_opt_in(&not_held(), false));
        assert!(asks_opt_in(&not_held(), true));
        assert!(asks_opt_in(&held(), false));
        assert!(!asks_opt_in(&held(), true));
        assert!(asks_opt_in(&deleted(held()), false));
        assert!(!asks_opt_in(&deleted(not_held()), false));
        // Held and shipped from: it goes on being shipped without asking again.
        assert!(matches!(
            next(&held(), "node-a", None),
            Step::Ship { hold: false, .. }
        ));
    }

    #[test]
    fn a_volume_that_did_not_opt_in_is_asked_again_later() {
        assert_eq!(next(&not_held(), "node-a", Some(OptIn::No)), Step::Recheck);
        // Held for us by the provisioner, whose record of the ask is on the PV: shipped.
        assert!(matches!(
            next(&held(), "node-a", Some(OptIn::No)),
            Step::Ship { hold: false, .. }
        ));
    }

    #[test]
    fn a_refused_volume_is_reported_and_let_go_if_held() {
        assert_eq!(
            next(&not_held(), "node-a", Some(refused())),
            Step::Refuse("asks for s3://other".into())
        );
        assert_eq!(
            next(&held(), "node-a", Some(refused())),
            Step::RefuseAndRelease("asks for s3://other; released the PV".into())
        );
        // Deleted while held, but refused: let go, not drained somewhere it did not ask for.
        assert_eq!(
            next(&deleted(held()), "node-a", Some(refused())),
            Step::RefuseAndRelease("asks for s3://other; released the PV".into())
        );
    }

    #[test]
    fn a_deleted_volume_is_drained_while_held_and_ignored_otherwise() {
        assert_eq!(
            next(&deleted(held()), "node-a", Some(OptIn::Yes)),
            Step::Drain
        );
        assert_eq!(next(&deleted(held()), "node-a", None), Step::Drain);
        assert_eq!(next(&deleted(not_held()), "node-a", None), Step::Ignore);
    }

    #[test]
    fn a_volume_of_another_node_is_refused_and_left_alone() {
        // Labelled for this node (the watch selects on the label) but annotated for another.
        let Step::Unusable(why) = next(&not_held(), "node-b", Some(OptIn::Yes)) else {
            panic!("another node's volume is shipped");
        };
        assert!(why.contains("node-b"), "{why}");
        assert!(why.ends_with("its logs are not shipped"), "{why}");
    }

    #[test]
    fn a_volume_whose_annotations_point_elsewhere_is_not_shipped() {
        let mut elsewhere = held();
        elsewhere
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(HOST_PATH.into(), "/etc".into());
        assert!(matches!(
            next(&elsewhere, "node-a", None),
            Step::Unusable(_)
        ));
    }
}
