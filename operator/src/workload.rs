//! The pods: names and labels, the ConfigMap with the rendered node config, and the StatefulSet.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    RollingUpdateStatefulSetStrategy, StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
    StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, Lifecycle, LifecycleHandler, ObjectFieldSelector, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PodAffinityTerm, PodAntiAffinity, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile,
    SecretKeySelector, SecurityContext, SleepAction, TopologySpreadConstraint, Volume, VolumeMount,
    VolumeResourceRequirements, WeightedPodAffinityTerm,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kefu_crds::{CleanupPolicy, KefuCluster};
use kube::Resource;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::nodeconfig::{self, CONFIG_DIR, DATA_DIR, NODE_CONFIG_KEY, PRESTOP_SLEEP_SECS};

/// Pod-template annotation holding the hash of the ConfigMap data: a config change rolls the pods.
pub const CONFIG_HASH_ANNOTATION: &str = "kefu.io/config-hash";
/// Label every child carries, and the value the operator's watches filter on.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "kefu-operator");
/// Env var carrying a Redis URL from a Secret. No `__`: today's node ignores it (cluster mode reads it later).
pub const REDIS_URL_ENV: &str = "KEFU_CLUSTER_REDIS_URL";
/// Path of the node binary in the image (see node/Dockerfile).
pub const NODE_BINARY: &str = "/usr/local/bin/kefu-node";
/// Name of the node container.
pub const CONTAINER: &str = "kefu-node";
/// UID/GID of the distroless `nonroot` user.
const NONROOT: i64 = 65532;

/// Name of the headless Service (gossip, peer links, stable pod DNS).
pub fn headless_name(cluster: &str) -> String {
    format!("{cluster}-peers")
}

/// Name of the ConfigMap.
pub fn config_map_name(cluster: &str) -> String {
    format!("{cluster}-config")
}

/// Labels selecting the pods of one cluster (stable: they are the StatefulSet's immutable selector).
pub fn selector_labels(cluster: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "kefu".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), cluster.to_owned()),
    ])
}

/// The selector as a string, for `status.selector` (the scale subresource's labelSelectorPath).
pub fn selector_string(cluster: &str) -> String {
    selector_labels(cluster).iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

/// Labels on every child object.
pub fn labels(cluster: &str) -> BTreeMap<String, String> {
    let mut l = selector_labels(cluster);
    l.insert("app.kubernetes.io/component".into(), "chat-node".into());
    l.insert(MANAGED_BY.0.into(), MANAGED_BY.1.into());
    l
}

/// Name, namespace and owner of a KefuCluster, with the owner reference every child gets.
#[derive(Debug, Clone)]
pub struct Owner {
    pub name: String,
    pub namespace: String,
    pub reference: OwnerReference,
}

impl Owner {
    /// Read the identity of `kc`; fails on objects without name, namespace or uid.
    pub fn of(kc: &KefuCluster) -> Result<Owner> {
        let name = kc.metadata.name.clone().ok_or(Error::MissingMetadata("name"))?;
        let namespace = kc.metadata.namespace.clone().ok_or(Error::MissingMetadata("namespace"))?;
        let reference = kc.controller_owner_ref(&()).ok_or(Error::MissingMetadata("uid"))?;
        Ok(Owner { name, namespace, reference })
    }

    /// Metadata for a child called `name`.
    pub fn meta(&self, name: String) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(labels(&self.name)),
            owner_references: Some(vec![self.reference.clone()]),
            ..ObjectMeta::default()
        }
    }
}

/// The ConfigMap: `kefu.toml` (read by the node) and `cluster.toml` (cluster mode, not read yet).
pub fn config_map(owner: &Owner, kc: &KefuCluster) -> Result<ConfigMap> {
    let data = BTreeMap::from([
        (NODE_CONFIG_KEY.to_owned(), nodeconfig::node_config(&kc.spec)?),
        (
            nodeconfig::CLUSTER_CONFIG_KEY.to_owned(),
            nodeconfig::cluster_config(&owner.name, &owner.namespace, &kc.spec),
        ),
    ]);
    Ok(ConfigMap { metadata: owner.meta(config_map_name(&owner.name)), data: Some(data), ..ConfigMap::default() })
}

/// Hash of the ConfigMap data (keys in order), short hex. Equal data gives an equal hash, any change a new one.
pub fn config_hash(cm: &ConfigMap) -> String {
    let mut h = Sha256::new();
    for (k, v) in cm.data.iter().flatten() {
        h.update((k.len() as u64).to_be_bytes());
        h.update(k.as_bytes());
        h.update((v.len() as u64).to_be_bytes());
        h.update(v.as_bytes());
    }
    h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// The StatefulSet running `replicas` pods with the config whose hash is `config_hash`.
pub fn stateful_set(owner: &Owner, kc: &KefuCluster, replicas: i32, config_hash: &str) -> StatefulSet {
    let spec = &kc.spec;
    let name = &owner.name;
    let mut pod_labels = spec.pod.labels.clone();
    pod_labels.extend(labels(name));
    let mut annotations = spec.pod.annotations.clone();
    annotations.insert(CONFIG_HASH_ANNOTATION.into(), config_hash.into());
    annotations.insert("prometheus.io/scrape".into(), "true".into());
    annotations.insert("prometheus.io/port".into(), spec.ports.http.to_string());

    let mut ports = vec![
        port("http", spec.ports.http, "TCP"),
        port("gossip", spec.ports.gossip, "UDP"),
        port("peer", spec.ports.peer, "TCP"),
    ];
    if spec.ports.tcp != 0 {
        ports.insert(1, port("tcp", spec.ports.tcp, "TCP"));
    }

    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    };

    let container = Container {
        name: CONTAINER.into(),
        image: Some(spec.image.clone()),
        image_pull_policy: spec.image_pull_policy.map(|p| p.as_str().to_owned()),
        command: Some(vec![NODE_BINARY.into()]),
        args: Some(vec!["--config".into(), format!("{CONFIG_DIR}/{NODE_CONFIG_KEY}"), "serve".into()]),
        env: Some(env(kc)),
        ports: Some(ports),
        resources: spec.resources.clone(),
        readiness_probe: Some(probe("/readyz", 5, 2)),
        liveness_probe: Some(probe("/healthz", 10, 3)),
        startup_probe: Some(probe("/healthz", 2, 30)),
        lifecycle: Some(Lifecycle {
            // Let endpoint removal reach the ingress before SIGTERM; the node then drains on its own.
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction { seconds: PRESTOP_SLEEP_SECS }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "config".into(),
                mount_path: CONFIG_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount { name: "data".into(), mount_path: DATA_DIR.into(), ..VolumeMount::default() },
        ]),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Capabilities::default() }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };

    let affinity = spec.pod.affinity.clone().unwrap_or_else(|| Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![WeightedPodAffinityTerm {
                weight: 100,
                pod_affinity_term: PodAffinityTerm {
                    label_selector: Some(LabelSelector {
                        match_labels: Some(selector_labels(name)),
                        ..LabelSelector::default()
                    }),
                    topology_key: "kubernetes.io/hostname".into(),
                    ..PodAffinityTerm::default()
                },
            }]),
            ..PodAntiAffinity::default()
        }),
        ..Affinity::default()
    });
    let spread = if spec.pod.topology_spread_constraints.is_empty() {
        vec![TopologySpreadConstraint {
            max_skew: 1,
            topology_key: "topology.kubernetes.io/zone".into(),
            when_unsatisfiable: "ScheduleAnyway".into(),
            label_selector: Some(LabelSelector {
                match_labels: Some(selector_labels(name)),
                ..LabelSelector::default()
            }),
            ..TopologySpreadConstraint::default()
        }]
    } else {
        spec.pod.topology_spread_constraints.clone()
    };

    let pod = PodSpec {
        containers: vec![container],
        // A Service named like the cluster would inject KEFU_SERVICE_HOST & co. into the node's environment.
        enable_service_links: Some(false),
        automount_service_account_token: Some(false),
        service_account_name: spec.pod.service_account_name.clone(),
        termination_grace_period_seconds: Some(spec.pod.termination_grace_period_seconds),
        affinity: Some(affinity),
        topology_spread_constraints: Some(spread),
        node_selector: (!spec.pod.node_selector.is_empty()).then(|| spec.pod.node_selector.clone()),
        tolerations: (!spec.pod.tolerations.is_empty()).then(|| spec.pod.tolerations.clone()),
        priority_class_name: spec.pod.priority_class_name.clone(),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(NONROOT),
            run_as_group: Some(NONROOT),
            fs_group: Some(NONROOT),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..SeccompProfile::default() }),
            ..PodSecurityContext::default()
        }),
        volumes: Some(vec![Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource { name: config_map_name(name), ..ConfigMapVolumeSource::default() }),
            ..Volume::default()
        }]),
        ..PodSpec::default()
    };

    let claim = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some("data".into()),
            labels: Some(selector_labels(name)),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: spec.storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".to_owned(), Quantity(spec.storage.size.clone()))])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    };
    let when_deleted = match spec.cleanup_policy {
        CleanupPolicy::Retain => "Retain",
        CleanupPolicy::Delete => "Delete",
    };

    StatefulSet {
        metadata: owner.meta(name.clone()),
        spec: Some(StatefulSetSpec {
            replicas: Some(replicas),
            service_name: Some(headless_name(name)),
            selector: LabelSelector { match_labels: Some(selector_labels(name)), ..LabelSelector::default() },
            // One pod at a time, highest ordinal first on scale-down: each one drains before the next stops.
            pod_management_policy: Some("OrderedReady".into()),
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateStatefulSetStrategy { max_unavailable: None, partition: Some(0) }),
            }),
            persistent_volume_claim_retention_policy: Some(StatefulSetPersistentVolumeClaimRetentionPolicy {
                when_deleted: Some(when_deleted.into()),
                when_scaled: Some("Retain".into()),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            volume_claim_templates: Some(vec![claim]),
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    }
}

fn port(name: &str, number: i32, protocol: &str) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: number,
        protocol: Some(protocol.into()),
        ..ContainerPort::default()
    }
}

fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector { name: secret.into(), key: key.into(), optional: Some(false) }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// The node's environment: its id from the pod name, secrets from Secrets, then the user's extra env.
fn env(kc: &KefuCluster) -> Vec<EnvVar> {
    let spec = &kc.spec;
    let mut env = vec![EnvVar {
        name: "KEFU_NODE_ID".into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "metadata.name".into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }];
    if let Some(auth) = &spec.auth {
        env.push(secret_env("KEFU_AUTH__SECRET", &auth.secret_ref.name, &auth.secret_ref.key));
    }
    if let Some(r) = spec.redis.as_ref().and_then(|r| r.url_secret_ref.as_ref()) {
        env.push(secret_env(REDIS_URL_ENV, &r.name, &r.key));
    }
    if let Some(secret) = spec.s3.as_ref().and_then(|s| s.credentials_secret.as_ref()) {
        env.push(secret_env("AWS_ACCESS_KEY_ID", secret, "accessKeyId"));
        env.push(secret_env("AWS_SECRET_ACCESS_KEY", secret, "secretAccessKey"));
    }
    env.extend(spec.pod.env.iter().cloned());
    env
}

/// Replicas to ask of the StatefulSet now. Scale-up goes straight to `target`; scale-down lowers one
/// replica at a time and only once the StatefulSet has settled, so the highest-ordinal pod has drained and
/// gone before the next one is asked to stop.
pub fn next_replicas(target: i32, current: Option<&StatefulSet>) -> i32 {
    let Some(sts) = current else { return target };
    let Some(spec_replicas) = sts.spec.as_ref().and_then(|s| s.replicas) else { return target };
    if target >= spec_replicas {
        return target;
    }
    let running = sts.status.as_ref().map_or(0, |s| s.replicas);
    if running > spec_replicas {
        // The previous step is still draining its pod.
        spec_replicas
    } else {
        spec_replicas - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::kefu_cluster;
    use k8s_openapi::api::apps::v1::StatefulSetStatus;

    fn sts_of(kc: &KefuCluster) -> StatefulSet {
        let owner = Owner::of(kc).unwrap();
        let cm = config_map(&owner, kc).unwrap();
        stateful_set(&owner, kc, kc.spec.effective_replicas(), &config_hash(&cm))
    }

    fn pod(sts: &StatefulSet) -> &PodSpec {
        sts.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
    }

    #[test]
    fn config_hash_is_stable_and_changes_with_any_config_change() {
        let kc = kefu_cluster(serde_json::json!({}));
        let owner = Owner::of(&kc).unwrap();
        let a = config_hash(&config_map(&owner, &kc).unwrap());
        assert_eq!(a, config_hash(&config_map(&owner, &kc).unwrap()));
        assert_eq!(a.len(), 16);
        let kc2 = kefu_cluster(serde_json::json!({"config": {"routing": {"strategy": "round-robin"}}}));
        let b = config_hash(&config_map(&owner, &kc2).unwrap());
        assert_ne!(a, b);
        let kc3 = kefu_cluster(serde_json::json!({"s3": {"endpoint": "http://minio:9000", "bucket": "kefu"}}));
        assert_ne!(a, config_hash(&config_map(&owner, &kc3).unwrap()), "cluster.toml is hashed too");
        // Moving bytes between key and value must not collide.
        let cm =
            |k: &str, v: &str| ConfigMap { data: Some(BTreeMap::from([(k.into(), v.into())])), ..Default::default() };
        assert_ne!(config_hash(&cm("ab", "c")), config_hash(&cm("a", "bc")));
    }

    #[test]
    fn pod_template_carries_the_config_hash_and_drains_before_sigkill() {
        let kc = kefu_cluster(serde_json::json!({"pod": {"terminationGracePeriodSeconds": 60}}));
        let sts = sts_of(&kc);
        let meta = sts.spec.as_ref().unwrap().template.metadata.as_ref().unwrap();
        let hash = meta.annotations.as_ref().unwrap().get(CONFIG_HASH_ANNOTATION).unwrap();
        assert_eq!(hash.len(), 16);
        let p = pod(&sts);
        assert_eq!(p.termination_grace_period_seconds, Some(60));
        let c = &p.containers[0];
        let sleep = c.lifecycle.as_ref().unwrap().pre_stop.as_ref().unwrap().sleep.as_ref().unwrap();
        assert_eq!(sleep.seconds, PRESTOP_SLEEP_SECS);
        let cm = config_map(&Owner::of(&kc).unwrap(), &kc).unwrap();
        let toml = &cm.data.as_ref().unwrap()[NODE_CONFIG_KEY];
        assert!(toml.contains("shutdown_grace_secs = 52"), "{toml}");
    }

    #[test]
    fn statefulset_has_stable_names_owner_and_volume_template() {
        let kc = kefu_cluster(
            serde_json::json!({"replicas": 3, "auth": {"secretRef": {"name": "kefu-auth", "key": "secret"}},
            "storage": {"size": "5Gi", "storageClassName": "fast"}}),
        );
        let sts = sts_of(&kc);
        assert_eq!(sts.metadata.name.as_deref(), Some("chat"));
        assert_eq!(sts.metadata.owner_references.as_ref().unwrap()[0].kind, "KefuCluster");
        assert_eq!(sts.metadata.owner_references.as_ref().unwrap()[0].controller, Some(true));
        let s = sts.spec.as_ref().unwrap();
        assert_eq!(s.replicas, Some(3));
        assert_eq!(s.service_name.as_deref(), Some("chat-peers"));
        assert_eq!(s.pod_management_policy.as_deref(), Some("OrderedReady"));
        let claim = &s.volume_claim_templates.as_ref().unwrap()[0];
        let pvc = claim.spec.as_ref().unwrap();
        assert_eq!(pvc.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(pvc.resources.as_ref().unwrap().requests.as_ref().unwrap()["storage"].0, "5Gi");
        let c = &pod(&sts).containers[0];
        assert_eq!(c.command.as_ref().unwrap(), &[NODE_BINARY]);
        assert_eq!(c.args.as_ref().unwrap(), &["--config", "/etc/kefu/kefu.toml", "serve"]);
        let mounts: Vec<&str> = c.volume_mounts.iter().flatten().map(|m| m.mount_path.as_str()).collect();
        assert_eq!(mounts, [CONFIG_DIR, DATA_DIR]);
    }

    #[test]
    fn secrets_come_from_secret_refs_and_service_links_are_off() {
        let kc = kefu_cluster(serde_json::json!({
            "replicas": 2,
            "auth": {"secretRef": {"name": "kefu-auth", "key": "secret"}},
            "redis": {"urlSecretRef": {"name": "redis", "key": "url"}},
            "s3": {"endpoint": "http://minio:9000", "bucket": "kefu", "credentialsSecret": "minio"},
            "pod": {"env": [{"name": "KEFU_ROUTING__AUTO_ACCEPT", "value": "true"}]},
        }));
        let sts = sts_of(&kc);
        let p = pod(&sts);
        assert_eq!(p.enable_service_links, Some(false));
        let env = p.containers[0].env.as_ref().unwrap();
        let names: Vec<&str> = env.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "KEFU_NODE_ID",
                "KEFU_AUTH__SECRET",
                REDIS_URL_ENV,
                "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY",
                "KEFU_ROUTING__AUTO_ACCEPT"
            ]
        );
        let auth = env[1].value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
        assert_eq!((auth.name.as_str(), auth.key.as_str()), ("kefu-auth", "secret"));
        assert!(env.iter().take(5).all(|e| e.value.is_none()), "no literal values for secrets");
        let node_id = env[0].value_from.as_ref().unwrap().field_ref.as_ref().unwrap();
        assert_eq!(node_id.field_path, "metadata.name");
    }

    #[test]
    fn pods_spread_across_hosts_and_zones_unless_overridden() {
        let sts = sts_of(&kefu_cluster(serde_json::json!({})));
        let p = pod(&sts);
        let anti = p.affinity.as_ref().unwrap().pod_anti_affinity.as_ref().unwrap();
        let term = &anti.preferred_during_scheduling_ignored_during_execution.as_ref().unwrap()[0];
        assert_eq!(term.pod_affinity_term.topology_key, "kubernetes.io/hostname");
        assert_eq!(p.topology_spread_constraints.as_ref().unwrap()[0].topology_key, "topology.kubernetes.io/zone");
        let custom = kefu_cluster(serde_json::json!({"pod": {"affinity": {}, "topologySpreadConstraints": [
            {"maxSkew": 2, "topologyKey": "rack", "whenUnsatisfiable": "DoNotSchedule"}]}}));
        let sts = sts_of(&custom);
        let p = pod(&sts);
        assert!(p.affinity.as_ref().unwrap().pod_anti_affinity.is_none());
        assert_eq!(p.topology_spread_constraints.as_ref().unwrap()[0].topology_key, "rack");
    }

    #[test]
    fn pods_run_non_root_with_read_only_root_fs() {
        let sts = sts_of(&kefu_cluster(serde_json::json!({})));
        let p = pod(&sts);
        assert_eq!(p.security_context.as_ref().unwrap().run_as_non_root, Some(true));
        let sc = p.containers[0].security_context.as_ref().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
    }

    #[test]
    fn disabled_tcp_port_is_not_exposed() {
        let sts = sts_of(&kefu_cluster(serde_json::json!({"ports": {"tcp": 0}})));
        let ports: Vec<&str> =
            pod(&sts).containers[0].ports.iter().flatten().filter_map(|p| p.name.as_deref()).collect();
        assert_eq!(ports, ["http", "gossip", "peer"]);
    }

    fn running(spec: i32, status: i32) -> StatefulSet {
        StatefulSet {
            spec: Some(StatefulSetSpec { replicas: Some(spec), ..Default::default() }),
            status: Some(StatefulSetStatus { replicas: status, ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn scale_down_steps_one_pod_at_a_time_and_waits_for_the_drain() {
        assert_eq!(next_replicas(1, None), 1);
        assert_eq!(next_replicas(5, Some(&running(3, 3))), 5, "scale-up is immediate");
        assert_eq!(next_replicas(1, Some(&running(3, 3))), 2, "highest ordinal first");
        assert_eq!(next_replicas(1, Some(&running(2, 3))), 2, "pod 2 still draining");
        assert_eq!(next_replicas(1, Some(&running(2, 2))), 1);
        assert_eq!(next_replicas(3, Some(&running(3, 3))), 3);
    }
}
