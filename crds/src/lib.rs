//! `kefu-crds`: the `KefuCluster` custom resource (`kefu.io/v1alpha1`).
//!
//! The Rust types here are the single source of the CRD: `crdgen` prints the YAML that is committed as
//! `crds/kefucluster.yaml` and copied into the operator chart, and `make check-generated` fails when the two
//! drift. Validation that the API server can do on its own (defaults, ranges, CEL rules with messages) lives
//! in the schema, so a bad manifest is refused at `kubectl apply` time instead of in the operator's log.
//!
//! Cluster-mode settings (Redis, S3, gossip and peer ports) are part of the API already: the operator renders
//! them next to the node config so that clusters created today keep working once the node learns them.

// kube's `printcolumn(...)` attributes repeat `type_ = "integer"`, which this lint mistakes for duplicates.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration, TopologySpreadConstraint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every Kefu resource.
pub const GROUP: &str = "kefu.io";
/// Served and stored version.
pub const VERSION: &str = "v1alpha1";
/// Default node image (the tag follows the workspace version).
pub const DEFAULT_IMAGE: &str = concat!("ghcr.io/kefu-chat/kefu-node:", env!("CARGO_PKG_VERSION"));

/// Desired state of one Kefu chat cluster: a StatefulSet of `kefu-node` pods plus everything around it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kefu.io",
    version = "v1alpha1",
    kind = "KefuCluster",
    namespaced,
    cel,
    status = "KefuClusterStatus",
    derive = "PartialEq",
    shortname = "kefu",
    category = "kefu",
    doc = "A Kefu live-chat cluster: kefu-node pods, their config, services, ingress and autoscaling.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Status", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason"),
    printcolumn(name = "Connections", type_ = "integer", json_path = ".status.connections"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(
    validation = Rule::new("!(has(self.ingress) && has(self.httpRoute))").message("set either ingress or httpRoute, not both"),
    validation = Rule::new("self.replicas <= 1 || has(self.auth)").message("more than one replica needs auth.secretRef: every node must sign and verify tokens with the same secret"),
    validation = Rule::new("!has(self.autoscaling) || self.autoscaling.maxReplicas <= 1 || has(self.auth)").message("autoscaling beyond one replica needs auth.secretRef"),
)]
#[serde(rename_all = "camelCase")]
pub struct KefuClusterSpec {
    /// Number of kefu-node pods. Ignored while `stopped`; driven by the autoscaler through /scale when
    /// `autoscaling` is set.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
    /// Container image of kefu-node.
    #[serde(default = "default_image")]
    #[x_kube(validation = Rule::new("self != ''").message("image must not be empty"))]
    pub image: String,
    /// Image pull policy: Always, IfNotPresent or Never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// CPU and memory for the kefu-node container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node config overrides, as TOML sections in YAML form (e.g. `routing: {strategy: least-loaded}`). The
    /// operator owns `node_id`, `server.listen`, `server.tcp_listen`, `data.dir` and `auth.secret`; setting
    /// them here is refused. Unknown keys make the node refuse to start (see `kefu-node print-config`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub config: Option<serde_json::Value>,
    /// Shared token-signing secret (required beyond one replica).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthSpec>,
    /// Redis for cluster-wide idempotency and locks (cluster mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisSpec>,
    /// S3-compatible store (MinIO) for the offline inbox and transcripts (cluster mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Spec>,
    /// Container ports.
    #[serde(default)]
    pub ports: PortsSpec,
    /// Per-pod volume for the node's local store.
    #[serde(default)]
    pub storage: StorageSpec,
    /// An Ingress in front of the client Service (with WebSocket-friendly timeouts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<IngressSpec>,
    /// A Gateway API HTTPRoute in front of the client Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_route: Option<HttpRouteSpec>,
    /// Scale on connections per pod (HPA on a Pods metric, or a KEDA ScaledObject).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
    /// PodDisruptionBudget for the pods.
    #[serde(default)]
    pub pdb: PdbSpec,
    /// Prometheus Operator ServiceMonitor (created only when that CRD is installed).
    #[serde(default)]
    pub service_monitor: ServiceMonitorSpec,
    /// Pod-level overrides.
    #[serde(default)]
    pub pod: PodSpecOverrides,
    /// Stop reconciling children (they are left as they are); status is still reported.
    #[serde(default)]
    pub paused: bool,
    /// Scale the StatefulSet to zero and keep everything else (volumes keep the data).
    #[serde(default)]
    pub stopped: bool,
    /// What happens to the pods' volumes when the KefuCluster is deleted.
    #[serde(default)]
    pub cleanup_policy: CleanupPolicy,
}

fn default_replicas() -> i32 {
    1
}

fn default_image() -> String {
    DEFAULT_IMAGE.to_owned()
}

fn free_form_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// Kubernetes image pull policy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// A key in a Secret of the cluster's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Secret name.
    #[x_kube(validation = Rule::new("self != ''").message("secret name must not be empty"))]
    pub name: String,
    /// Key inside the Secret.
    pub key: String,
}

/// Token signing secret shared by every node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    /// Secret key holding the HMAC secret (at least 16 bytes); passed as `KEFU_AUTH__SECRET`.
    pub secret_ref: SecretKeyRef,
}

/// Redis connection: a plain URL or a Secret holding it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.url) != has(self.urlSecretRef)").message("set exactly one of redis.url and redis.urlSecretRef"))]
pub struct RedisSpec {
    /// `redis://host:6379/0` (no password here: use `urlSecretRef` for credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Secret key holding the full URL, with credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_secret_ref: Option<SecretKeyRef>,
}

/// S3-compatible object store.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Spec {
    /// Endpoint URL, e.g. `http://minio.storage:9000`.
    #[x_kube(validation = Rule::new("self.startsWith('http://') || self.startsWith('https://')").message("s3.endpoint must be an http:// or https:// URL"))]
    pub endpoint: String,
    /// Bucket for the offline inbox and transcripts.
    #[schemars(length(min = 3, max = 63))]
    pub bucket: String,
    /// Region sent in signatures.
    #[serde(default = "default_region")]
    pub region: String,
    /// Path-style addressing (needed for MinIO).
    #[serde(default = "default_true")]
    pub path_style: bool,
    /// Secret with keys `accessKeyId` and `secretAccessKey`, passed as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
}

fn default_region() -> String {
    "us-east-1".into()
}

fn default_true() -> bool {
    true
}

/// Container ports of a node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.http != self.tcp && self.http != self.gossip && self.http != self.peer && self.gossip != self.peer && (self.tcp == 0 || (self.tcp != self.gossip && self.tcp != self.peer))").message("ports must be distinct"))]
pub struct PortsSpec {
    /// WebSocket, REST, health and metrics.
    #[serde(default = "default_http_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub http: i32,
    /// Raw TCP adapter; 0 disables it.
    #[serde(default = "default_tcp_port")]
    #[schemars(range(min = 0, max = 65535))]
    pub tcp: i32,
    /// Gossip (UDP) between nodes, on the headless Service (cluster mode).
    #[serde(default = "default_gossip_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub gossip: i32,
    /// Peer links between nodes, on the headless Service (cluster mode).
    #[serde(default = "default_peer_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub peer: i32,
}

fn default_http_port() -> i32 {
    8080
}
fn default_tcp_port() -> i32 {
    8081
}
fn default_gossip_port() -> i32 {
    7946
}
fn default_peer_port() -> i32 {
    7947
}

impl Default for PortsSpec {
    fn default() -> Self {
        PortsSpec {
            http: default_http_port(),
            tcp: default_tcp_port(),
            gossip: default_gossip_port(),
            peer: default_peer_port(),
        }
    }
}

/// The per-pod PersistentVolumeClaim.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf").message("storage is immutable (StatefulSet volume claim templates cannot change)"))]
pub struct StorageSpec {
    /// Requested size, e.g. `1Gi`.
    #[serde(default = "default_storage_size")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$"))]
    pub size: String,
    /// StorageClass; the cluster default when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

fn default_storage_size() -> String {
    "1Gi".into()
}

impl Default for StorageSpec {
    fn default() -> Self {
        StorageSpec { size: default_storage_size(), storage_class_name: None }
    }
}

/// Ingress for browsers and agent consoles.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngressSpec {
    /// IngressClass, e.g. `nginx`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_name: Option<String>,
    /// Public host name.
    #[schemars(length(min = 1))]
    pub host: String,
    /// TLS Secret for the host; plain HTTP when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret_name: Option<String>,
    /// Extra annotations (merged over the WebSocket timeout defaults).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Gateway API HTTPRoute.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteSpec {
    /// Gateways to attach to.
    #[schemars(length(min = 1))]
    pub parent_refs: Vec<GatewayRef>,
    /// Host names served.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
}

/// A Gateway reference.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayRef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
}

/// Which autoscaler drives `/scale`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum AutoscalerKind {
    /// HorizontalPodAutoscaler on the Pods metric `kefu_connections` (needs a custom metrics adapter).
    #[default]
    Hpa,
    /// KEDA ScaledObject with a Prometheus trigger.
    Keda,
}

/// Autoscaling on open connections per pod.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("autoscaling.minReplicas must be less than or equal to autoscaling.maxReplicas"))]
#[x_kube(validation = Rule::new("self.kind != 'Keda' || has(self.prometheusAddress)").message("autoscaling.kind Keda needs autoscaling.prometheusAddress"))]
pub struct AutoscalingSpec {
    #[serde(default)]
    pub kind: AutoscalerKind,
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1))]
    pub min_replicas: i32,
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Target average open connections per pod.
    #[serde(default = "default_target_connections")]
    #[schemars(range(min = 1))]
    pub target_connections_per_pod: i32,
    /// Prometheus server KEDA queries (Keda only), e.g. `http://prometheus.monitoring:9090`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus_address: Option<String>,
}

fn default_target_connections() -> i32 {
    5000
}

/// PodDisruptionBudget settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PdbSpec {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Pods that may be down at once during voluntary disruptions.
    #[serde(default = "default_max_unavailable")]
    #[schemars(range(min = 1))]
    pub max_unavailable: i32,
}

fn default_max_unavailable() -> i32 {
    1
}

impl Default for PdbSpec {
    fn default() -> Self {
        PdbSpec { enabled: true, max_unavailable: default_max_unavailable() }
    }
}

/// ServiceMonitor settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceMonitorSpec {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Scrape interval, e.g. `30s`.
    #[serde(default = "default_interval")]
    pub interval: String,
}

fn default_interval() -> String {
    "30s".into()
}

impl Default for ServiceMonitorSpec {
    fn default() -> Self {
        ServiceMonitorSpec { enabled: true, interval: default_interval() }
    }
}

/// Overrides applied to the pod template.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodSpecOverrides {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Replaces the default soft anti-affinity across nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Replaces the default zone spread.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Seconds a pod has to drain after SIGTERM (the node's shutdown grace is derived from it).
    #[serde(default = "default_grace")]
    #[schemars(range(min = 5, max = 3600))]
    pub termination_grace_period_seconds: i64,
    /// Extra environment variables for the node container (`KEFU_SECTION__KEY` overrides config).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<k8s_openapi::api::core::v1::EnvVar>,
}

fn default_grace() -> i64 {
    30
}

impl Default for PodSpecOverrides {
    fn default() -> Self {
        PodSpecOverrides {
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            affinity: None,
            topology_spread_constraints: Vec::new(),
            priority_class_name: None,
            service_account_name: None,
            termination_grace_period_seconds: default_grace(),
            env: Vec::new(),
        }
    }
}

/// Volumes on deletion of the KefuCluster.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum CleanupPolicy {
    /// Keep the PersistentVolumeClaims (the data survives re-creating the cluster).
    #[default]
    Retain,
    /// Delete the PersistentVolumeClaims with the cluster.
    Delete,
}

/// Observed state, written by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KefuClusterStatus {
    /// `metadata.generation` the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pods the StatefulSet runs now.
    #[serde(default)]
    pub replicas: i32,
    /// Pods passing `/readyz`.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector of the pods (for the scale subresource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Open client connections summed over the ready pods (`kefu_connections`), at the last reconcile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<i64>,
    /// Hash of the rendered node config the pods run with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    /// Ready, Progressing, Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

impl KefuClusterSpec {
    /// Replicas the StatefulSet should run: zero when stopped, else the spec's count kept within the
    /// autoscaler's bounds when one is configured.
    pub fn effective_replicas(&self) -> i32 {
        if self.stopped {
            return 0;
        }
        match &self.autoscaling {
            Some(a) => self.replicas.clamp(a.min_replicas, a.max_replicas.max(a.min_replicas)),
            None => self.replicas,
        }
    }
}

/// The CRD as YAML, exactly as committed under `crds/`.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&KefuCluster::crd())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    fn cluster(spec: serde_json::Value) -> KefuCluster {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "kefu.io/v1alpha1", "kind": "KefuCluster",
            "metadata": {"name": "chat", "namespace": "default"},
            "spec": spec,
        }))
        .unwrap()
    }

    fn cel_error(spec: serde_json::Value) -> String {
        match cluster(spec).validate_cel() {
            Ok(()) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn empty_spec_gets_defaults_that_pass_every_rule() {
        let c = cluster(serde_json::json!({}));
        assert_eq!(c.spec.replicas, 1);
        assert_eq!(c.spec.image, DEFAULT_IMAGE);
        assert_eq!(c.spec.ports, PortsSpec::default());
        assert_eq!(c.spec.storage.size, "1Gi");
        assert!(c.spec.pdb.enabled);
        assert_eq!(c.spec.cleanup_policy, CleanupPolicy::Retain);
        assert_eq!(c.spec.pod.termination_grace_period_seconds, 30);
        // Defaults of whole sections are written into the schema: they must equal the per-field defaults.
        let via_schema: KefuClusterSpec = serde_json::from_value(serde_json::json!({
            "pod": serde_json::to_value(PodSpecOverrides::default()).unwrap(),
            "ports": serde_json::to_value(PortsSpec::default()).unwrap(),
            "pdb": serde_json::to_value(PdbSpec::default()).unwrap(),
            "storage": serde_json::to_value(StorageSpec::default()).unwrap(),
            "serviceMonitor": serde_json::to_value(ServiceMonitorSpec::default()).unwrap(),
        }))
        .unwrap();
        assert_eq!(via_schema, c.spec);
        c.validate_cel().unwrap();
    }

    #[test]
    fn autoscaling_min_above_max_is_refused_with_its_message() {
        let auth = serde_json::json!({"secretRef": {"name": "kefu", "key": "secret"}});
        let err = cel_error(serde_json::json!({"auth": auth, "autoscaling": {"minReplicas": 5, "maxReplicas": 2}}));
        assert!(err.contains("minReplicas must be less than or equal"), "{err}");
        let ok = cel_error(serde_json::json!({"auth": auth, "autoscaling": {"minReplicas": 2, "maxReplicas": 5}}));
        assert_eq!(ok, "");
    }

    #[test]
    fn several_replicas_need_a_shared_auth_secret() {
        let err = cel_error(serde_json::json!({"replicas": 3}));
        assert!(err.contains("auth.secretRef"), "{err}");
        let ok = cel_error(serde_json::json!({"replicas": 3, "auth": {"secretRef": {"name": "s", "key": "k"}}}));
        assert_eq!(ok, "");
        let err = cel_error(serde_json::json!({"autoscaling": {"maxReplicas": 4}}));
        assert!(err.contains("autoscaling beyond one replica"), "{err}");
    }

    #[test]
    fn ingress_and_http_route_are_exclusive() {
        let err = cel_error(serde_json::json!({
            "ingress": {"host": "chat.example.com"},
            "httpRoute": {"parentRefs": [{"name": "gw"}]},
        }));
        assert!(err.contains("either ingress or httpRoute"), "{err}");
    }

    #[test]
    fn redis_needs_exactly_one_source() {
        let err = cel_error(serde_json::json!({"redis": {}}));
        assert!(err.contains("exactly one of redis.url"), "{err}");
        let err = cel_error(
            serde_json::json!({"redis": {"url": "redis://r:6379", "urlSecretRef": {"name": "r", "key": "u"}}}),
        );
        assert!(err.contains("exactly one of redis.url"), "{err}");
        assert_eq!(cel_error(serde_json::json!({"redis": {"url": "redis://r:6379"}})), "");
    }

    #[test]
    fn clashing_ports_and_bad_s3_endpoint_are_refused() {
        let err = cel_error(serde_json::json!({"ports": {"http": 9000, "tcp": 9000}}));
        assert!(err.contains("ports must be distinct"), "{err}");
        assert_eq!(cel_error(serde_json::json!({"ports": {"tcp": 0}})), "");
        let err = cel_error(serde_json::json!({"s3": {"endpoint": "minio:9000", "bucket": "kefu"}}));
        assert!(err.contains("s3.endpoint"), "{err}");
    }

    #[test]
    fn storage_cannot_change_after_creation() {
        let old = cluster(serde_json::json!({"storage": {"size": "1Gi"}}));
        let new = cluster(serde_json::json!({"storage": {"size": "5Gi"}}));
        let err = new.validate_cel_update(&old).unwrap_err().to_string();
        assert!(err.contains("storage is immutable"), "{err}");
        new.validate_cel_update(&new.clone()).unwrap();
    }

    #[test]
    fn crd_has_status_and_scale_subresources_and_printer_columns() {
        let crd = KefuCluster::crd();
        assert_eq!(crd.metadata.name.as_deref(), Some("kefuclusters.kefu.io"));
        let v = &crd.spec.versions[0];
        let sub = v.subresources.as_ref().unwrap();
        assert!(sub.status.is_some());
        let scale = sub.scale.as_ref().unwrap();
        assert_eq!(scale.spec_replicas_path, ".spec.replicas");
        assert_eq!(scale.label_selector_path.as_deref(), Some(".status.selector"));
        let cols: Vec<&str> = v.additional_printer_columns.as_ref().unwrap().iter().map(|c| c.name.as_str()).collect();
        assert_eq!(cols, ["Desired", "Ready", "Status", "Connections", "Age"]);
        let yaml = crd_yaml().unwrap();
        assert!(yaml.contains("x-kubernetes-validations"), "CEL rules missing from the schema");
        assert!(yaml.contains("x-kubernetes-preserve-unknown-fields: true"));
    }

    #[test]
    fn committed_crd_yaml_matches_the_types() {
        let want = crd_yaml().unwrap();
        for file in ["kefucluster.yaml", "../charts/kefu-operator/crds/kefucluster.yaml"] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
            let have = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(have == want, "{} is stale: run `make generate`", path.display());
        }
    }

    #[test]
    fn stopped_runs_zero_pods_and_autoscaling_bounds_clamp_replicas() {
        let mut c = cluster(serde_json::json!({"replicas": 7})).spec;
        assert_eq!(c.effective_replicas(), 7);
        c.autoscaling = Some(AutoscalingSpec {
            kind: AutoscalerKind::Hpa,
            min_replicas: 2,
            max_replicas: 5,
            target_connections_per_pod: 100,
            prometheus_address: None,
        });
        assert_eq!(c.effective_replicas(), 5);
        c.stopped = true;
        assert_eq!(c.effective_replicas(), 0);
    }
}
