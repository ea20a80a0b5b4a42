//! Whose a volume directory is: the record `disk` keeps beside the volumes,
//! read against the API, so a directory is held only by a PV that exists.

use std::path::Path;

use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::Api;

use crate::context::Context;
use crate::{disk, Result};

/// The other PV, still existing, that `base/rel` belongs to; `None` when it
/// is `pv`'s, unrecorded, or recorded for a PV that is gone.
pub async fn held_by_other(
    ctx: &Context,
    base: &Path,
    rel: &Path,
    pv: &str,
) -> Result<Option<String>> {
    let (b, r) = (base.to_path_buf(), rel.to_path_buf());
    let recorded = tokio::task::spawn_blocking(move || disk::owner(&b, &r))
        .await
        .expect("owner does not panic")?;
    let Some(other) = recorded.filter(|o| o != pv) else {
        return Ok(None);
    };
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    Ok(pvs.get_opt(&other).await?.map(|_| other))
}
