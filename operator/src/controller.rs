//! The KefuCluster controller: a thin `reconcile` that runs kube's finalizer helper and dispatches to
//! `apply` (render and server-side apply every child, then write status) or `cleanup` (the volume policy).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kefu_crds::{CleanupPolicy, KefuCluster, KefuClusterStatus};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use crate::condition::{self, Problem};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::workload::{self, Owner};
use crate::{monitoring, network, scaling};

/// Finalizer that runs the cleanup policy before the KefuCluster goes away.
pub const FINALIZER: &str = "kefu.io/cleanup";
/// Field manager of every server-side apply.
pub const MANAGER: &str = "kefu-operator";
/// Requeue while pods are rolling, scaling or draining.
const BUSY_REQUEUE: Duration = Duration::from_secs(10);
/// Requeue of a settled cluster (drift check, fresh connection census).
const IDLE_REQUEUE: Duration = Duration::from_secs(60);
/// First retry after a failure; doubles per consecutive failure of the same object.
const BACKOFF_BASE: Duration = Duration::from_secs(2);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Handles shared by every reconcile.
#[derive(Clone)]
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Consecutive failures per object (`namespace/name`), for exponential backoff.
    failures: Arc<Mutex<HashMap<String, u32>>>,
}

impl Context {
    /// A context for `client`; events are reported as `kefu-operator` from `instance`.
    pub fn new(client: Client, metrics: Arc<Metrics>, instance: Option<String>) -> Context {
        let reporter = Reporter { controller: MANAGER.into(), instance };
        Context { recorder: Recorder::new(client.clone(), reporter), client, metrics, failures: Arc::default() }
    }

    /// Delay before retrying `key` after a failure: 2 s, 4 s, 8 s … capped at 5 minutes.
    pub fn backoff(&self, key: &str) -> Duration {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = f.entry(key.to_owned()).or_insert(0);
        *n = n.saturating_add(1);
        BACKOFF_BASE.saturating_mul(1u32 << (*n - 1).min(16)).min(BACKOFF_MAX)
    }

    fn succeeded(&self, key: &str) {
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}

fn key(kc: &KefuCluster) -> String {
    format!("{}/{}", kc.namespace().unwrap_or_default(), kc.name_any())
}

/// Reconcile one KefuCluster (called by the Controller, and directly by tests).
pub async fn reconcile(kc: Arc<KefuCluster>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let ns = kc.namespace().ok_or(Error::MissingMetadata("namespace"))?;
    let api: Api<KefuCluster> = Api::namespaced(ctx.client.clone(), &ns);
    let k = key(&kc);
    let result = finalizer(&api, FINALIZER, kc, |event| async {
        match event {
            Finalizer::Apply(kc) => apply(kc, &ctx).await,
            Finalizer::Cleanup(kc) => cleanup(kc, &ctx).await,
        }
    })
    .await;
    let result = match result {
        // A queued reconcile of an object whose finalizer was just released and which is gone now: done.
        Err(kube::runtime::finalizer::Error::RemoveFinalizer(e)) if is_not_found(&e) => Ok(Action::await_change()),
        other => other.map_err(|e| Error::Finalizer(Box::new(e))),
    };
    ctx.metrics.observe(started.elapsed().as_secs_f64(), result.as_ref().err());
    if result.is_ok() {
        ctx.succeeded(&k);
    }
    result
}

/// Retry a failed object with per-object exponential backoff.
pub fn error_policy(kc: Arc<KefuCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.backoff(&key(&kc));
    warn!(cluster = %key(&kc), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

fn params() -> PatchParams {
    PatchParams::apply(MANAGER).force()
}

async fn apply_typed<K>(api: &Api<K>, obj: &K) -> Result<K>
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let name = obj.meta().name.clone().ok_or(Error::MissingMetadata("name"))?;
    Ok(api.patch(&name, &params(), &Patch::Apply(obj)).await?)
}

/// Apply a child of an optional API (CRD that may be missing). `Ok(false)`: the API is not installed.
async fn apply_dynamic(client: &Client, ns: &str, ar: &ApiResource, obj: &DynamicObject) -> Result<bool> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, ar);
    let name = obj.metadata.name.clone().ok_or(Error::MissingMetadata("name"))?;
    match api.patch(&name, &params(), &Patch::Apply(obj)).await {
        Ok(_) => Ok(true),
        Err(e) if is_not_found(&e) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// Delete a child that is no longer wanted; absent objects and absent APIs are fine.
async fn delete_if_present<K>(api: Api<K>, name: &str) -> Result<()>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Render and apply every child, then write status.
async fn apply(kc: Arc<KefuCluster>, ctx: &Context) -> Result<Action> {
    let owner = Owner::of(&kc)?;
    let client = &ctx.client;
    let ns = owner.namespace.as_str();
    let name = owner.name.as_str();
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    let mut sts = sts_api.get_opt(name).await?;
    let mut problem = None;
    let mut config_hash = kc.status.as_ref().and_then(|s| s.config_hash.clone());
    let target = kc.spec.effective_replicas();
    let mut stepping_down = false;

    if !kc.spec.paused {
        match workload::config_map(&owner, &kc) {
            Err(Error::InvalidSpec(message)) => problem = Some(Problem { reason: "InvalidSpec", message }),
            Err(e) => return Err(e),
            Ok(cm) => {
                let hash = workload::config_hash(&cm);
                apply_typed(&Api::<ConfigMap>::namespaced(client.clone(), ns), &cm).await?;
                let svc: Api<Service> = Api::namespaced(client.clone(), ns);
                apply_typed(&svc, &network::headless_service(&owner, &kc)).await?;
                apply_typed(&svc, &network::client_service(&owner, &kc)).await?;
                let replicas = workload::next_replicas(target, sts.as_ref());
                stepping_down = replicas != target;
                let desired = workload::stateful_set(&owner, &kc, replicas, &hash);
                sts = Some(apply_typed(&sts_api, &desired).await?);
                config_hash = Some(hash);
                problem = apply_optional_children(&owner, &kc, client).await?;
            }
        }
    }

    let now = Time(Timestamp::now());
    let fresh = condition::compute(&kc.spec, kc.metadata.generation, sts.as_ref(), problem.as_ref(), &now);
    let old = kc.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    let (conditions, flips) = condition::merge(old, fresh);
    let st = sts.as_ref().and_then(|s| s.status.as_ref());
    let port = u16::try_from(kc.spec.ports.http).unwrap_or(8080);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let connections = crate::census::count(&pods, &workload::selector_string(name), port).await?;
    let status = KefuClusterStatus {
        connections,
        observed_generation: kc.metadata.generation,
        replicas: st.map_or(0, |s| s.replicas),
        ready_replicas: st.and_then(|s| s.ready_replicas).unwrap_or(0),
        selector: Some(workload::selector_string(name)),
        config_hash,
        conditions,
    };
    let settled = status.conditions.iter().any(|c| c.type_ == condition::PROGRESSING && c.status == "False");
    let patch = serde_json::json!({
        "apiVersion": format!("{}/{}", kefu_crds::GROUP, kefu_crds::VERSION),
        "kind": "KefuCluster",
        "status": status,
    });
    let api: Api<KefuCluster> = Api::namespaced(client.clone(), ns);
    api.patch_status(name, &params(), &Patch::Apply(&patch)).await?;

    for flip in flips {
        info!(cluster = %key(&kc), condition = %flip.type_, status = %flip.status, reason = %flip.reason, "condition changed");
        let degraded = flip.type_ == condition::DEGRADED && flip.status == "True";
        let event = KubeEvent {
            type_: if degraded { EventType::Warning } else { EventType::Normal },
            reason: flip.reason,
            note: Some(format!("{}={}: {}", flip.type_, flip.status, flip.message)),
            action: "Reconcile".into(),
            secondary: None,
        };
        // An event that cannot be written must not fail the reconcile.
        if let Err(e) = ctx.recorder.publish(&event, &kc.object_ref(&())).await {
            warn!(cluster = %key(&kc), error = %e, "cannot publish event");
        }
    }

    Ok(Action::requeue(if stepping_down || !settled { BUSY_REQUEUE } else { IDLE_REQUEUE }))
}

/// PDB, autoscaler, Ingress/HTTPRoute, ServiceMonitor: applied when wanted, deleted when not. Returns the
/// problem to report when a wanted API (KEDA, Gateway API) is not installed.
async fn apply_optional_children(owner: &Owner, kc: &KefuCluster, client: &Client) -> Result<Option<Problem>> {
    let ns = owner.namespace.as_str();
    let name = owner.name.as_str();
    let mut problem = None;

    let pdb_api: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), ns);
    match scaling::pdb(owner, kc) {
        Some(p) => drop(apply_typed(&pdb_api, &p).await?),
        None => delete_if_present(pdb_api, name).await?,
    }
    let hpa_api: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), ns);
    match scaling::hpa(owner, kc) {
        Some(h) => drop(apply_typed(&hpa_api, &h).await?),
        None => delete_if_present(hpa_api, name).await?,
    }
    let keda = scaling::scaled_object_resource();
    match scaling::scaled_object(owner, kc) {
        Some(so) => {
            if !apply_dynamic(client, ns, &keda, &so).await? {
                problem = Some(Problem {
                    reason: "MissingCRD",
                    message: "autoscaling.kind is Keda but KEDA (scaledobjects.keda.sh) is not installed".into(),
                });
            }
        }
        None => delete_if_present(Api::<DynamicObject>::namespaced_with(client.clone(), ns, &keda), name).await?,
    }
    let ing_api: Api<Ingress> = Api::namespaced(client.clone(), ns);
    match network::ingress(owner, kc) {
        Some(i) => drop(apply_typed(&ing_api, &i).await?),
        None => delete_if_present(ing_api, name).await?,
    }
    let route = network::http_route_resource();
    match network::http_route(owner, kc)? {
        Some(r) => {
            if !apply_dynamic(client, ns, &route, &r).await? {
                problem = Some(Problem {
                    reason: "MissingCRD",
                    message:
                        "httpRoute is set but the Gateway API (httproutes.gateway.networking.k8s.io) is not installed"
                            .into(),
                });
            }
        }
        None => delete_if_present(Api::<DynamicObject>::namespaced_with(client.clone(), ns, &route), name).await?,
    }
    let sm = monitoring::service_monitor_resource();
    match monitoring::service_monitor(owner, kc) {
        // No Prometheus Operator: nothing to do, and nothing wrong.
        Some(m) => drop(apply_dynamic(client, ns, &sm, &m).await?),
        None => delete_if_present(Api::<DynamicObject>::namespaced_with(client.clone(), ns, &sm), name).await?,
    }
    Ok(problem)
}

/// Deletion: children go with their owner (garbage collection); volumes follow the cleanup policy.
async fn cleanup(kc: Arc<KefuCluster>, ctx: &Context) -> Result<Action> {
    let owner = Owner::of(&kc)?;
    let note = match kc.spec.cleanup_policy {
        CleanupPolicy::Delete => {
            let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &owner.namespace);
            let selector = workload::selector_string(&owner.name);
            pvcs.delete_collection(&DeleteParams::background(), &ListParams::default().labels(&selector)).await?;
            "deleted the volumes (cleanupPolicy Delete)"
        }
        CleanupPolicy::Retain => "kept the volumes (cleanupPolicy Retain)",
    };
    info!(cluster = %key(&kc), note, "cleaned up");
    let event = KubeEvent {
        type_: EventType::Normal,
        reason: "Deleted".into(),
        note: Some(note.into()),
        action: "Cleanup".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &kc.object_ref(&())).await {
        warn!(cluster = %key(&kc), error = %e, "cannot publish event");
    }
    Ok(Action::await_change())
}

/// Run the controller until `shutdown` resolves. Watches only children labelled as managed by the operator.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> Result<()> {
    let client = ctx.client.clone();
    let clusters: Api<KefuCluster> = Api::all(client.clone());
    // Fail early and clearly when the CRD is not installed.
    clusters.list(&ListParams::default().limit(1)).await?;
    let owned = watcher::Config::default().labels(&format!("{}={}", workload::MANAGED_BY.0, workload::MANAGED_BY.1));
    Controller::new(clusters, watcher::Config::default().any_semantic())
        .owns(Api::<StatefulSet>::all(client.clone()), owned.clone())
        .owns(Api::<ConfigMap>::all(client.clone()), owned.clone())
        .owns(Api::<Service>::all(client.clone()), owned)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                warn!(error = %e, "controller stream error");
            }
        })
        .await;
    Ok(())
}
