//! Prometheus metrics of the provisioner.

use prometheus::{
    exponential_buckets, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// operation = provision | delete; result = success | error | invalid | no_space | no_path
    pub operations: IntCounterVec,
    pub duration: HistogramVec,
    pub free_bytes: IntGaugeVec,
    pub used_bytes: IntGaugeVec,
    /// action = removed | kept
    pub orphans: IntCounterVec,
    /// result = success | error
    pub config_reloads: IntCounterVec,
    /// Reconciles of a claim whose class binds Immediately, by what became of its one
    /// Event; result = published | exists | error
    pub immediate_binding: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        let registry =
            Registry::new_custom(Some("localship_provisioner".into()), None).expect("valid prefix");
        let operations = IntCounterVec::new(
            Opts::new(
                "operations_total",
                "Provision and delete operations by result",
            ),
            &["operation", "result"],
        )
        .unwrap();
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "operation_duration_seconds",
                "Time to provision or delete a volume",
            )
            .buckets(exponential_buckets(0.001, 2.0, 16).unwrap()),
            &["operation"],
        )
        .unwrap();
        let free_bytes = IntGaugeVec::new(
            Opts::new(
                "base_path_free_bytes",
                "Free bytes on the filesystem of each base path",
            ),
            &["path"],
        )
        .unwrap();
        let used_bytes = IntGaugeVec::new(
            Opts::new(
                "base_path_used_bytes",
                "Used bytes on the filesystem of each base path",
            ),
            &["path"],
        )
        .unwrap();
        let orphans = IntCounterVec::new(
            Opts::new(
                "orphan_directories_total",
                "Directories found without a PV at start-up",
            ),
            &["action"],
        )
        .unwrap();
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "config_reloads_total",
                "Reloads of the config file by result",
            ),
            &["result"],
        )
        .unwrap();
        let immediate_binding = IntCounterVec::new(
            Opts::new(
                "immediate_binding_claims_total",
                "Reconciles of a claim whose class binds Immediately, by what became of its warning Event",
            ),
            &["result"],
        )
        .unwrap();
        for c in [&operations, &orphans, &config_reloads, &immediate_binding] {
            registry.register(Box::new(c.clone())).unwrap();
        }
        registry.register(Box::new(duration.clone())).unwrap();
        registry.register(Box::new(free_bytes.clone())).unwrap();
        registry.register(Box::new(used_bytes.clone())).unwrap();
        Self {
            registry,
            operations,
            duration,
            free_bytes,
            used_bytes,
            orphans,
            config_reloads,
            immediate_binding,
        }
    }
}
