//! End-to-end tests against real servers on loopback: one control plane is
//! shared by the tests of this binary, each test works in a fresh namespace
//! with agents and provisioner names of its own, and every MinIO is a test's own.

mod airflow_reader;
mod authority;
mod beside_airflow;
mod coexist;
mod common;
mod dashboard;
mod deploy;
mod events;
mod helm;
mod logshipper;
mod node_cleanup;
mod provisioner;
mod real_airflow;
mod shipper_volumes;
mod smoke;
mod tenancy;
