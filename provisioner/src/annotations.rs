//! Every annotation, label and finalizer the provisioner reads or writes. Those the log
//! shipper reads or writes too are defined in `localship-names`, and named here with the rest.

pub use localship_names::{BASE_PATH, HOST_PATH, NODE, NODE_LABEL, SHIP_LOGS_FINALIZER, SHIP_TO};

/// Set by the scheduler on a WaitForFirstConsumer claim: the node it picked.
pub const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
/// Set by the PV controller: which provisioner must act on the claim.
pub const STORAGE_PROVISIONER: &str = "volume.kubernetes.io/storage-provisioner";
/// The pre-1.23 spelling of [`STORAGE_PROVISIONER`], still set for old clients.
pub const STORAGE_PROVISIONER_BETA: &str = "volume.beta.kubernetes.io/storage-provisioner";
/// Set by the PV controller once a claim is bound: what an agent that watches only
/// metadata reads instead of `spec.volumeName`.
pub const BIND_COMPLETED: &str = "pv.kubernetes.io/bind-completed";
/// Stamped on every PV we create, as the external-provisioner library does.
pub const PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";

/// Held by the provisioner until the volume's directory is removed (or kept,
/// with `Retain`), so a PV never disappears while its data is unaccounted for.
pub const CLEANUP_FINALIZER: &str = "localship.io/cleanup";

/// StorageClass parameter or claim annotation: `hostPath` (default) or `local`.
pub const VOLUME_TYPE: &str = "volumeType";
/// StorageClass parameter: template for the directory name under the base path.
pub const PATH_PATTERN: &str = "pathPattern";
/// StorageClass parameter: use only this base path.
pub const NODE_PATH: &str = "nodePath";

/// The provisioner name this project answers to by default.
pub const DEFAULT_PROVISIONER_NAME: &str = "localship.io/local-path";
/// rancher's name, served with `--serve-rancher` so existing classes keep working.
pub const RANCHER_PROVISIONER_NAME: &str = "rancher.io/local-path";
