//! Reconciling one of this node's PVs: an opted-in volume gets our finalizer and its
//! directory becomes a source; once the PV is deleted, the directory is drained (everything
//! ships now) and only then is the finalizer released, letting the provisioner remove it.
//!
//! Not kube-runtime's `finalizer()` helper: it adds its finalizer to every object it sees,
//! and a volume that did not opt in must never be touched.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ObjectReference, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use localship_api::{EventType, Events};

use super::finalizer;
use super::opt_in::{self, Asked, OptIn};
use super::step::{self, Step};
use super::volume::Volume;
use crate::destination::{DestinationUrl, Place};
use crate::discover::{Source, Sources};
use crate::metrics::Metrics;
use crate::pipeline::Refused;
use crate::{Error, Result};

/// How often a draining volume is looked at: finding its drain finished is a lookup here.
const DRAIN_POLL: Duration = Duration::from_secs(1);
/// How often a volume that did not opt in is asked again, for an annotation added later.
const OPT_IN_RECHECK: Duration = Duration::from_secs(300);
/// A failed reconcile (API or disk) is tried again after this long.
const RETRY: Duration = Duration::from_secs(5);

/// A volume being shipped; `drain` once its PV is deleted.
struct Shipping {
    root: PathBuf,
    drain: Option<Arc<Source>>,
}

pub struct Context {
    client: Client,
    node: String,
    annotation: String,
    dest: DestinationUrl,
    sources: tokio::sync::Mutex<Sources>,
    /// By PV name.
    shipping: Mutex<HashMap<String, Shipping>>,
    /// Drains the pipeline reported finished, not yet released.
    drained: Mutex<Vec<Arc<Source>>>,
    /// The last refusal reported per PV, so each is reported once.
    refused: Mutex<HashMap<String, String>>,
    store: Store<PersistentVolume>,
    events: Events,
    metrics: Arc<Metrics>,
}

impl Context {
    pub fn new(
        client: Client,
        settings: &super::Settings,
        sources: Sources,
        store: Store<PersistentVolume>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            events: Events::new(
                client.clone(),
                "localship-logshipper",
                Some(settings.node.clone()),
            ),
            client,
            node: settings.node.clone(),
            annotation: settings.annotation.clone(),
            dest: settings.dest.clone(),
            sources: tokio::sync::Mutex::new(sources),
            shipping: Mutex::new(HashMap::new()),
            drained: Mutex::new(Vec::new()),
            refused: Mutex::new(HashMap::new()),
            store,
            metrics,
        }
    }

    /// The pipeline finished draining `source`.
    pub fn drained(&self, source: Arc<Source>) {
        self.drained.lock().expect("not poisoned").push(source);
    }

    /// Tells the owner of a volume (on its claim, else its PV) of files that will not ship.
    pub async fn refused_files(&self, refused: Refused) {
        let pv = self
            .shipping
            .lock()
            .expect("not poisoned")
            .iter()
            .find(|(_, s)| {
                s.root == refused.source.root
                    || s.root
                        .canonicalize()
                        .is_ok_and(|r| r == refused.source.root)
            })
            .map(|(name, _)| name.clone());
        let Some(pv) = pv.and_then(|name| self.store.get(&ObjectRef::new(&name))) else {
            return;
        };
        let claim = pv.spec.as_ref().and_then(|s| s.claim_ref.clone());
        let on = claim.unwrap_or_else(|| pv.object_ref(&()));
        self.event(&on, EventType::Warning, "LogsNotShipped", refused.note())
            .await;
    }

    /// Stops shipping volumes whose PV vanished without us (our finalizer removed by hand).
    pub async fn forget_vanished(&self) {
        let vanished: Vec<(String, PathBuf)> = self
            .shipping
            .lock()
            .expect("not poisoned")
            .iter()
            .filter(|(name, _)| self.store.get(&ObjectRef::new(name)).is_none())
            .map(|(name, s)| (name.clone(), s.root.clone()))
            .collect();
        for (name, root) in vanished {
            tracing::warn!(pv = %name, "PV gone while its logs were shipped; no longer watching it");
            self.sources.lock().await.remove(&root).await;
            self.forget(&name);
        }
    }

    fn forget(&self, pv: &str) {
        let mut shipping = self.shipping.lock().expect("not poisoned");
        if let Some(Shipping {
            drain: Some(source),
            ..
        }) = shipping.remove(pv)
        {
            let mut drained = self.drained.lock().expect("not poisoned");
            drained.retain(|d| !Arc::ptr_eq(d, &source));
        }
        self.update_gauges(&shipping);
    }

    fn update_gauges(&self, shipping: &HashMap<String, Shipping>) {
        let draining = shipping.values().filter(|s| s.drain.is_some()).count();
        self.metrics.volumes_draining.set(draining as i64);
        self.metrics
            .volumes_watched
            .set((shipping.len() - draining) as i64);
    }

    async fn opt_in(&self, pv: &PersistentVolume) -> Result<OptIn> {
        let spec = pv.spec.as_ref();
        let claim = match spec.and_then(|s| s.claim_ref.as_ref()) {
            Some(r) => {
                let (ns, name) = (r.namespace.as_deref(), r.name.as_deref());
                let found = match (ns, name) {
                    (Some(ns), Some(name)) => {
                        Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), ns)
                            .get_opt(name)
                            .await?
                    }
                    _ => None,
                };
                // A new claim of the same name is not the one bound here.
                found.filter(|c| r.uid.is_none() || c.metadata.uid == r.uid)
            }
            None => None,
        };
        let class = match spec.and_then(|s| s.storage_class_name.as_deref()) {
            Some(name) if !name.is_empty() => {
                Api::<StorageClass>::all(self.client.clone())
                    .get_opt(name)
                    .await?
            }
            _ => None,
        };
        let asked = Asked {
            claim: claim.as_ref().and_then(|c| c.metadata.annotations.as_ref()),
            volume: pv.metadata.annotations.as_ref(),
            class_parameters: class.as_ref().and_then(|c| c.parameters.as_ref()),
            class_annotations: class.as_ref().and_then(|c| c.metadata.annotations.as_ref()),
        };
        let namespace = spec
            .and_then(|s| s.claim_ref.as_ref())
            .and_then(|r| r.namespace.as_deref());
        Ok(opt_in::decide(
            &self.annotation,
            &self.dest,
            namespace,
            asked,
        ))
    }

    /// Where the volume's logs go: under its claim's namespace when `--dest` says so.
    fn place(&self, volume: &Volume) -> Result<Option<Place>, String> {
        let dest = opt_in::destination_of(&self.dest, volume.namespace.as_deref());
        dest.map(|dest| dest.place())
    }

    /// Reports why a volume is not shipped, once per PV and message: on its claim, where its
    /// owner looks, else on the PV.
    async fn refuse(&self, pv: &PersistentVolume, why: String) {
        let name = pv.name_any();
        let previous = self
            .refused
            .lock()
            .expect("not poisoned")
            .insert(name.clone(), why.clone());
        if previous.as_ref() == Some(&why) {
            return;
        }
        tracing::warn!(pv = %name, "{why}");
        let claim = pv.spec.as_ref().and_then(|s| s.claim_ref.clone());
        let on = claim.unwrap_or_else(|| pv.object_ref(&()));
        self.event(&on, EventType::Warning, "LogShippingRefused", why)
            .await;
    }

    /// Publishes an Event; failing to is logged, never fatal.
    async fn event(&self, on: &ObjectReference, type_: EventType, reason: &str, note: String) {
        self.events
            .publish(on, type_, reason, "ShipLogs", note)
            .await;
    }
}

pub async fn reconcile(pv: Arc<PersistentVolume>, ctx: Arc<Context>) -> Result<Action> {
    let shipping = ctx
        .shipping
        .lock()
        .expect("not poisoned")
        .contains_key(&pv.name_any());
    let opt_in = if step::asks_opt_in(&pv, shipping) {
        Some(ctx.opt_in(&pv).await?)
    } else {
        None
    };
    let api = Api::<PersistentVolume>::all(ctx.client.clone());
    let (volume, hold) = match step::next(&pv, &ctx.node, opt_in) {
        Step::Ignore => return Ok(Action::await_change()),
        Step::Recheck => return Ok(Action::requeue(OPT_IN_RECHECK)),
        Step::Refuse(why) => {
            ctx.refuse(&pv, why).await;
            return Ok(Action::requeue(OPT_IN_RECHECK));
        }
        Step::RefuseAndRelease(why) => {
            ctx.refuse(&pv, why).await;
            finalizer::release(&api, &pv).await?;
            return Ok(Action::await_change());
        }
        Step::Drain => return drain(&pv, &ctx).await,
        Step::Unusable(why) => {
            ctx.refuse(&pv, why).await;
            return Ok(Action::await_change());
        }
        Step::Ship { volume, hold } => (volume, hold),
    };
    let place = match ctx.place(&volume) {
        Ok(place) => place,
        Err(why) => {
            ctx.refuse(&pv, format!("{why}; its logs are not shipped"))
                .await;
            return Ok(Action::await_change());
        }
    };
    // The finalizer before the watch: a volume shipped from is never removed unshipped.
    if hold && !finalizer::hold(&api, &pv).await? {
        return Ok(Action::await_change());
    }
    let already = ctx
        .shipping
        .lock()
        .expect("not poisoned")
        .contains_key(&volume.name);
    if !already {
        ctx.sources
            .lock()
            .await
            .add_to(&volume.host_path, place)
            .map_err(|e| unreadable(&volume, e))?;
        tracing::info!(pv = %volume.name, dir = %volume.host_path.display(), "shipping this volume's logs");
        let mut shipping = ctx.shipping.lock().expect("not poisoned");
        let entry = Shipping {
            root: volume.host_path.clone(),
            drain: None,
        };
        shipping.insert(volume.name.clone(), entry);
        ctx.update_gauges(&shipping);
    }
    Ok(Action::await_change())
}

/// The PV is deleted: ship everything in its directory now, then let it go.
async fn drain(pv: &PersistentVolume, ctx: &Context) -> Result<Action> {
    let volume = Volume::of(pv, &ctx.node).map_err(|why| {
        Error::Volume(format!(
            "{why}; the PV keeps the {} finalizer until that is fixed",
            localship_names::SHIP_LOGS_FINALIZER
        ))
    })?;
    let draining = ctx
        .shipping
        .lock()
        .expect("not poisoned")
        .get(&volume.name)
        .and_then(|s| s.drain.clone());
    let Some(source) = draining else {
        let place = ctx.place(&volume).map_err(|why| {
            Error::Volume(format!(
                "{why}; the PV keeps the {} finalizer until that is fixed",
                localship_names::SHIP_LOGS_FINALIZER
            ))
        })?;
        let mut sources = ctx.sources.lock().await;
        let started = sources.drain_to(&volume.host_path, place).await;
        drop(sources);
        match started {
            Ok(source) => {
                tracing::info!(pv = %volume.name, "PV deleted; shipping every log in it before letting it go");
                let mut shipping = ctx.shipping.lock().expect("not poisoned");
                let entry = Shipping {
                    root: volume.host_path.clone(),
                    drain: Some(source),
                };
                shipping.insert(volume.name.clone(), entry);
                ctx.update_gauges(&shipping);
                return Ok(Action::requeue(DRAIN_POLL));
            }
            // The base path is here and the directory is not: nothing is left to ship.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && volume.base_path.is_dir() => {
                tracing::info!(pv = %volume.name, "PV deleted and its directory is gone; letting it go");
            }
            Err(e) => return Err(unreadable(&volume, e)),
        }
        return release(pv, ctx, &volume).await;
    };
    let finished = ctx
        .drained
        .lock()
        .expect("not poisoned")
        .iter()
        .any(|d| Arc::ptr_eq(d, &source));
    if !finished {
        return Ok(Action::requeue(DRAIN_POLL));
    }
    release(pv, ctx, &volume).await
}

async fn release(pv: &PersistentVolume, ctx: &Context, volume: &Volume) -> Result<Action> {
    let api = Api::<PersistentVolume>::all(ctx.client.clone());
    finalizer::release(&api, pv).await?;
    ctx.sources.lock().await.remove(&volume.host_path).await;
    ctx.forget(&volume.name);
    ctx.refused
        .lock()
        .expect("not poisoned")
        .remove(&volume.name);
    tracing::info!(pv = %volume.name, "every log shipped; released the PV");
    ctx.event(
        &pv.object_ref(&()),
        EventType::Normal,
        "LogsShipped",
        "every log in the volume is shipped; its directory may be removed".into(),
    )
    .await;
    Ok(Action::await_change())
}

fn unreadable(volume: &Volume, e: std::io::Error) -> Error {
    Error::Volume(format!(
        "cannot read the directory `{}` of PV {}: {e} — mount the base path `{}` in the \
         shipper's container at the same path, readable by it",
        volume.host_path.display(),
        volume.name,
        volume.base_path.display()
    ))
}

pub fn error_policy(pv: Arc<PersistentVolume>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(pv = %pv.name_any(), error = %error, "reconcile failed; retrying");
    Action::requeue(RETRY)
}
