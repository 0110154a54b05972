//! Test fixtures: KefuCluster objects and `FakeApi`, a small in-memory API server behind kube's `Client`
//! (through `tower_test::mock::pair`) that understands the requests the operator makes — get, create,
//! replace with resourceVersion checks, server-side apply (create or merge), JSON patch of finalizers,
//! status patches, delete and delete-collection by label — records every request, and can be told to fail.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Request, Response};
use kefu_crds::KefuCluster;
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};

/// A KefuCluster `default/chat` (uid, generation 1, finalizer present) with `spec`.
pub fn kefu_cluster(spec: Value) -> KefuCluster {
    serde_json::from_value(json!({
        "apiVersion": "kefu.io/v1alpha1", "kind": "KefuCluster",
        "metadata": {"name": "chat", "namespace": "default", "uid": "0b9b0a8e-1", "generation": 1,
            "resourceVersion": "1", "finalizers": [crate::controller::FINALIZER]},
        "spec": spec,
    }))
    .expect("valid KefuCluster")
}

/// One request the fake served.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path without the query.
    pub path: String,
    pub query: String,
    pub body: Value,
}

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Value>,
    seen: Vec<Seen>,
    /// (method, path fragment, status code): matching requests fail.
    failures: Vec<(String, String, u16)>,
    /// Path prefixes of APIs that are not installed (every request 404s).
    missing: Vec<String>,
    version: u64,
}

/// In-memory API server for mocked-API tests.
#[derive(Clone)]
pub struct FakeApi {
    pub client: Client,
    state: Arc<Mutex<State>>,
}

fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code}),
    )
}

fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) if slot.is_object() && v.is_object() => merge(slot, v),
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

fn decode(q: &str) -> String {
    let mut out = Vec::new();
    let bytes = q.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() + 1 {
            if let Ok(b) = u8::from_str_radix(q.get(i + 1..i + 3).unwrap_or(""), 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn matches_labels(obj: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        obj["metadata"]["labels"][k].as_str() == Some(v)
    })
}

impl FakeApi {
    /// Start serving on a background task.
    pub fn start() -> FakeApi {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let state: Arc<Mutex<State>> = Arc::default();
        let fake = FakeApi { client: Client::new(service, "default"), state: state.clone() };
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let bytes = body.collect_bytes().await.unwrap_or_default();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let content_type =
                    parts.headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                let (code, reply) = Self::serve(
                    &state,
                    parts.method.as_str(),
                    parts.uri.path(),
                    parts.uri.query().unwrap_or(""),
                    &content_type,
                    body,
                );
                let response = Response::builder()
                    .status(code)
                    .body(Body::from(serde_json::to_vec(&reply).unwrap_or_default()))
                    .expect("valid response");
                send.send_response(response);
            }
        });
        fake
    }

    fn serve(state: &Mutex<State>, method: &str, path: &str, query: &str, ctype: &str, body: Value) -> (u16, Value) {
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        s.seen.push(Seen { method: method.into(), path: path.into(), query: decode(query), body: body.clone() });
        if let Some((_, _, code)) = s.failures.iter().find(|(m, p, _)| m == method && path.contains(p.as_str())) {
            let code = *code;
            return status(code, "InternalError", "injected failure");
        }
        if s.missing.iter().any(|m| path.starts_with(m.as_str())) {
            return status(404, "NotFound", "the server could not find the requested resource");
        }
        s.version += 1;
        let rv = s.version.to_string();
        let (key, sub) = match path.strip_suffix("/status") {
            Some(k) => (k.to_owned(), Some("status")),
            None => (path.to_owned(), None),
        };
        match method {
            "GET" => match s.objects.get(&key) {
                Some(o) => (200, o.clone()),
                // A collection: list what is stored under it, filtered by label.
                None if query.contains("limit") || query.contains("watch") || query.contains("labelSelector") => {
                    let q = decode(query);
                    let selector = q.split('&').find_map(|kv| kv.strip_prefix("labelSelector=")).unwrap_or("");
                    let prefix = format!("{key}/");
                    let items: Vec<Value> = s
                        .objects
                        .iter()
                        .filter(|(k, o)| {
                            k.starts_with(&prefix) && !k[prefix.len()..].contains('/') && matches_labels(o, selector)
                        })
                        .map(|(_, o)| o.clone())
                        .collect();
                    (
                        200,
                        json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": rv}, "items": items}),
                    )
                }
                None => status(404, "NotFound", &format!("{key} not found")),
            },
            "POST" => {
                let name = body["metadata"]["name"].as_str().map(str::to_owned).unwrap_or_else(|| format!("gen-{rv}"));
                let key = format!("{key}/{name}");
                if s.objects.contains_key(&key) {
                    return status(409, "AlreadyExists", &format!("{key} already exists"));
                }
                let mut obj = body;
                obj["metadata"]["name"] = name.into();
                obj["metadata"]["resourceVersion"] = rv.into();
                s.objects.insert(key, obj.clone());
                (201, obj)
            }
            "PUT" => {
                let Some(current) = s.objects.get(&key) else { return status(404, "NotFound", "not found") };
                if current["metadata"]["resourceVersion"] != body["metadata"]["resourceVersion"] {
                    return status(409, "Conflict", "the object has been modified");
                }
                let mut obj = body;
                obj["metadata"]["resourceVersion"] = rv.into();
                s.objects.insert(key, obj.clone());
                (200, obj)
            }
            "PATCH" if ctype.contains("json-patch") => {
                let Some(mut obj) = s.objects.get(&key).cloned() else { return status(404, "NotFound", "not found") };
                for op in body.as_array().into_iter().flatten() {
                    let p = op["path"].as_str().unwrap_or("");
                    match (op["op"].as_str(), p) {
                        (Some("add"), "/metadata/finalizers") => obj["metadata"]["finalizers"] = op["value"].clone(),
                        (Some("add"), "/metadata/finalizers/-") => {
                            let mut f = obj["metadata"]["finalizers"].as_array().cloned().unwrap_or_default();
                            f.push(op["value"].clone());
                            obj["metadata"]["finalizers"] = Value::Array(f);
                        }
                        (Some("remove"), p) if p.starts_with("/metadata/finalizers/") => {
                            let i: usize = p.rsplit('/').next().and_then(|i| i.parse().ok()).unwrap_or(usize::MAX);
                            if let Some(f) = obj["metadata"]["finalizers"].as_array_mut() {
                                if i < f.len() {
                                    f.remove(i);
                                }
                            }
                        }
                        _ => {}
                    }
                }
                obj["metadata"]["resourceVersion"] = rv.into();
                s.objects.insert(key, obj.clone());
                (200, obj)
            }
            "PATCH" => {
                let mut obj = s.objects.get(&key).cloned().unwrap_or_else(|| json!({}));
                match sub {
                    Some(_) => {
                        if !s.objects.contains_key(&key) {
                            return status(404, "NotFound", "not found");
                        }
                        obj["status"] = body["status"].clone();
                    }
                    None => {
                        let mut b = body;
                        if let Some(m) = b.as_object_mut() {
                            m.remove("status");
                        }
                        merge(&mut obj, b);
                    }
                }
                obj["metadata"]["resourceVersion"] = rv.into();
                s.objects.insert(key, obj.clone());
                (200, obj)
            }
            "DELETE" if !query.contains("labelSelector") => match s.objects.remove(&key) {
                Some(o) => (200, o),
                None => status(404, "NotFound", &format!("{key} not found")),
            },
            "DELETE" => {
                let selector = decode(query.split('&').find_map(|kv| kv.strip_prefix("labelSelector=")).unwrap_or(""));
                let prefix = format!("{key}/");
                let doomed: Vec<String> = s
                    .objects
                    .iter()
                    .filter(|(k, o)| {
                        k.starts_with(&prefix) && !k[prefix.len()..].contains('/') && matches_labels(o, &selector)
                    })
                    .map(|(k, _)| k.clone())
                    .collect();
                let items: Vec<Value> = doomed.iter().filter_map(|k| s.objects.remove(k)).collect();
                (200, json!({"apiVersion": "v1", "kind": "List", "metadata": {}, "items": items}))
            }
            _ => status(405, "MethodNotAllowed", method),
        }
    }

    /// Store `obj` at `path` (as if it existed before the test).
    pub fn put(&self, path: &str, obj: Value) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).objects.insert(path.into(), obj);
    }

    /// The stored object at `path`.
    pub fn object(&self, path: &str) -> Option<Value> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).objects.get(path).cloned()
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).seen.clone()
    }

    /// Forget recorded requests.
    pub fn clear_seen(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).seen.clear();
    }

    /// Make `method` requests whose path contains `fragment` fail with `code`.
    pub fn fail(&self, method: &str, fragment: &str, code: u16) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).failures.push((method.into(), fragment.into(), code));
    }

    /// Stop failing.
    pub fn heal(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).failures.clear();
    }

    /// Pretend the API under `prefix` (e.g. `/apis/keda.sh/`) is not installed.
    pub fn without_api(&self, prefix: &str) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).missing.push(prefix.into());
    }
}
