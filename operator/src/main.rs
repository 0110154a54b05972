//! `kefu-operator`: run the KefuCluster controller (with optional leader election), or print what it would
//! create for a manifest (`render`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use clap::{Parser, Subcommand};
use k8s_openapi::api::coordination::v1::Lease;
use kefu_crds::KefuCluster;
use kefu_operator::Context;
use kefu_operator::lease::LeaseLock;
use kefu_operator::metrics::Metrics;
use kube::{Api, Client};
use tracing::{error, info, warn};

#[derive(Debug, Parser)]
#[command(name = "kefu-operator", version, about = "Kubernetes operator for KefuCluster")]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "KEFU_OPERATOR_LISTEN", default_value = "0.0.0.0:8080", global = true)]
    listen: SocketAddr,
    /// Run the controller only while holding the Lease (safe with several replicas).
    #[arg(long, env = "KEFU_OPERATOR_LEADER_ELECT", global = true)]
    leader_elect: bool,
    /// Name of the Lease.
    #[arg(long, env = "KEFU_OPERATOR_LEASE_NAME", default_value = "kefu-operator", global = true)]
    lease_name: String,
    /// Namespace of the Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default", global = true)]
    lease_namespace: String,
    /// Identity in the Lease (the pod name).
    #[arg(long, env = "POD_NAME", global = true)]
    identity: Option<String>,
    /// Lease duration in seconds.
    #[arg(long, default_value_t = 15, global = true)]
    lease_seconds: u64,
    /// Log as JSON lines.
    #[arg(long, env = "KEFU_OPERATOR_LOG_JSON", global = true)]
    log_json: bool,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the controller (the default).
    Run,
    /// Print every object the operator would create for the KefuCluster in FILE (YAML), then exit.
    Render {
        #[arg(short = 'f', long)]
        file: PathBuf,
    },
}

#[derive(Clone)]
struct Health {
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
}

async fn metrics_page(State(h): State<Health>) -> String {
    h.metrics.render()
}

async fn readyz(State(h): State<Health>) -> StatusCode {
    if h.ready.load(Ordering::Relaxed) { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,kube=warn".into());
    if cli.log_json {
        tracing_subscriber::fmt().json().with_env_filter(filter).init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    match &cli.command {
        Some(Cmd::Render { file }) => {
            let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
            let mut found = 0;
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let v: serde_json::Value = serde::Deserialize::deserialize(doc)?;
                if v["kind"] != "KefuCluster" {
                    continue;
                }
                let mut kc: KefuCluster =
                    serde_json::from_value(v).with_context(|| format!("{}: invalid KefuCluster", file.display()))?;
                kc.metadata.namespace.get_or_insert_with(|| "default".into());
                kc.metadata.uid.get_or_insert_with(|| "00000000-0000-0000-0000-000000000000".into());
                print!("{}", kefu_operator::render(&kc)?);
                found += 1;
            }
            anyhow::ensure!(found > 0, "{} contains no KefuCluster", file.display());
            Ok(())
        }
        None | Some(Cmd::Run) => run(cli).await,
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // kube is built without a default crypto provider; pick ring before the first TLS connection.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = Client::try_default().await.context("cannot build a Kubernetes client (KUBECONFIG / in-cluster)")?;
    let metrics = Arc::new(Metrics::new());
    let health = Health { metrics: metrics.clone(), ready: Arc::default() };
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(health.clone());
    let listener =
        tokio::net::TcpListener::bind(cli.listen).await.with_context(|| format!("cannot bind {}", cli.listen))?;
    info!(listen = %cli.listen, "serving /metrics, /healthz, /readyz");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            error!(error = %e, "http server stopped");
        }
    });

    // Ready means "up and able to serve": a standby waiting for the lease is ready too, so a Deployment
    // rollout of several replicas does not stall on the standbys.
    health.ready.store(true, Ordering::Relaxed);
    let identity = cli.identity.clone().unwrap_or_else(|| format!("kefu-operator-{}", std::process::id()));
    if cli.leader_elect {
        let lock = LeaseLock::new(
            Api::<Lease>::namespaced(client.clone(), &cli.lease_namespace),
            &cli.lease_name,
            &identity,
            Duration::from_secs(cli.lease_seconds),
        );
        info!(identity = %identity, lease = %cli.lease_name, "waiting for leadership");
        loop {
            match lock.try_acquire_or_renew().await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => warn!(error = %e, "lease acquire failed"),
            }
            tokio::time::sleep(lock.renew_interval()).await;
        }
        info!(identity = %identity, "became leader");
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(lock.renew_interval()).await;
                match lock.try_acquire_or_renew().await {
                    Ok(true) => {}
                    // Leadership lost: stop at once so two controllers never write together; the pod restarts
                    // as a standby.
                    Ok(false) => {
                        error!("lost the lease to another replica; exiting");
                        std::process::exit(1);
                    }
                    Err(e) => warn!(error = %e, "lease renew failed"),
                }
            }
        });
    }
    metrics.leader.set(1);
    let ctx = Arc::new(Context::new(client, metrics, Some(identity)));
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .unwrap_or_else(|_| unreachable!("SIGTERM handler"));
        tokio::select! {
            _ = shutdown => {},
            _ = term.recv() => {},
        }
    };
    info!("controller starting");
    kefu_operator::controller::run(ctx, shutdown).await?;
    info!("controller stopped");
    Ok(())
}
