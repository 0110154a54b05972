//! `kefu-node`: serve, print the effective config, manage agents.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kefu_node::Config;
use kefu_node::api::NewAgent;
use kefu_node::auth::Auth;
use kefu_node::server::load_or_create_secret;
use kefu_node::store::{Op, Store, encode};

#[derive(Debug, Parser)]
#[command(name = "kefu-node", version, about = "Kefu live-chat node")]
struct Cli {
    /// TOML config file (env KEFU_CONFIG); KEFU_SECTION__KEY variables override it.
    #[arg(long, global = true, env = "KEFU_CONFIG")]
    config: Option<PathBuf>,
    /// HTTP listen address (WebSocket, REST, metrics); overrides server.listen.
    #[arg(long, global = true)]
    listen: Option<SocketAddr>,
    /// Data directory; overrides data.dir.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the node (the default).
    Serve,
    /// Print the effective configuration (defaults + file + env + flags) as TOML.
    PrintConfig,
    /// Manage agents in the data directory (the node must not be running; use the REST API otherwise).
    Agent {
        #[command(subcommand)]
        command: AgentCmd,
    },
}

#[derive(Debug, Subcommand)]
enum AgentCmd {
    /// Register (or update) an agent and print its token.
    Add {
        #[arg(long)]
        id: String,
        #[arg(long)]
        name: String,
        /// Comma-separated skill tags, e.g. billing,zh.
        #[arg(long, default_value = "")]
        skills: String,
        /// Maximum concurrent conversations.
        #[arg(long, default_value_t = 5)]
        capacity: u32,
        /// May manage agents and canned replies over REST.
        #[arg(long)]
        admin: bool,
    },
    /// Mint a new token for an existing agent.
    Token {
        #[arg(long)]
        id: String,
    },
    /// Revoke every token of an agent minted so far.
    Revoke {
        #[arg(long)]
        id: String,
    },
}

fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let mut cfg = Config::load(cli.config.as_deref(), std::env::vars())?;
    if let Some(l) = cli.listen {
        cfg.server.listen = l;
    }
    if let Some(d) = &cli.data_dir {
        cfg.data.dir = d.clone();
    }
    cfg.validate()?;
    Ok(cfg)
}

fn init_tracing(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log.level));
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if cfg.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kefu-node: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let cfg = load_config(&cli)?;
    match cli.command.unwrap_or(Cmd::Serve) {
        Cmd::PrintConfig => {
            print!("{}", cfg.to_toml());
            Ok(())
        }
        Cmd::Agent { command } => agent_command(&cfg, command),
        Cmd::Serve => {
            init_tracing(&cfg);
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("tokio runtime")?;
            rt.block_on(serve(cfg))
        }
    }
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
    let node = kefu_node::start(cfg).await?;
    if let Some(token) = &node.demo_token {
        let base = format!("http://{}", node.http_addr);
        tracing::info!(
            agent = "demo",
            token = %token,
            console = %format!("{base}/agent#token={token}"),
            demo_site = %base,
            "created demo agent (first start); use this token to sign in as the agent"
        );
    }
    wait_for_signal().await;
    node.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

fn agent_command(cfg: &Config, cmd: AgentCmd) -> anyhow::Result<()> {
    let store = Store::open(&cfg.data.dir)?;
    let secret = load_or_create_secret(cfg)?;
    let auth = Auth::new(cfg, &secret);
    let agent = match cmd {
        AgentCmd::Add { id, name, skills, capacity, admin } => {
            let skills: Vec<String> =
                skills.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect();
            let mut agent = NewAgent { id, name, skills, capacity, admin }.validate().map_err(anyhow::Error::msg)?;
            if let Some(existing) = store.agent(&agent.id)? {
                agent.token_epoch = existing.token_epoch;
            }
            store.write_now(vec![Op::Agent { id: agent.id.clone(), json: encode(&agent) }])?;
            eprintln!("agent `{}` saved in {}", agent.id, cfg.data.dir.display());
            agent
        }
        AgentCmd::Token { id } => store.agent(&id)?.with_context(|| format!("no agent `{id}`"))?,
        AgentCmd::Revoke { id } => {
            let mut agent = store.agent(&id)?.with_context(|| format!("no agent `{id}`"))?;
            agent.token_epoch += 1;
            store.write_now(vec![Op::Agent { id: agent.id.clone(), json: encode(&agent) }])?;
            eprintln!("all earlier tokens of `{id}` are revoked; new token:");
            agent
        }
    };
    println!("{}", auth.agent_token(&agent));
    Ok(())
}
