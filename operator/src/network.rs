//! How traffic reaches the pods: the headless Service (peers, stable DNS), the client Service, and an
//! Ingress or Gateway API HTTPRoute with timeouts long enough for WebSockets.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::networking::v1::{
    HTTPIngressPath, HTTPIngressRuleValue, Ingress, IngressBackend, IngressRule, IngressServiceBackend, IngressSpec,
    IngressTLS, ServiceBackendPort,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kefu_crds::KefuCluster;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};

use crate::error::Result;
use crate::workload::{Owner, headless_name, selector_labels};

/// Label that tells the client Service from the headless one (the ServiceMonitor selects on it, so each pod
/// is scraped once).
pub const CLIENT_SERVICE_LABEL: (&str, &str) = ("kefu.io/service", "client");

/// The Gateway API HTTPRoute type.
pub fn http_route_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "HTTPRoute"),
        "httproutes",
    )
}

fn service_port(name: &str, port: i32, protocol: &str) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::String(name.into())),
        protocol: Some(protocol.into()),
        ..ServicePort::default()
    }
}

/// Headless Service: one DNS record per pod (`chat-0.chat-peers.ns.svc`), ready or not, for gossip seeds
/// and peer links.
pub fn headless_service(owner: &Owner, kc: &KefuCluster) -> Service {
    let p = &kc.spec.ports;
    Service {
        metadata: owner.meta(headless_name(&owner.name)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(&owner.name)),
            ports: Some(vec![
                service_port("http", p.http, "TCP"),
                service_port("gossip", p.gossip, "UDP"),
                service_port("peer", p.peer, "TCP"),
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// Client Service: WebSocket/REST on port 80 → http, and the raw TCP adapter when enabled. Only ready pods.
pub fn client_service(owner: &Owner, kc: &KefuCluster) -> Service {
    let p = &kc.spec.ports;
    let mut ports = vec![ServicePort { port: 80, ..service_port("http", p.http, "TCP") }];
    if p.tcp != 0 {
        ports.push(service_port("tcp", p.tcp, "TCP"));
    }
    let mut metadata = owner.meta(owner.name.clone());
    metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(CLIENT_SERVICE_LABEL.0.into(), CLIENT_SERVICE_LABEL.1.into());
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector_labels(&owner.name)),
            ports: Some(ports),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// Annotations that keep idle WebSockets open through common ingress controllers.
fn websocket_annotations() -> BTreeMap<String, String> {
    BTreeMap::from(
        [
            ("nginx.ingress.kubernetes.io/proxy-read-timeout", "3600"),
            ("nginx.ingress.kubernetes.io/proxy-send-timeout", "3600"),
            ("nginx.ingress.kubernetes.io/proxy-body-size", "1m"),
            ("haproxy.org/timeout-tunnel", "3600s"),
            ("traefik.ingress.kubernetes.io/service.serversscheme", "http"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    )
}

/// Ingress to the client Service, if the spec asks for one.
pub fn ingress(owner: &Owner, kc: &KefuCluster) -> Option<Ingress> {
    let spec = kc.spec.ingress.as_ref()?;
    let mut meta = owner.meta(owner.name.clone());
    let mut annotations = websocket_annotations();
    annotations.extend(spec.annotations.clone());
    meta.annotations = Some(annotations);
    Some(Ingress {
        metadata: meta,
        spec: Some(IngressSpec {
            ingress_class_name: spec.class_name.clone(),
            tls: spec
                .tls_secret_name
                .as_ref()
                .map(|s| vec![IngressTLS { hosts: Some(vec![spec.host.clone()]), secret_name: Some(s.clone()) }]),
            rules: Some(vec![IngressRule {
                host: Some(spec.host.clone()),
                http: Some(HTTPIngressRuleValue {
                    paths: vec![HTTPIngressPath {
                        path: Some("/".into()),
                        path_type: "Prefix".into(),
                        backend: IngressBackend {
                            service: Some(IngressServiceBackend {
                                name: owner.name.clone(),
                                port: Some(ServiceBackendPort { name: Some("http".into()), number: None }),
                            }),
                            ..IngressBackend::default()
                        },
                    }],
                }),
            }]),
            ..IngressSpec::default()
        }),
        ..Ingress::default()
    })
}

/// HTTPRoute to the client Service, if the spec asks for one. `0s` timeouts: WebSockets live for hours.
pub fn http_route(owner: &Owner, kc: &KefuCluster) -> Result<Option<DynamicObject>> {
    let Some(spec) = kc.spec.http_route.as_ref() else { return Ok(None) };
    let mut obj = DynamicObject::new(&owner.name, &http_route_resource()).within(&owner.namespace);
    obj.metadata = owner.meta(owner.name.clone());
    let parents: Vec<serde_json::Value> = spec
        .parent_refs
        .iter()
        .map(|p| {
            let mut r = serde_json::json!({"name": p.name});
            if let Some(ns) = &p.namespace {
                r["namespace"] = ns.clone().into();
            }
            if let Some(s) = &p.section_name {
                r["sectionName"] = s.clone().into();
            }
            r
        })
        .collect();
    let mut route_spec = serde_json::json!({
        "parentRefs": parents,
        "rules": [{
            "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
            "backendRefs": [{"name": owner.name, "port": 80}],
            "timeouts": {"request": "0s", "backendRequest": "0s"},
        }],
    });
    if !spec.hostnames.is_empty() {
        route_spec["hostnames"] = serde_json::to_value(&spec.hostnames)?;
    }
    obj.data = serde_json::json!({"spec": route_spec});
    Ok(Some(obj))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::kefu_cluster;

    #[test]
    fn headless_service_publishes_every_pod_for_peers() {
        let kc = kefu_cluster(serde_json::json!({}));
        let svc = headless_service(&Owner::of(&kc).unwrap(), &kc);
        assert_eq!(svc.metadata.name.as_deref(), Some("chat-peers"));
        let s = svc.spec.unwrap();
        assert_eq!(s.cluster_ip.as_deref(), Some("None"));
        assert_eq!(s.publish_not_ready_addresses, Some(true));
        let ports: Vec<(i32, &str)> =
            s.ports.iter().flatten().map(|p| (p.port, p.protocol.as_deref().unwrap())).collect();
        assert_eq!(ports, [(8080, "TCP"), (7946, "UDP"), (7947, "TCP")]);
    }

    #[test]
    fn client_service_exposes_http_on_80_and_tcp_when_enabled() {
        let kc = kefu_cluster(serde_json::json!({}));
        let svc = client_service(&Owner::of(&kc).unwrap(), &kc);
        assert_eq!(svc.metadata.name.as_deref(), Some("chat"));
        let ports: Vec<i32> = svc.spec.as_ref().unwrap().ports.iter().flatten().map(|p| p.port).collect();
        assert_eq!(ports, [80, 8081]);
        let kc = kefu_cluster(serde_json::json!({"ports": {"tcp": 0}}));
        let svc = client_service(&Owner::of(&kc).unwrap(), &kc);
        assert_eq!(svc.spec.unwrap().ports.unwrap().len(), 1);
    }

    #[test]
    fn ingress_has_websocket_timeouts_tls_and_user_annotations_win() {
        let kc = kefu_cluster(serde_json::json!({"ingress": {"className": "nginx", "host": "chat.example.com",
            "tlsSecretName": "chat-tls", "annotations": {"nginx.ingress.kubernetes.io/proxy-read-timeout": "7200"}}}));
        let ing = ingress(&Owner::of(&kc).unwrap(), &kc).unwrap();
        let a = ing.metadata.annotations.as_ref().unwrap();
        assert_eq!(a["nginx.ingress.kubernetes.io/proxy-read-timeout"], "7200");
        assert_eq!(a["nginx.ingress.kubernetes.io/proxy-send-timeout"], "3600");
        let spec = ing.spec.unwrap();
        assert_eq!(spec.ingress_class_name.as_deref(), Some("nginx"));
        assert_eq!(spec.tls.unwrap()[0].secret_name.as_deref(), Some("chat-tls"));
        let rule = &spec.rules.unwrap()[0];
        assert_eq!(rule.host.as_deref(), Some("chat.example.com"));
        let backend = rule.http.as_ref().unwrap().paths[0].backend.service.as_ref().unwrap();
        assert_eq!(backend.name, "chat");
        let plain = kefu_cluster(serde_json::json!({}));
        assert!(ingress(&Owner::of(&plain).unwrap(), &plain).is_none());
    }

    #[test]
    fn http_route_targets_the_client_service_without_timeouts() {
        let kc = kefu_cluster(serde_json::json!({"httpRoute": {"parentRefs": [{"name": "gw", "namespace": "infra"}],
            "hostnames": ["chat.example.com"]}}));
        let route = http_route(&Owner::of(&kc).unwrap(), &kc).unwrap().unwrap();
        assert_eq!(route.types.as_ref().unwrap().kind, "HTTPRoute");
        let spec = &route.data["spec"];
        assert_eq!(spec["parentRefs"][0], serde_json::json!({"name": "gw", "namespace": "infra"}));
        assert_eq!(spec["hostnames"][0], "chat.example.com");
        assert_eq!(spec["rules"][0]["backendRefs"][0]["name"], "chat");
        assert_eq!(spec["rules"][0]["timeouts"]["request"], "0s");
    }
}
