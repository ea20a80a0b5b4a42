//! The names on a PV that both agents read or write: the provisioner stamps them when it
//! makes a volume, and the log shipper finds the volume's directory by them and holds the
//! PV until its logs are shipped. A name only one agent uses stays in that agent.

/// Label on the provisioner's PVs: the node whose disk holds the directory, so each agent
/// watches only its own node's volumes.
pub const NODE_LABEL: &str = "localship.io/node";
/// Annotation naming that node too.
pub const NODE: &str = "localship.io/node";
/// Absolute path of the volume's directory on that node (the shipper mounts it at the same
/// path).
pub const HOST_PATH: &str = "localship.io/host-path";
/// Base path the directory was made under (which disk, with several).
pub const BASE_PATH: &str = "localship.io/base-path";

/// Held by the log shipper until every log in the volume is shipped; the provisioner does
/// not remove the directory while it is present.
pub const SHIP_LOGS_FINALIZER: &str = "localship.io/ship-logs";
/// The log shipper's default opt-in annotation: on a claim (or its class), it asks for the
/// volume's logs to be shipped; the provisioner copies it onto the PV so the ask outlives
/// the claim.
pub const SHIP_TO: &str = "localship.io/ship-to";
