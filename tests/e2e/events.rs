//! Events as both agents publish them, against the real events API: a note that changes is
//! a new Event (the API alone would fold it into the first one's count and drop it), and the
//! same note again is counted on its Event.

use anyhow::{ensure, Context, Result};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, PostParams};
use kube::Resource;
use localship_api::{EventType, Events};
use localship_tests::control_plane;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_note_is_a_new_event_and_a_repeat_is_counted() -> Result<()> {
    let cp = control_plane()?;
    let client = cp.client().await?;
    let ns = cp.namespace("events").await?;
    let mut object = ConfigMap::default();
    object.metadata.name = Some("told".into());
    let object = Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &object)
        .await?;
    let on = object.object_ref(&());
    let events = Events::new(client.clone(), "localship-test", Some("node-a".into()));
    let first = "1 file in this volume will not be shipped as it is: 1 sparse (mostly holes)";
    let second = "1 file in this volume will not be shipped as it is: 1 with an object key over the store's limit";
    for note in [first, second, first] {
        events
            .publish(
                &on,
                EventType::Warning,
                "LogsNotShipped",
                "ShipLogs",
                note.into(),
            )
            .await;
    }
    let long = "x".repeat(4000);
    events
        .publish(&on, EventType::Warning, "Long", "ShipLogs", long)
        .await;

    let mut told: Vec<(String, String, i32)> = Api::<Event>::namespaced(client, &ns)
        .list(&ListParams::default())
        .await?
        .into_iter()
        .map(|e| {
            let count = e.series.as_ref().map_or(1, |s| s.count);
            (
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default(),
                count,
            )
        })
        .collect();
    told.sort();
    let notes: Vec<(&str, &str, i32)> = told
        .iter()
        .map(|(r, n, c)| (r.as_str(), n.as_str(), *c))
        .collect();
    let long_note = notes
        .iter()
        .find(|(reason, ..)| *reason == "Long")
        .context("the long note was refused, not cut")?;
    ensure!(long_note.1.len() <= 1024, "{} bytes", long_note.1.len());
    assert_eq!(
        notes
            .iter()
            .filter(|(reason, ..)| *reason == "LogsNotShipped")
            .copied()
            .collect::<Vec<_>>(),
        [("LogsNotShipped", first, 2), ("LogsNotShipped", second, 1)]
    );
    Ok(())
}
