//! Shared steps of the end-to-end tests: the claim helpers of the harness,
//! and what only tests sharing one control plane need.

pub use localship_tests::claims::*;

/// Held by tests that make a default StorageClass: with two defaults the
/// apiserver picks the newest, so they take turns.
pub static DEFAULT_CLASS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
