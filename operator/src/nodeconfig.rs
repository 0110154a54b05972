//! Render the kefu-node configuration a KefuCluster asks for.
//!
//! The node refuses unknown keys, so the operator only writes keys today's node knows into `kefu.toml`:
//! listeners, data directory, log format, shutdown grace, plus the user's `spec.config` overrides. Settings
//! for cluster mode (gossip seeds, peer port, Redis, S3) go into a separate `cluster.toml` key that the node
//! does not read yet; it is mounted and hashed, so once the node learns cluster mode the pods already have it
//! and a change rolls them. Secrets never enter either file: they come from Secrets through the environment.

use kefu_crds::KefuClusterSpec;
use toml::{Table, Value};

use crate::error::{Error, Result};

/// Where the ConfigMap is mounted in the pod.
pub const CONFIG_DIR: &str = "/etc/kefu";
/// ConfigMap key (and file name) of the node config.
pub const NODE_CONFIG_KEY: &str = "kefu.toml";
/// ConfigMap key of the cluster-mode settings (not read by the node yet).
pub const CLUSTER_CONFIG_KEY: &str = "cluster.toml";
/// Mount path of the per-pod volume.
pub const DATA_DIR: &str = "/var/lib/kefu";
/// Seconds the preStop hook waits so endpoints stop routing to the pod before SIGTERM.
pub const PRESTOP_SLEEP_SECS: i64 = 5;

/// Keys the operator owns; overriding them in `spec.config` would break the pod wiring.
const RESERVED: &[&str] = &["node_id", "server.listen", "server.tcp_listen", "data.dir", "auth.secret"];

/// The node config (`kefu.toml`) for one KefuCluster.
pub fn node_config(spec: &KefuClusterSpec) -> Result<String> {
    let mut doc = Table::new();
    set(&mut doc, "server.listen", format!("0.0.0.0:{}", spec.ports.http).into());
    let tcp = if spec.ports.tcp == 0 { String::new() } else { format!("0.0.0.0:{}", spec.ports.tcp) };
    set(&mut doc, "server.tcp_listen", tcp.into());
    // The node must finish draining before the kubelet's SIGKILL: grace minus preStop minus a margin.
    let drain = (spec.pod.termination_grace_period_seconds - PRESTOP_SLEEP_SECS - 3).max(1);
    set(&mut doc, "server.shutdown_grace_secs", Value::Integer(drain));
    set(&mut doc, "data.dir", DATA_DIR.into());
    set(&mut doc, "log.format", "json".into());
    // A demo agent whose token lands in the pod log is fine on a laptop, not in a cluster.
    set(&mut doc, "demo.enabled", Value::Boolean(false));
    if let Some(overrides) = &spec.config {
        let overrides = json_to_toml(overrides)?;
        let Value::Table(overrides) = overrides else {
            return Err(Error::InvalidSpec("spec.config must be an object of config sections".into()));
        };
        for key in RESERVED {
            if lookup(&overrides, key).is_some() {
                return Err(Error::InvalidSpec(format!("spec.config.{key} is set by the operator")));
            }
        }
        merge(&mut doc, overrides);
    }
    toml::to_string(&doc).map_err(|e| Error::InvalidSpec(format!("spec.config cannot be rendered as TOML: {e}")))
}

/// The cluster-mode settings (`cluster.toml`): seeds on the headless Service, ports, Redis, S3.
pub fn cluster_config(name: &str, namespace: &str, spec: &KefuClusterSpec) -> String {
    let mut doc = Table::new();
    let headless = crate::workload::headless_name(name);
    set(
        &mut doc,
        "cluster.seeds",
        Value::Array(vec![format!("{headless}.{namespace}.svc:{}", spec.ports.gossip).into()]),
    );
    set(&mut doc, "cluster.gossip_listen", format!("0.0.0.0:{}", spec.ports.gossip).into());
    set(&mut doc, "cluster.peer_listen", format!("0.0.0.0:{}", spec.ports.peer).into());
    // Each pod advertises its stable DNS name: <pod>.<headless>.<namespace>.svc.
    set(&mut doc, "cluster.advertise_domain", format!("{headless}.{namespace}.svc").into());
    if let Some(redis) = &spec.redis {
        if let Some(url) = &redis.url {
            set(&mut doc, "redis.url", url.clone().into());
        } else {
            set(&mut doc, "redis.url_env", crate::workload::REDIS_URL_ENV.into());
        }
    }
    if let Some(s3) = &spec.s3 {
        set(&mut doc, "s3.endpoint", s3.endpoint.clone().into());
        set(&mut doc, "s3.bucket", s3.bucket.clone().into());
        set(&mut doc, "s3.region", s3.region.clone().into());
        set(&mut doc, "s3.path_style", Value::Boolean(s3.path_style));
    }
    toml::to_string(&doc).unwrap_or_default()
}

fn set(doc: &mut Table, dotted: &str, value: Value) {
    let mut parts: Vec<&str> = dotted.split('.').collect();
    let last = parts.pop().unwrap_or(dotted);
    let mut table = doc;
    for p in parts {
        let entry = table.entry(p.to_owned()).or_insert_with(|| Value::Table(Table::new()));
        if !entry.is_table() {
            *entry = Value::Table(Table::new());
        }
        let Value::Table(t) = entry else { unreachable!("just made it a table") };
        table = t;
    }
    table.insert(last.to_owned(), value);
}

fn lookup<'a>(doc: &'a Table, dotted: &str) -> Option<&'a Value> {
    let mut parts = dotted.split('.').peekable();
    let mut table = doc;
    while let Some(p) = parts.next() {
        let v = table.get(p)?;
        if parts.peek().is_none() {
            return Some(v);
        }
        table = v.as_table()?;
    }
    None
}

/// Deep-merge `over` into `base`: tables merge key by key, everything else replaces.
fn merge(base: &mut Table, over: Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(Value::Table(b)), Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn json_to_toml(v: &serde_json::Value) -> Result<Value> {
    Ok(match v {
        serde_json::Value::Null => {
            return Err(Error::InvalidSpec("spec.config cannot contain null (TOML has no null)".into()));
        }
        serde_json::Value::Bool(b) => Value::Boolean(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::Integer(i),
            None => Value::Float(n.as_f64().unwrap_or_default()),
        },
        serde_json::Value::String(s) => Value::String(s.clone()),
        serde_json::Value::Array(a) => Value::Array(a.iter().map(json_to_toml).collect::<Result<_>>()?),
        serde_json::Value::Object(o) => {
            Value::Table(o.iter().map(|(k, v)| Ok((k.clone(), json_to_toml(v)?))).collect::<Result<_>>()?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v: serde_json::Value) -> KefuClusterSpec {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn defaults_listen_on_all_interfaces_and_store_on_the_volume() {
        let text = node_config(&spec(serde_json::json!({}))).unwrap();
        let t: Table = text.parse().unwrap();
        assert_eq!(lookup(&t, "server.listen").unwrap().as_str(), Some("0.0.0.0:8080"));
        assert_eq!(lookup(&t, "server.tcp_listen").unwrap().as_str(), Some("0.0.0.0:8081"));
        assert_eq!(lookup(&t, "data.dir").unwrap().as_str(), Some(DATA_DIR));
        assert_eq!(lookup(&t, "demo.enabled").unwrap().as_bool(), Some(false));
        // 30 s grace − 5 s preStop − 3 s margin.
        assert_eq!(lookup(&t, "server.shutdown_grace_secs").unwrap().as_integer(), Some(22));
        assert!(!text.contains("secret"), "no secret in the ConfigMap: {text}");
    }

    #[test]
    fn overrides_merge_into_sections_and_win() {
        let s = spec(serde_json::json!({
            "config": {"routing": {"strategy": "least-loaded"}, "log": {"format": "text"}, "limits": {"burst": 80}},
            "ports": {"tcp": 0},
        }));
        let t: Table = node_config(&s).unwrap().parse().unwrap();
        assert_eq!(lookup(&t, "routing.strategy").unwrap().as_str(), Some("least-loaded"));
        assert_eq!(lookup(&t, "log.format").unwrap().as_str(), Some("text"));
        assert_eq!(lookup(&t, "limits.burst").unwrap().as_integer(), Some(80));
        assert_eq!(lookup(&t, "server.tcp_listen").unwrap().as_str(), Some(""));
        assert_eq!(lookup(&t, "server.listen").unwrap().as_str(), Some("0.0.0.0:8080"), "sibling keys kept");
    }

    #[test]
    fn operator_owned_keys_and_nulls_are_refused() {
        for bad in [
            serde_json::json!({"server": {"listen": "1.2.3.4:1"}}),
            serde_json::json!({"auth": {"secret": "inline-secret-value"}}),
            serde_json::json!({"data": {"dir": "/tmp"}}),
            serde_json::json!({"node_id": "x"}),
            serde_json::json!({"routing": {"strategy": null}}),
        ] {
            let err = node_config(&spec(serde_json::json!({"config": bad.clone()}))).unwrap_err();
            assert!(matches!(err, Error::InvalidSpec(_)), "{bad}: {err}");
        }
    }

    #[test]
    fn cluster_settings_live_outside_the_node_config() {
        let s = spec(serde_json::json!({
            "redis": {"urlSecretRef": {"name": "redis", "key": "url"}},
            "s3": {"endpoint": "http://minio:9000", "bucket": "kefu"},
        }));
        let node = node_config(&s).unwrap();
        assert!(!node.contains("redis") && !node.contains("minio") && !node.contains("seeds"), "{node}");
        let cluster: Table = cluster_config("chat", "prod", &s).parse().unwrap();
        let seeds = lookup(&cluster, "cluster.seeds").unwrap().as_array().unwrap();
        assert_eq!(seeds[0].as_str(), Some("chat-peers.prod.svc:7946"));
        assert_eq!(lookup(&cluster, "s3.path_style").unwrap().as_bool(), Some(true));
        assert_eq!(lookup(&cluster, "redis.url_env").unwrap().as_str(), Some(crate::workload::REDIS_URL_ENV));
    }
}
