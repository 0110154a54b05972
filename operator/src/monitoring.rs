//! Prometheus Operator ServiceMonitor for the node metrics, applied only when that CRD is installed.

use kefu_crds::KefuCluster;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};

use crate::network::CLIENT_SERVICE_LABEL;
use crate::workload::{Owner, selector_labels};

/// The ServiceMonitor type.
pub fn service_monitor_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("monitoring.coreos.com", "v1", "ServiceMonitor"),
        "servicemonitors",
    )
}

/// ServiceMonitor scraping `/metrics` of every pod through the client Service, unless disabled.
pub fn service_monitor(owner: &Owner, kc: &KefuCluster) -> Option<DynamicObject> {
    let spec = &kc.spec.service_monitor;
    if !spec.enabled {
        return None;
    }
    let mut obj = DynamicObject::new(&owner.name, &service_monitor_resource()).within(&owner.namespace);
    obj.metadata = owner.meta(owner.name.clone());
    let mut selector = selector_labels(&owner.name);
    selector.insert(CLIENT_SERVICE_LABEL.0.into(), CLIENT_SERVICE_LABEL.1.into());
    obj.data = serde_json::json!({"spec": {
        "selector": {"matchLabels": selector},
        "endpoints": [{"port": "http", "path": "/metrics", "interval": spec.interval}],
    }});
    Some(obj)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::kefu_cluster;

    #[test]
    fn service_monitor_scrapes_metrics_on_the_http_port() {
        let kc = kefu_cluster(serde_json::json!({"serviceMonitor": {"interval": "15s"}}));
        let sm = service_monitor(&Owner::of(&kc).unwrap(), &kc).unwrap();
        assert_eq!(sm.data["spec"]["selector"]["matchLabels"]["kefu.io/service"], "client", "not the headless one");
        let ep = &sm.data["spec"]["endpoints"][0];
        assert_eq!(
            (ep["port"].as_str(), ep["path"].as_str(), ep["interval"].as_str()),
            (Some("http"), Some("/metrics"), Some("15s"))
        );
        let kc = kefu_cluster(serde_json::json!({"serviceMonitor": {"enabled": false}}));
        assert!(service_monitor(&Owner::of(&kc).unwrap(), &kc).is_none());
    }
}
