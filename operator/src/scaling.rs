//! Availability and capacity: the PodDisruptionBudget and the autoscaler (HPA on the per-pod connections
//! metric, or a KEDA ScaledObject), both targeting the KefuCluster's own scale subresource so that the
//! operator stays the only writer of the StatefulSet.

use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec, MetricIdentifier, MetricSpec,
    MetricTarget, PodsMetricSource,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kefu_crds::{AutoscalerKind, KefuCluster};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};

use crate::workload::{Owner, selector_labels};

/// Per-pod metric the HPA reads through a custom metrics adapter (the node exports `kefu_connections`).
pub const CONNECTIONS_METRIC: &str = "kefu_connections";

/// The KEDA ScaledObject type.
pub fn scaled_object_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("keda.sh", "v1alpha1", "ScaledObject"), "scaledobjects")
}

/// PodDisruptionBudget, unless disabled.
pub fn pdb(owner: &Owner, kc: &KefuCluster) -> Option<PodDisruptionBudget> {
    let spec = &kc.spec.pdb;
    spec.enabled.then(|| PodDisruptionBudget {
        metadata: owner.meta(owner.name.clone()),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(spec.max_unavailable)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&owner.name)),
                ..LabelSelector::default()
            }),
            // A crash-looping pod may be evicted even when the budget is spent (it serves nobody).
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".into()),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    })
}

fn target_ref(owner: &Owner) -> CrossVersionObjectReference {
    CrossVersionObjectReference {
        api_version: Some(format!("{}/{}", kefu_crds::GROUP, kefu_crds::VERSION)),
        kind: "KefuCluster".into(),
        name: owner.name.clone(),
    }
}

/// HorizontalPodAutoscaler on average connections per pod, when `autoscaling.kind` is Hpa.
pub fn hpa(owner: &Owner, kc: &KefuCluster) -> Option<HorizontalPodAutoscaler> {
    let a = kc.spec.autoscaling.as_ref().filter(|a| a.kind == AutoscalerKind::Hpa)?;
    Some(HorizontalPodAutoscaler {
        metadata: owner.meta(owner.name.clone()),
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: target_ref(owner),
            min_replicas: Some(a.min_replicas),
            max_replicas: a.max_replicas,
            metrics: Some(vec![MetricSpec {
                type_: "Pods".into(),
                pods: Some(PodsMetricSource {
                    metric: MetricIdentifier { name: CONNECTIONS_METRIC.into(), selector: None },
                    target: MetricTarget {
                        type_: "AverageValue".into(),
                        average_value: Some(Quantity(a.target_connections_per_pod.to_string())),
                        ..MetricTarget::default()
                    },
                }),
                ..MetricSpec::default()
            }]),
            ..HorizontalPodAutoscalerSpec::default()
        }),
        ..HorizontalPodAutoscaler::default()
    })
}

/// KEDA ScaledObject with a Prometheus trigger, when `autoscaling.kind` is Keda.
pub fn scaled_object(owner: &Owner, kc: &KefuCluster) -> Option<DynamicObject> {
    let a = kc.spec.autoscaling.as_ref().filter(|a| a.kind == AutoscalerKind::Keda)?;
    let mut obj = DynamicObject::new(&owner.name, &scaled_object_resource()).within(&owner.namespace);
    obj.metadata = owner.meta(owner.name.clone());
    let query =
        format!("sum({CONNECTIONS_METRIC}{{namespace=\"{}\",pod=~\"{}-[0-9]+\"}})", owner.namespace, owner.name);
    obj.data = serde_json::json!({"spec": {
        "scaleTargetRef": {"apiVersion": format!("{}/{}", kefu_crds::GROUP, kefu_crds::VERSION), "kind": "KefuCluster", "name": owner.name},
        "minReplicaCount": a.min_replicas,
        "maxReplicaCount": a.max_replicas,
        // Scale-down drains pods: keep a long cooldown so a dip does not churn connections.
        "cooldownPeriod": 300,
        "triggers": [{
            "type": "prometheus",
            "metadata": {
                "serverAddress": a.prometheus_address.clone().unwrap_or_default(),
                "query": query,
                "threshold": a.target_connections_per_pod.to_string(),
            },
        }],
    }});
    Some(obj)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::kefu_cluster;

    const AUTH: &str = r#"{"secretRef": {"name": "a", "key": "k"}}"#;

    fn auth() -> serde_json::Value {
        serde_json::from_str(AUTH).unwrap()
    }

    #[test]
    fn pdb_allows_one_pod_down_by_default_and_can_be_disabled() {
        let kc = kefu_cluster(serde_json::json!({}));
        let p = pdb(&Owner::of(&kc).unwrap(), &kc).unwrap();
        let spec = p.spec.unwrap();
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
        assert_eq!(spec.selector.unwrap().match_labels.unwrap()["app.kubernetes.io/instance"], "chat");
        let kc = kefu_cluster(serde_json::json!({"pdb": {"enabled": false}}));
        assert!(pdb(&Owner::of(&kc).unwrap(), &kc).is_none());
    }

    #[test]
    fn hpa_scales_the_kefucluster_on_connections_per_pod() {
        let kc = kefu_cluster(serde_json::json!({"auth": auth(),
            "autoscaling": {"minReplicas": 2, "maxReplicas": 10, "targetConnectionsPerPod": 8000}}));
        let owner = Owner::of(&kc).unwrap();
        assert!(scaled_object(&owner, &kc).is_none());
        let h = hpa(&owner, &kc).unwrap().spec.unwrap();
        assert_eq!(h.scale_target_ref.kind, "KefuCluster");
        assert_eq!(h.scale_target_ref.api_version.as_deref(), Some("kefu.io/v1alpha1"));
        assert_eq!((h.min_replicas, h.max_replicas), (Some(2), 10));
        let m = h.metrics.unwrap()[0].pods.clone().unwrap();
        assert_eq!(m.metric.name, CONNECTIONS_METRIC);
        assert_eq!(m.target.average_value, Some(Quantity("8000".into())));
    }

    #[test]
    fn keda_scaled_object_queries_prometheus_for_this_cluster() {
        let kc = kefu_cluster(serde_json::json!({"auth": auth(), "autoscaling": {"kind": "Keda",
            "minReplicas": 1, "maxReplicas": 4, "prometheusAddress": "http://prom:9090"}}));
        let owner = Owner::of(&kc).unwrap();
        assert!(hpa(&owner, &kc).is_none());
        let so = scaled_object(&owner, &kc).unwrap();
        assert_eq!(so.types.as_ref().unwrap().api_version, "keda.sh/v1alpha1");
        let spec = &so.data["spec"];
        assert_eq!(spec["scaleTargetRef"]["kind"], "KefuCluster");
        assert_eq!(spec["maxReplicaCount"], 4);
        let t = &spec["triggers"][0]["metadata"];
        assert_eq!(t["serverAddress"], "http://prom:9090");
        assert_eq!(t["query"], "sum(kefu_connections{namespace=\"default\",pod=~\"chat-[0-9]+\"})");
        assert_eq!(t["threshold"], "5000");
    }

    #[test]
    fn no_autoscaler_without_autoscaling() {
        let kc = kefu_cluster(serde_json::json!({}));
        let owner = Owner::of(&kc).unwrap();
        assert!(hpa(&owner, &kc).is_none() && scaled_object(&owner, &kc).is_none());
    }
}
