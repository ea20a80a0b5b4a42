//! The names shared with localship-provisioner (its `annotations.rs`; a test keeps the two
//! equal). The shipper reads the provisioner's and writes only its own finalizer.

/// Label on the provisioner's PVs: the node whose disk holds the directory.
pub const NODE_LABEL: &str = "localship.io/node";
/// Annotation naming that node too.
pub const NODE: &str = "localship.io/node";
/// Absolute path of the volume's directory on the node (mounted at the same path here).
pub const HOST_PATH: &str = "localship.io/host-path";
/// Base path the directory was made under.
pub const BASE_PATH: &str = "localship.io/base-path";
/// Held by the shipper until every log in the volume is shipped; the provisioner does not
/// remove the directory while it is present.
pub const SHIP_LOGS_FINALIZER: &str = "localship.io/ship-logs";

#[cfg(test)]
mod tests {
    use localship_provisioner::annotations as provisioner;

    #[test]
    fn the_names_are_the_provisioners() {
        assert_eq!(super::NODE_LABEL, provisioner::NODE_LABEL);
        assert_eq!(super::NODE, provisioner::NODE);
        assert_eq!(super::HOST_PATH, provisioner::HOST_PATH);
        assert_eq!(super::BASE_PATH, provisioner::BASE_PATH);
        assert_eq!(super::SHIP_LOGS_FINALIZER, provisioner::SHIP_LOGS_FINALIZER);
        assert_eq!(crate::cli::DEFAULT_OPT_IN_ANNOTATION, provisioner::SHIP_TO);
    }
}
