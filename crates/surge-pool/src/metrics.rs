//! Instance metrics, registered once and labelled by service.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use surge_metrics::{Counter, Family, Gauge, Metrics, ServiceLabels};

use crate::instance::InstanceState;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StateLabels {
    pub service: String,
    pub state: InstanceState,
}

impl EncodeLabelValue for InstanceState {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(self.as_str())
    }
}

#[derive(Clone, Default)]
pub struct PoolMetrics {
    pub(crate) instances: Family<StateLabels, Gauge>,
    pub(crate) desired: Family<ServiceLabels, Gauge>,
    pub(crate) max: Family<ServiceLabels, Gauge>,
    pub(crate) restarts: Family<ServiceLabels, Counter>,
    pub(crate) crash_looping: Family<ServiceLabels, Gauge>,
    pub(crate) panic: Family<ServiceLabels, Gauge>,
    pub(crate) ejections: Family<ServiceLabels, Counter>,
}

impl PoolMetrics {
    pub fn register(metrics: &Metrics) -> Self {
        let this = PoolMetrics::default();
        metrics.register(|registry| {
            registry.register("instances", "Instances by service and state", this.instances.clone());
            registry.register(
                "desired_instances",
                "Instances each pool is asked to run",
                this.desired.clone(),
            );
            registry.register(
                "max_instances",
                "The most instances each pool may run (instances.max)",
                this.max.clone(),
            );
            registry.register(
                "instance_restarts",
                "Instances replaced after exiting unexpectedly or failing to start",
                this.restarts.clone(),
            );
            registry.register(
                "crash_looping",
                "1 while a pool's instances keep failing and restarts are backed off",
                this.crash_looping.clone(),
            );
            registry.register(
                "autoscale_panic",
                "1 while a pool's autoscaler sizes for requests waiting beyond what its ready instances clear",
                this.panic.clone(),
            );
            registry.register(
                "outlier_ejections",
                "Instances taken out of rotation by their circuit breaker",
                this.ejections.clone(),
            );
        });
        this
    }
}
