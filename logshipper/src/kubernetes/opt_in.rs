//! Whether a volume's logs are shipped: its claim, else its StorageClass (a parameter, then
//! an annotation), carries the opt-in annotation naming this shipper's destination. Pure.
//!
//! The value must name the volume's destination (compared parsed, so a trailing slash does
//! not matter): `--dest`, with `{namespace}` in it rendered with the claim's namespace, or
//! `--dest` itself as written (one value a StorageClass can give every namespace). A volume
//! that asks for another, another namespace's included, is refused loudly rather than
//! shipped somewhere it did not ask for.

use std::collections::BTreeMap;

use crate::destination::DestinationUrl;

type Annotations = BTreeMap<String, String>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OptIn {
    No,
    Yes,
    /// It asks to be shipped, but not as this shipper can: the message says what to fix.
    Refused(String),
}

/// Where the opt-in may be, most specific first.
pub struct Asked<'a> {
    pub claim: Option<&'a Annotations>,
    /// The PV's: the provisioner copies the claim's (or class's) value there when it makes
    /// the volume, so the ask survives the claim.
    pub volume: Option<&'a Annotations>,
    pub class_parameters: Option<&'a Annotations>,
    pub class_annotations: Option<&'a Annotations>,
}

/// `namespace` is the claim's, from the PV's `claimRef`.
pub fn decide(
    key: &str,
    dest: &DestinationUrl,
    namespace: Option<&str>,
    asked: Asked<'_>,
) -> OptIn {
    let places = [
        ("the claim's annotation", asked.claim),
        ("the PV's annotation", asked.volume),
        ("the StorageClass parameter", asked.class_parameters),
        ("the StorageClass annotation", asked.class_annotations),
    ];
    let Some((place, value)) = places
        .into_iter()
        .find_map(|(place, map)| Some((place, map?.get(key)?)))
    else {
        return OptIn::No;
    };
    let wanted = match destination_of(dest, namespace) {
        Ok(wanted) => wanted,
        Err(why) => {
            return OptIn::Refused(format!(
                "{place} {key} asks for shipping, but {why}; the volume's logs are not shipped"
            ))
        }
    };
    let (ships_to, set) = if dest.per_namespace() {
        (
            format!("ships this namespace's volumes to {wanted} (--dest {dest})"),
            format!("{wanted} or {dest}"),
        )
    } else {
        (format!("ships to {dest} (--dest)"), dest.to_string())
    };
    match value.trim().parse::<DestinationUrl>() {
        Ok(named) if named == wanted || &named == dest => OptIn::Yes,
        Ok(named) => OptIn::Refused(format!(
            "{place} {key} asks for {named}, but this node's log shipper {ships_to}; the \
             volume's logs are not shipped — set it to {set}"
        )),
        Err(e) => OptIn::Refused(format!(
            "{place} {key}: {e}; the volume's logs are not shipped — set it to {set}"
        )),
    }
}

/// Where a volume whose claim is in `namespace` ships: `--dest`, rendered.
pub fn destination_of(
    dest: &DestinationUrl,
    namespace: Option<&str>,
) -> Result<DestinationUrl, String> {
    match namespace {
        Some(namespace) => dest.render(namespace),
        None if dest.per_namespace() => Err(format!("the PV names no claim namespace for {dest}")),
        None => Ok(dest.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "localship.io/ship-to";

    fn map(pairs: &[(&str, &str)]) -> Annotations {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn dest() -> DestinationUrl {
        "s3://airflow/logs".parse().unwrap()
    }

    fn decide_with(
        claim: &[(&str, &str)],
        params: &[(&str, &str)],
        class: &[(&str, &str)],
    ) -> OptIn {
        let (claim, params, class) = (map(claim), map(params), map(class));
        let asked = Asked {
            claim: Some(&claim),
            volume: None,
            class_parameters: Some(&params),
            class_annotations: Some(&class),
        };
        decide(KEY, &dest(), Some("team-a"), asked)
    }

    #[test]
    fn nothing_asked_is_no() {
        assert_eq!(decide_with(&[("other", "x")], &[], &[]), OptIn::No);
        let asked = Asked {
            claim: None,
            volume: None,
            class_parameters: None,
            class_annotations: None,
        };
        assert_eq!(decide(KEY, &dest(), Some("team-a"), asked), OptIn::No);
    }

    #[test]
    fn the_claim_or_the_class_opts_in() {
        assert_eq!(
            decide_with(&[(KEY, "s3://airflow/logs")], &[], &[]),
            OptIn::Yes
        );
        assert_eq!(
            decide_with(&[], &[(KEY, "s3://airflow/logs/")], &[]),
            OptIn::Yes
        );
        assert_eq!(
            decide_with(&[], &[], &[(KEY, " s3://airflow/logs")]),
            OptIn::Yes
        );
    }

    #[test]
    fn the_claim_wins_over_the_class() {
        let refused = decide_with(
            &[(KEY, "s3://other/logs")],
            &[(KEY, "s3://airflow/logs")],
            &[],
        );
        assert!(matches!(refused, OptIn::Refused(m) if m.contains("claim")));
        let yes = decide_with(&[(KEY, "s3://airflow/logs")], &[], &[(KEY, "s3://other")]);
        assert_eq!(yes, OptIn::Yes);
    }

    #[test]
    fn another_destination_or_garbage_is_refused_with_what_to_fix() {
        for value in ["s3://airflow/other", "true", "file:///tmp/x"] {
            match decide_with(&[(KEY, value)], &[], &[]) {
                OptIn::Refused(m) => assert!(m.contains("set it to s3://airflow/logs"), "{m}"),
                other => panic!("{value}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_pvs_record_speaks_once_the_claim_is_gone() {
        let (pv, other) = (
            map(&[(KEY, "s3://airflow/logs")]),
            map(&[(KEY, "s3://other")]),
        );
        let asked = |claim| Asked {
            claim,
            volume: Some(&pv),
            class_parameters: Some(&other),
            class_annotations: None,
        };
        assert_eq!(
            decide(KEY, &dest(), Some("team-a"), asked(None)),
            OptIn::Yes
        );
        let claim = map(&[(KEY, "s3://other")]);
        assert!(matches!(
            decide(KEY, &dest(), Some("team-a"), asked(Some(&claim))),
            OptIn::Refused(_)
        ));
    }

    fn per_namespace() -> DestinationUrl {
        "s3://airflow/logs/{namespace}".parse().unwrap()
    }

    fn decide_in(namespace: Option<&str>, value: &str) -> OptIn {
        let claim = map(&[(KEY, value)]);
        let asked = Asked {
            claim: Some(&claim),
            volume: None,
            class_parameters: None,
            class_annotations: None,
        };
        decide(KEY, &per_namespace(), namespace, asked)
    }

    #[test]
    fn per_namespace_a_volume_may_name_its_own_prefix_or_the_template() {
        let team_a = Some("team-a");
        assert_eq!(decide_in(team_a, "s3://airflow/logs/team-a"), OptIn::Yes);
        assert_eq!(decide_in(team_a, "s3://airflow/logs/team-a/"), OptIn::Yes);
        assert_eq!(
            decide_in(team_a, "s3://airflow/logs/{namespace}"),
            OptIn::Yes
        );
        // A StorageClass parameter shared by every namespace.
        let params = map(&[(KEY, "s3://airflow/logs/{namespace}")]);
        let asked = Asked {
            claim: None,
            volume: None,
            class_parameters: Some(&params),
            class_annotations: None,
        };
        assert_eq!(
            decide(KEY, &per_namespace(), Some("team-b"), asked),
            OptIn::Yes
        );
    }

    #[test]
    fn per_namespace_another_namespaces_prefix_is_refused() {
        for value in [
            "s3://airflow/logs/team-a",
            "s3://airflow/logs",
            "s3://airflow/logs/team-b/../team-a",
            "s3://airflow/logs/team-b/x",
            "s3://airflow/{namespace}/logs",
        ] {
            match decide_in(Some("team-b"), value) {
                OptIn::Refused(m) => assert!(
                    m.contains(
                        "set it to s3://airflow/logs/team-b or s3://airflow/logs/{namespace}"
                    ),
                    "{value}: {m}"
                ),
                other => panic!("{value}: {other:?}"),
            }
        }
    }

    #[test]
    fn per_namespace_without_a_usable_namespace_nothing_ships() {
        for namespace in [None, Some("../team-a"), Some("Team-B")] {
            let decided = decide_in(namespace, "s3://airflow/logs/{namespace}");
            assert!(
                matches!(&decided, OptIn::Refused(m) if m.contains("not shipped")),
                "{namespace:?}: {decided:?}"
            );
        }
        assert_eq!(
            destination_of(&per_namespace(), Some("team-a")),
            Ok("s3://airflow/logs/team-a".parse().unwrap())
        );
        assert!(destination_of(&per_namespace(), None).is_err());
        assert_eq!(destination_of(&dest(), None), Ok(dest()));
    }
}
