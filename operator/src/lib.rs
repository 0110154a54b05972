//! `kefu-operator`: reconciles `KefuCluster` objects (crate `kefu-crds`) into a running Kefu chat cluster.
//!
//! - [`nodeconfig`] renders the kefu-node TOML (and the cluster-mode settings) from the spec;
//! - [`workload`] builds the ConfigMap and the StatefulSet (names, labels, config hash, drain, spread);
//! - [`network`] the headless and client Services, Ingress and HTTPRoute;
//! - [`scaling`] the PodDisruptionBudget, HPA and KEDA ScaledObject;
//! - [`monitoring`] the ServiceMonitor;
//! - [`census`] sums `kefu_connections` over the ready pods for `status.connections`;
//! - [`condition`] the Ready / Progressing / Degraded status conditions;
//! - [`controller`] the thin reconcile (finalizer → apply / cleanup), backoff and the watch loop;
//! - [`lease`] leader election on a coordination.k8s.io Lease, so two replicas are safe;
//! - [`metrics`] the operator's Prometheus metrics.
//!
//! Builders are pure functions of the KefuCluster, so they are tested without an API server; the controller
//! is tested against a mocked API (`tower_test`), and the binary against the Kubernetes API emulator in `e2e/`.

pub mod census;
pub mod condition;
pub mod controller;
pub mod error;
pub mod lease;
pub mod metrics;
pub mod monitoring;
pub mod network;
pub mod nodeconfig;
pub mod scaling;
pub mod workload;

#[cfg(test)]
pub mod fixtures;
#[cfg(test)]
mod scenario;

pub use controller::{Context, reconcile};
pub use error::{Error, Result};

use kefu_crds::KefuCluster;

/// Every child the operator would create for `kc`, as YAML documents (`kefu-operator render`).
pub fn render(kc: &KefuCluster) -> Result<String> {
    let owner = workload::Owner::of(kc)?;
    let cm = workload::config_map(&owner, kc)?;
    let hash = workload::config_hash(&cm);
    let mut docs: Vec<serde_json::Value> = vec![
        serde_json::to_value(&cm)?,
        serde_json::to_value(network::headless_service(&owner, kc))?,
        serde_json::to_value(network::client_service(&owner, kc))?,
        serde_json::to_value(workload::stateful_set(&owner, kc, kc.spec.effective_replicas(), &hash))?,
    ];
    if let Some(p) = scaling::pdb(&owner, kc) {
        docs.push(serde_json::to_value(p)?);
    }
    if let Some(h) = scaling::hpa(&owner, kc) {
        docs.push(serde_json::to_value(h)?);
    }
    if let Some(i) = network::ingress(&owner, kc) {
        docs.push(serde_json::to_value(i)?);
    }
    for extra in
        [scaling::scaled_object(&owner, kc), network::http_route(&owner, kc)?, monitoring::service_monitor(&owner, kc)]
            .into_iter()
            .flatten()
    {
        docs.push(serde_json::to_value(extra)?);
    }
    let mut out = String::new();
    for d in docs {
        out.push_str("---\n");
        out.push_str(&serde_json::to_string_pretty(&d)?);
        out.push('\n');
    }
    Ok(out)
}
