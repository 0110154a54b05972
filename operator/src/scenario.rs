//! Mocked-API scenarios (controller-rs style): each test runs `reconcile` against [`FakeApi`] and checks
//! the requests it made and the status it wrote.

use std::sync::Arc;
use std::time::Duration;

use kefu_crds::KefuCluster;
use kube::runtime::controller::Action;
use serde_json::{Value, json};

use crate::controller::{Context, error_policy, reconcile};
use crate::fixtures::{FakeApi, Seen, kefu_cluster};
use crate::metrics::Metrics;
use crate::workload::CONFIG_HASH_ANNOTATION;

const KC: &str = "/apis/kefu.io/v1alpha1/namespaces/default/kefuclusters/chat";
const STS: &str = "/apis/apps/v1/namespaces/default/statefulsets/chat";
const AUTH: &str = r#"{"name": "kefu-auth", "key": "secret"}"#;

struct Harness {
    fake: FakeApi,
    ctx: Arc<Context>,
}

impl Harness {
    fn new() -> Harness {
        let fake = FakeApi::start();
        let ctx = Arc::new(Context::new(fake.client.clone(), Arc::new(Metrics::new()), Some("test".into())));
        Harness { fake, ctx }
    }

    /// Store `kc` (as `kubectl apply` would) and reconcile it once, under a timeout.
    async fn reconcile(&self, kc: &KefuCluster) -> crate::Result<Action> {
        self.fake.put(KC, serde_json::to_value(kc).unwrap());
        tokio::time::timeout(Duration::from_secs(10), reconcile(Arc::new(kc.clone()), self.ctx.clone()))
            .await
            .expect("reconcile finished in time")
    }

    fn applied(&self, path: &str) -> Vec<Seen> {
        self.fake.seen().into_iter().filter(|s| s.method == "PATCH" && s.path == path).collect()
    }

    fn status(&self) -> Value {
        self.fake.object(KC).unwrap()["status"].clone()
    }

    fn condition(&self, type_: &str) -> (String, String) {
        let st = self.status();
        let c = st["conditions"].as_array().unwrap().iter().find(|c| c["type"] == type_).unwrap().clone();
        (c["status"].as_str().unwrap().to_owned(), c["reason"].as_str().unwrap().to_owned())
    }
}

fn applied_hash(seen: &Seen) -> String {
    seen.body["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION].as_str().unwrap().to_owned()
}

/// Give the fake StatefulSet a status, as the StatefulSet controller would.
fn sts_status(fake: &FakeApi, replicas: i32, ready: i32) {
    let mut sts = fake.object(STS).unwrap();
    sts["metadata"]["generation"] = json!(1);
    sts["status"] = json!({"replicas": replicas, "readyReplicas": ready, "updatedReplicas": replicas,
        "observedGeneration": 1, "currentRevision": "r1", "updateRevision": "r1"});
    fake.put(STS, sts);
}

#[tokio::test]
async fn create_applies_every_child_and_writes_status() {
    let h = Harness::new();
    let action = h.reconcile(&kefu_cluster(json!({}))).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(10)), "not ready yet: short requeue");
    let applied: Vec<String> = h.fake.seen().into_iter().filter(|s| s.method == "PATCH").map(|s| s.path).collect();
    for path in [
        "/api/v1/namespaces/default/configmaps/chat-config",
        "/api/v1/namespaces/default/services/chat-peers",
        "/api/v1/namespaces/default/services/chat",
        STS,
        "/apis/policy/v1/namespaces/default/poddisruptionbudgets/chat",
        "/apis/monitoring.coreos.com/v1/namespaces/default/servicemonitors/chat",
        "/apis/kefu.io/v1alpha1/namespaces/default/kefuclusters/chat/status",
    ] {
        assert!(applied.contains(&path.to_owned()), "{path} not applied: {applied:#?}");
    }
    let sts = &h.applied(STS)[0];
    assert!(sts.query.contains("fieldManager=kefu-operator") && sts.query.contains("force=true"), "{}", sts.query);
    assert_eq!(sts.body["metadata"]["ownerReferences"][0]["uid"], "0b9b0a8e-1");
    let st = h.status();
    assert_eq!(st["observedGeneration"], 1);
    assert_eq!(st["selector"], "app.kubernetes.io/instance=chat,app.kubernetes.io/name=kefu");
    assert_eq!(st["configHash"].as_str().unwrap(), applied_hash(sts));
    assert_eq!(h.condition("Ready"), ("False".into(), "ReplicasNotReady".into()));
    assert_eq!(h.condition("Degraded"), ("False".into(), "AsExpected".into()));
    let events: Vec<Seen> = h.fake.seen().into_iter().filter(|s| s.path.contains("/events")).collect();
    assert_eq!(events.len(), 3, "one event per new condition");

    // The StatefulSet becomes ready: Ready flips, one event per flip, long requeue.
    sts_status(&h.fake, 1, 1);
    let mut kc: KefuCluster = serde_json::from_value(h.fake.object(KC).unwrap()).unwrap();
    kc.metadata.generation = Some(1);
    h.fake.clear_seen();
    let action = h.reconcile(&kc).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
    assert_eq!(h.condition("Ready"), ("True".into(), "AllReplicasReady".into()));
    assert_eq!(h.status()["readyReplicas"], 1);
    let notes: Vec<String> = h
        .fake
        .seen()
        .into_iter()
        .filter(|s| s.path.contains("/events"))
        .map(|s| s.body["note"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert!(notes.iter().any(|n| n.starts_with("Ready=True")), "{notes:?}");
}

#[tokio::test]
async fn new_object_first_gets_the_finalizer() {
    let h = Harness::new();
    let mut kc = kefu_cluster(json!({}));
    kc.metadata.finalizers = None;
    h.reconcile(&kc).await.unwrap();
    let stored = h.fake.object(KC).unwrap();
    assert_eq!(stored["metadata"]["finalizers"], json!(["kefu.io/cleanup"]));
    assert!(h.applied(STS).is_empty(), "children wait for the next reconcile");
}

#[tokio::test]
async fn config_change_rolls_pods_through_a_new_hash() {
    let h = Harness::new();
    h.reconcile(&kefu_cluster(json!({}))).await.unwrap();
    let mut kc = kefu_cluster(json!({"config": {"routing": {"strategy": "least-loaded"}}}));
    kc.metadata.generation = Some(2);
    h.reconcile(&kc).await.unwrap();
    let applies = h.applied(STS);
    assert_eq!(applies.len(), 2);
    assert_ne!(applied_hash(&applies[0]), applied_hash(&applies[1]));
    let cm = h.fake.object("/api/v1/namespaces/default/configmaps/chat-config").unwrap();
    assert!(cm["data"]["kefu.toml"].as_str().unwrap().contains("least-loaded"));
    // Same spec again: same hash, no roll.
    h.reconcile(&kc).await.unwrap();
    let applies = h.applied(STS);
    assert_eq!(applied_hash(&applies[1]), applied_hash(&applies[2]));
}

#[tokio::test]
async fn scale_subresource_change_reaches_the_statefulset_and_scale_down_steps() {
    let h = Harness::new();
    let auth: Value = serde_json::from_str(AUTH).unwrap();
    h.reconcile(&kefu_cluster(json!({"replicas": 1, "auth": {"secretRef": auth}}))).await.unwrap();
    // `kubectl scale --replicas=3` writes spec.replicas through /scale.
    h.reconcile(&kefu_cluster(json!({"replicas": 3, "auth": {"secretRef": auth}}))).await.unwrap();
    assert_eq!(h.applied(STS).last().unwrap().body["spec"]["replicas"], 3);
    sts_status(&h.fake, 3, 3);
    // Scale to 1: one pod at a time (the highest ordinal drains first).
    let kc = kefu_cluster(json!({"replicas": 1, "auth": {"secretRef": auth}}));
    let action = h.reconcile(&kc).await.unwrap();
    assert_eq!(h.applied(STS).last().unwrap().body["spec"]["replicas"], 2);
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
    // Pod 2 still terminating (status.replicas 3 > 2): hold.
    h.reconcile(&kc).await.unwrap();
    assert_eq!(h.applied(STS).last().unwrap().body["spec"]["replicas"], 2);
    sts_status(&h.fake, 2, 2);
    h.reconcile(&kc).await.unwrap();
    assert_eq!(h.applied(STS).last().unwrap().body["spec"]["replicas"], 1);
}

#[tokio::test]
async fn paused_cluster_is_left_alone_but_reported() {
    let h = Harness::new();
    h.reconcile(&kefu_cluster(json!({}))).await.unwrap();
    h.fake.clear_seen();
    h.reconcile(&kefu_cluster(json!({"paused": true, "replicas": 1, "image": "other:1"}))).await.unwrap();
    let writes: Vec<String> = h
        .fake
        .seen()
        .into_iter()
        .filter(|s| s.method != "GET" && !s.path.contains("/events") && !s.path.ends_with("/status"))
        .map(|s| format!("{} {}", s.method, s.path))
        .collect();
    assert!(writes.is_empty(), "paused must not touch children: {writes:?}");
    assert_eq!(h.condition("Progressing"), ("False".into(), "Paused".into()));
}

#[tokio::test]
async fn stop_scales_to_zero_and_keeps_the_rest() {
    let h = Harness::new();
    h.reconcile(&kefu_cluster(json!({"stopped": true}))).await.unwrap();
    assert_eq!(h.applied(STS)[0].body["spec"]["replicas"], 0);
    assert_eq!(h.condition("Ready"), ("False".into(), "Stopped".into()));
}

#[tokio::test]
async fn delete_runs_the_cleanup_policy_and_releases_the_finalizer() {
    let h = Harness::new();
    let pvc = |name: &str, instance: &str| {
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name, "namespace": "default",
            "labels": {"app.kubernetes.io/name": "kefu", "app.kubernetes.io/instance": instance}}})
    };
    let pvcs = "/api/v1/namespaces/default/persistentvolumeclaims";
    h.fake.put(&format!("{pvcs}/data-chat-0"), pvc("data-chat-0", "chat"));
    h.fake.put(&format!("{pvcs}/data-other-0"), pvc("data-other-0", "other"));
    let mut kc = kefu_cluster(json!({"cleanupPolicy": "Delete"}));
    kc.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()));
    let action = h.reconcile(&kc).await.unwrap();
    assert_eq!(action, Action::await_change());
    assert!(h.fake.object(&format!("{pvcs}/data-chat-0")).is_none(), "this cluster's volume deleted");
    assert!(h.fake.object(&format!("{pvcs}/data-other-0")).is_some(), "another cluster's volume kept");
    assert_eq!(h.fake.object(KC).unwrap()["metadata"]["finalizers"], json!([]));
    assert!(h.applied(STS).is_empty(), "no apply while deleting");

    // Retain: volumes stay, finalizer still released.
    let h = Harness::new();
    h.fake.put(&format!("{pvcs}/data-chat-0"), pvc("data-chat-0", "chat"));
    h.reconcile(&kc.clone().tap(|k| k.spec.cleanup_policy = kefu_crds::CleanupPolicy::Retain)).await.unwrap();
    assert!(h.fake.object(&format!("{pvcs}/data-chat-0")).is_some());
    assert_eq!(h.fake.object(KC).unwrap()["metadata"]["finalizers"], json!([]));
}

#[tokio::test]
async fn late_reconcile_of_an_already_deleted_cluster_is_not_an_error() {
    let h = Harness::new();
    let mut kc = kefu_cluster(json!({}));
    kc.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()));
    // The cache still has the object; the API server no longer does.
    let action = tokio::time::timeout(Duration::from_secs(10), reconcile(Arc::new(kc), h.ctx.clone())).await.unwrap();
    assert_eq!(action.unwrap(), Action::await_change());
    assert!(h.ctx.metrics.render().contains("kefu_operator_reconciles_total{outcome=\"ok\"} 1"));
}

trait Tap: Sized {
    fn tap(mut self, f: impl FnOnce(&mut Self)) -> Self {
        f(&mut self);
        self
    }
}
impl Tap for KefuCluster {}

#[tokio::test]
async fn api_errors_back_off_exponentially_per_object_and_reset_on_success() {
    let h = Harness::new();
    h.fake.fail("PATCH", "/statefulsets/", 500);
    let kc = Arc::new(kefu_cluster(json!({})));
    let err = h.reconcile(&kc).await.unwrap_err();
    assert_eq!(err.kind(), "finalizer");
    let first = error_policy(kc.clone(), &err, h.ctx.clone());
    let second = error_policy(kc.clone(), &err, h.ctx.clone());
    assert_eq!(first, Action::requeue(Duration::from_secs(2)));
    assert_eq!(second, Action::requeue(Duration::from_secs(4)));
    let mut other = (*kc).clone();
    other.metadata.name = Some("other".into());
    assert_eq!(error_policy(Arc::new(other), &err, h.ctx.clone()), Action::requeue(Duration::from_secs(2)));
    assert!(h.ctx.metrics.render().contains("kefu_operator_reconcile_failures_total{kind=\"finalizer\"} 1"));
    h.fake.heal();
    h.reconcile(&kc).await.unwrap();
    assert_eq!(error_policy(kc, &err, h.ctx.clone()), Action::requeue(Duration::from_secs(2)), "reset");
}

#[tokio::test]
async fn invalid_overrides_and_missing_apis_degrade_instead_of_crashing() {
    let h = Harness::new();
    h.reconcile(&kefu_cluster(json!({"config": {"data": {"dir": "/tmp"}}}))).await.unwrap();
    assert_eq!(h.condition("Degraded"), ("True".into(), "InvalidSpec".into()));
    assert!(h.applied(STS).is_empty(), "nothing rendered from a refused spec");
    let warnings: Vec<Value> = h
        .fake
        .seen()
        .into_iter()
        .filter(|s| s.path.contains("/events") && s.body["type"] == "Warning")
        .map(|s| s.body)
        .collect();
    assert_eq!(warnings.len(), 1, "one Warning event, for Degraded=True: {warnings:?}");
    assert_eq!(warnings[0]["reason"], "InvalidSpec");

    let h = Harness::new();
    h.fake.without_api("/apis/keda.sh/");
    h.fake.without_api("/apis/monitoring.coreos.com/");
    let auth: Value = serde_json::from_str(AUTH).unwrap();
    let kc = kefu_cluster(json!({"auth": {"secretRef": auth},
        "autoscaling": {"kind": "Keda", "maxReplicas": 3, "prometheusAddress": "http://prom:9090"}}));
    h.reconcile(&kc).await.unwrap();
    assert_eq!(h.condition("Degraded"), ("True".into(), "MissingCRD".into()));
    assert!(!h.applied(STS).is_empty(), "the chat still runs");
}

#[tokio::test]
async fn switching_autoscaler_deletes_the_old_one() {
    let h = Harness::new();
    let auth: Value = serde_json::from_str(AUTH).unwrap();
    h.reconcile(&kefu_cluster(json!({"auth": {"secretRef": auth}, "autoscaling": {"maxReplicas": 3}}))).await.unwrap();
    let hpa = "/apis/autoscaling/v2/namespaces/default/horizontalpodautoscalers/chat";
    assert!(h.fake.object(hpa).is_some());
    h.reconcile(&kefu_cluster(json!({"auth": {"secretRef": auth}, "autoscaling": {"kind": "Keda", "maxReplicas": 3,
        "prometheusAddress": "http://prom:9090"}})))
        .await
        .unwrap();
    assert!(h.fake.object(hpa).is_none(), "HPA removed");
    assert!(h.fake.object("/apis/keda.sh/v1alpha1/namespaces/default/scaledobjects/chat").is_some());
}

#[tokio::test]
async fn status_counts_connections_of_ready_pods() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // One "pod" on 127.0.0.1 serving /metrics like a node with 3 agents and 40 visitors.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let body = "kefu_connections{role=\"agent\"} 3\nkefu_connections{role=\"visitor\"} 40\n";
            let reply = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
            let _ = s.write_all(reply.as_bytes()).await;
        }
    });
    let h = Harness::new();
    let pod = |name: &str, ip: &str, ready: &str, instance: &str| {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default",
            "labels": {"app.kubernetes.io/name": "kefu", "app.kubernetes.io/instance": instance}},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": ready}]}})
    };
    let pods = "/api/v1/namespaces/default/pods";
    h.fake.put(&format!("{pods}/chat-0"), pod("chat-0", "127.0.0.1", "True", "chat"));
    // Not ready, or another cluster's: not counted (their IPs would not answer anyway).
    h.fake.put(&format!("{pods}/chat-1"), pod("chat-1", "127.0.0.1", "False", "chat"));
    h.fake.put(&format!("{pods}/other-0"), pod("other-0", "127.0.0.1", "True", "other"));
    h.reconcile(&kefu_cluster(json!({"ports": {"http": port}}))).await.unwrap();
    assert_eq!(h.status()["connections"], 43);

    // No pod answers: no figure rather than a wrong one.
    let h = Harness::new();
    h.reconcile(&kefu_cluster(json!({}))).await.unwrap();
    assert!(h.status().get("connections").is_none(), "{}", h.status());
}
