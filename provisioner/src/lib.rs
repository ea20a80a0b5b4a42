//! localship's node-local provisioner. Read top-down: [`claim`] decides
//! whether a claim is this node's, [`paths`] and [`volume`] plan the
//! directory and the PV (pure), [`disk`] makes and removes directories,
//! [`provision`] and [`reclaim`] are the two controllers.

pub mod annotations;
pub mod claim;
pub mod config;
pub mod disk;
pub mod paths;
pub mod quantity;
pub mod volume;
