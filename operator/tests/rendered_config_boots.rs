//! "The rendered config boots": take the ConfigMap and StatefulSet the operator renders for a 3-replica
//! KefuCluster and run exactly their command, args, env and config files as three local `kefu-node`
//! processes — one per pod, each on its own loopback address standing in for the pod IP, pod DNS names mapped
//! to those addresses, volume mounts mapped to per-pod directories — then check that each node starts, takes
//! its node id from the pod name, serves a chat (agent + visitor over the raw TCP adapter), and drains on
//! SIGTERM. Needs `target/debug/kefu-node` (`make test-rust` builds it first).
//!
//! Cluster mode does not exist yet; once it does, this test should also check that the three form one cluster.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::{Container, EnvVar};
use kefu_crds::KefuCluster;
use kefu_operator::workload::{self, NODE_BINARY, Owner};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const AUTH_SECRET: &str = "rendered-config-boots-test-secret";

fn node_binary() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let bin = target.join("debug/kefu-node");
    assert!(bin.exists(), "{} missing: run `cargo build -p kefu-node` (make test-rust does)", bin.display());
    bin
}

fn cluster(spec: Value) -> KefuCluster {
    serde_json::from_value(json!({
        "apiVersion": "kefu.io/v1alpha1", "kind": "KefuCluster",
        "metadata": {"name": "chat", "namespace": "shop", "uid": "1f1e7c1e-0000-4000-8000-000000000001", "generation": 1},
        "spec": spec,
    }))
    .expect("valid KefuCluster")
}

/// One "pod": its rendered container run as a local process.
struct Pod {
    name: String,
    ip: IpAddr,
    root: PathBuf,
    command: Vec<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Drop for Pod {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Resolve an env var as the kubelet would, from the pod name and the Secrets.
fn resolve(var: &EnvVar, pod: &str, secrets: &HashMap<(&str, &str), &str>) -> (String, String) {
    if let Some(v) = &var.value {
        return (var.name.clone(), v.clone());
    }
    let src = var.value_from.as_ref().expect("value or valueFrom");
    if let Some(f) = &src.field_ref {
        assert_eq!(f.field_path, "metadata.name", "only the pod name is mapped here");
        return (var.name.clone(), pod.to_owned());
    }
    if let Some(s) = &src.secret_key_ref {
        let v =
            secrets.get(&(s.name.as_str(), s.key.as_str())).unwrap_or_else(|| panic!("no Secret {}/{}", s.name, s.key));
        return (var.name.clone(), (*v).to_owned());
    }
    panic!("env source of {} is not mapped by this test: {src:?}", var.name);
}

/// Lay out pod `ordinal`: config files and data dir under `root`, every mount path and 0.0.0.0 rewritten.
fn pod_from_render(
    base: &Path,
    ordinal: usize,
    ip: IpAddr,
    container: &Container,
    data: &BTreeMap<String, String>,
    secrets: &HashMap<(&str, &str), &str>,
) -> anyhow::Result<Pod> {
    let name = format!("chat-{ordinal}");
    let root = base.join(&name);
    let mut mounts: Vec<(String, PathBuf)> = Vec::new();
    for m in container.volume_mounts.iter().flatten() {
        let local = root.join(m.mount_path.trim_start_matches('/'));
        std::fs::create_dir_all(&local)?;
        if m.name == "config" {
            for (k, v) in data {
                // Inside the pod 0.0.0.0 means "the pod's own interfaces": here, the pod's loopback address.
                std::fs::write(local.join(k), v.replace("0.0.0.0", &ip.to_string()))?;
            }
        }
        mounts.push((m.mount_path.clone(), local));
    }
    let map = |s: &str| {
        let mut s = s.to_owned();
        for (from, to) in &mounts {
            s = s.replace(from.as_str(), &to.display().to_string());
        }
        s
    };
    // Config files may name mount paths too (data.dir): rewrite them in place.
    for (from, local) in &mounts {
        if from.starts_with("/etc") {
            for k in data.keys() {
                let p = local.join(k);
                let text = std::fs::read_to_string(&p)?;
                std::fs::write(&p, map(&text))?;
            }
        }
    }
    let mut command: Vec<String> = container.command.clone().unwrap_or_default();
    assert_eq!(command.first().map(String::as_str), Some(NODE_BINARY));
    command[0] = node_binary().display().to_string();
    command.extend(container.args.iter().flatten().map(|a| map(a)));
    let env = container.env.iter().flatten().map(|v| resolve(v, &name, secrets)).map(|(k, v)| (k, map(&v))).collect();
    Ok(Pod { name, ip, root, command, env, child: None })
}

impl Pod {
    fn cmd(&self, extra: &[&str]) -> Command {
        let mut c = Command::new(&self.command[0]);
        c.env_clear().envs(self.env.iter().cloned()).env("PATH", "/usr/bin:/bin");
        c.args(&self.command[1..]);
        c.args(extra);
        c
    }

    /// `kefu-node ... agent add` with the pod's config and env (same data dir), returning the token.
    fn add_agent(&self, id: &str) -> anyhow::Result<String> {
        // Replace the trailing `serve` with the agent subcommand.
        let mut c = Command::new(&self.command[0]);
        c.env_clear().envs(self.env.iter().cloned());
        let args: Vec<&String> = self.command[1..].iter().filter(|a| *a != "serve").collect();
        c.args(args).args(["agent", "add", "--id", id, "--name", id, "--capacity", "5"]);
        let out = c.output()?;
        if !out.status.success() {
            bail!("agent add failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    }

    fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.root.join("node.log"))?;
        let child = self.cmd(&[]).stdout(log.try_clone()?).stderr(log).stdin(Stdio::null()).spawn()?;
        self.child = Some(child);
        Ok(())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("node.log")).unwrap_or_default()
    }
}

async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.ok()?;
    let mut text = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut s, &mut text).await.ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, text))
}

async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    http_get(addr, path).await.map(|(code, _)| code)
}

/// `kefu_*` metric names the Grafana dashboard in config/ queries (the operator's own excluded).
fn dashboard_metrics() -> anyhow::Result<Vec<String>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/grafana-dashboard.json");
    let text = std::fs::read_to_string(path)?;
    let mut names: Vec<String> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("kefu_") && !w.starts_with("kefu_operator_"))
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

struct Frames {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

impl Frames {
    async fn connect(addr: SocketAddr) -> anyhow::Result<Frames> {
        let (r, w) = TcpStream::connect(addr).await?.into_split();
        Ok(Frames { reader: BufReader::new(r), writer: w })
    }

    async fn send(&mut self, v: Value) -> anyhow::Result<()> {
        self.writer.write_all(format!("{v}\n").as_bytes()).await?;
        Ok(())
    }

    /// Read frames until one satisfies `pred` (5 s).
    async fn until(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut line = String::new();
            let left = deadline.saturating_duration_since(Instant::now());
            let n = tokio::time::timeout(left, self.reader.read_line(&mut line))
                .await
                .with_context(|| format!("timed out waiting for {what}"))??;
            if n == 0 {
                bail!("connection closed while waiting for {what}");
            }
            let v: Value = serde_json::from_str(&line)?;
            if pred(&v) {
                return Ok(v);
            }
        }
    }
}

#[tokio::test]
async fn three_rendered_pods_boot_and_each_serves_a_chat() -> anyhow::Result<()> {
    let kc = cluster(json!({
        "replicas": 3,
        "auth": {"secretRef": {"name": "kefu-auth", "key": "secret"}},
        "config": {"routing": {"auto_accept": true}},
        "redis": {"urlSecretRef": {"name": "redis", "key": "url"}},
        "s3": {"endpoint": "http://minio.storage:9000", "bucket": "kefu", "credentialsSecret": "minio"},
        "pod": {"terminationGracePeriodSeconds": 20},
    }));
    let owner = Owner::of(&kc)?;
    let cm = workload::config_map(&owner, &kc)?;
    let sts = workload::stateful_set(&owner, &kc, kc.spec.effective_replicas(), &workload::config_hash(&cm));
    let replicas = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
    assert_eq!(replicas, 3);
    let container = &sts.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0];
    let http_port =
        container.ports.iter().flatten().find(|p| p.name.as_deref() == Some("http")).unwrap().container_port;
    let tcp_port = container.ports.iter().flatten().find(|p| p.name.as_deref() == Some("tcp")).unwrap().container_port;
    let secrets: HashMap<(&str, &str), &str> = HashMap::from([
        (("kefu-auth", "secret"), AUTH_SECRET),
        (("redis", "url"), "redis://:pw@redis.shop:6379/0"),
        (("minio", "accessKeyId"), "AKIA"),
        (("minio", "secretAccessKey"), "s3cr3t"),
    ]);

    // Pod IPs: a loopback /24 of our own, so rendered fixed ports (8080/8081) do not clash with anything.
    let net = 100 + (std::process::id() % 100) as u8;
    let base = tempfile::tempdir()?;
    let data = cm.data.clone().unwrap_or_default();
    let mut pods = Vec::new();
    let mut dns: HashMap<String, IpAddr> = HashMap::new();
    for i in 0..replicas as usize {
        let ip = IpAddr::V4(Ipv4Addr::new(127, net, 7, 10 + i as u8));
        let pod = pod_from_render(base.path(), i, ip, container, &data, &secrets)?;
        dns.insert(format!("{}.{}.{}.svc", pod.name, workload::headless_name("chat"), "shop"), ip);
        pods.push(pod);
    }
    // The secret reaches the node through env only, never the ConfigMap.
    assert!(data.values().all(|v| !v.contains(AUTH_SECRET) && !v.contains("s3cr3t")));

    let mut tokens = Vec::new();
    for pod in &mut pods {
        tokens.push(pod.add_agent("alice")?);
        pod.start()?;
    }
    for pod in &pods {
        let addr = SocketAddr::new(dns[&format!("{}.chat-peers.shop.svc", pod.name)], http_port as u16);
        let deadline = Instant::now() + Duration::from_secs(20);
        while http_status(addr, "/readyz").await != Some(200) {
            assert!(Instant::now() < deadline, "{} not ready:\n{}", pod.name, pod.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(http_status(addr, "/healthz").await, Some(200));
    }

    for (pod, token) in pods.iter().zip(&tokens) {
        let tcp = SocketAddr::new(pod.ip, tcp_port as u16);
        let mut agent = Frames::connect(tcp).await?;
        agent.send(json!({"type": "hello", "v": 1, "role": "agent", "token": token})).await?;
        let welcome = agent.until("agent welcome", |f| f["type"] == "welcome").await?;
        assert_eq!(welcome["node"], pod.name.as_str(), "node id comes from the pod name (fieldRef)");
        let mut visitor = Frames::connect(tcp).await?;
        visitor.send(json!({"type": "hello", "v": 1, "role": "visitor", "name": "Vera"})).await?;
        visitor.until("visitor welcome", |f| f["type"] == "welcome").await?;
        visitor.send(json!({"type": "open", "id": "o1"})).await?;
        let ack = visitor.until("open ack", |f| f["type"] == "ack" && f["id"] == "o1").await?;
        let conv = ack["conv"].as_str().context("conv in ack")?.to_owned();
        agent
            .until("assignment", |f| f["type"] == "conversation" && f["conv"]["state"] == "assigned")
            .await
            .with_context(|| pod.log())?;
        let text = format!("hello from {}", pod.name);
        visitor.send(json!({"type": "send", "id": "m1", "conv": conv, "text": text})).await?;
        let ack = visitor.until("send ack", |f| f["type"] == "ack" && f["id"] == "m1").await?;
        assert!(ack["seq"].as_u64().unwrap_or(0) >= 2);
        let msg = agent.until("message", |f| f["type"] == "msg" && f["entry"]["kind"] == "message").await?;
        assert_eq!(msg["entry"]["text"], text.as_str());
    }

    // The Grafana dashboard only queries metrics a real node exports (after a chat and one error frame).
    let mut bad = Frames::connect(SocketAddr::new(pods[0].ip, tcp_port as u16)).await?;
    bad.send(json!({"type": "hello", "v": 1, "role": "visitor"})).await?;
    bad.until("welcome", |f| f["type"] == "welcome").await?;
    bad.send(json!({"type": "send", "id": "x", "conv": "c_nope", "text": "hi"})).await?;
    bad.until("error frame", |f| f["type"] == "error").await?;
    let (_, metrics) = http_get(SocketAddr::new(pods[0].ip, http_port as u16), "/metrics").await.context("metrics")?;
    let wanted = dashboard_metrics()?;
    assert!(wanted.len() >= 8, "dashboard lost its panels: {wanted:?}");
    let missing: Vec<&String> =
        wanted.iter().filter(|m| !metrics.contains(&format!("{m} ")) && !metrics.contains(&format!("{m}{{"))).collect();
    assert!(missing.is_empty(), "dashboard queries metrics the node does not export: {missing:?}");

    // SIGTERM drains and exits well within the rendered grace period.
    for pod in &mut pods {
        let child = pod.child.as_mut().unwrap();
        let pid = child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait()? {
                assert!(status.success(), "{} exited with {status}:\n{}", pod.name, pod.log());
                break;
            }
            assert!(Instant::now() < deadline, "{} did not stop on SIGTERM", pod.name);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        pod.child = None;
    }
    Ok(())
}

/// Every sample KefuCluster under config/ renders a node config that today's `kefu-node print-config` accepts.
#[test]
fn every_sample_renders_a_config_the_node_accepts() -> anyhow::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        let text = std::fs::read_to_string(&path)?;
        if path.extension().is_none_or(|e| e != "yaml") || !text.contains("kind: KefuCluster") {
            continue;
        }
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(doc)?;
            if v["kind"] != "KefuCluster" {
                continue;
            }
            let mut kc: KefuCluster = serde_json::from_value(v)?;
            kc.metadata.namespace.get_or_insert_with(|| "default".into());
            kc.metadata.uid = Some("u".into());
            kc.validate_cel().map_err(|e| anyhow::anyhow!("{}: CEL: {e}", path.display()))?;
            let cm = workload::config_map(&Owner::of(&kc)?, &kc)?;
            let tmp = tempfile::tempdir()?;
            let file = tmp.path().join("kefu.toml");
            std::fs::write(&file, &cm.data.as_ref().unwrap()["kefu.toml"])?;
            let out = Command::new(node_binary())
                .env_clear()
                .env("KEFU_NODE_ID", "chat-0")
                .env("KEFU_AUTH__SECRET", AUTH_SECRET)
                .args(["--config", file.to_str().unwrap(), "print-config"])
                .output()?;
            assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
            checked += 1;
        }
    }
    assert!(checked >= 2, "expected the minimal and production samples, found {checked}");
    Ok(())
}

/// The other way round: a refused key makes print-config fail, so the test above can fail.
#[test]
fn print_config_refuses_an_unknown_key() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let file = tmp.path().join("kefu.toml");
    std::fs::write(&file, "[cluster]\nseeds = []\n")?;
    let out =
        Command::new(node_binary()).env_clear().args(["--config", file.to_str().unwrap(), "print-config"]).output()?;
    assert!(!out.status.success());
    Ok(())
}
