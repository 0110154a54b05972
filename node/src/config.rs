//! Typed node configuration: file (TOML) → environment (`KEFU_SECTION__KEY`) → command-line flags,
//! validated before anything starts. Unknown keys are refused with the offending field named.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Everything a node needs to start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Name of this node in logs, metrics and `welcome` frames.
    pub node_id: String,
    pub server: ServerConfig,
    pub data: DataConfig,
    pub limits: LimitsConfig,
    pub auth: AuthConfig,
    pub identity: IdentityConfig,
    pub routing: RoutingConfig,
    pub filter: FilterConfig,
    pub typing: TypingConfig,
    pub demo: DemoConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// HTTP listener: WebSocket endpoints, REST API, health and metrics.
    pub listen: SocketAddr,
    /// Raw TCP adapter (newline-delimited JSON frames); empty string disables it.
    pub tcp_listen: String,
    /// Browser origins allowed to open WebSockets, e.g. `https://shop.example.com`. An Origin equal to the
    /// node's own host is always allowed; `*` allows every origin (not recommended).
    pub allowed_origins: Vec<String>,
    /// Seconds to wait for connections to close during graceful shutdown.
    pub shutdown_grace_secs: u64,
    /// Interval between server pings on idle connections.
    pub ping_interval_secs: u64,
    /// A connection silent for this long (no frame, no pong) is closed.
    pub idle_timeout_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Directory for the embedded store, the offline inbox and the signing secret.
    pub dir: PathBuf,
    /// Under load, start a group commit (one `fdatasync` of the write-ahead log) at most this often, in
    /// microseconds; an isolated write is committed at once. 0: commit as soon as the previous one ends.
    pub commit_interval_us: u64,
    /// How long the write-ahead log may run ahead of the redb index, in milliseconds: each interval's writes
    /// are applied to redb during the next one, in parts of about a second (bounds start-up replay to about
    /// two intervals; longer intervals rewrite fewer B-tree pages per entry).
    pub index_interval_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest client frame accepted, in bytes; larger ones get `frame_too_large`.
    pub max_frame_bytes: usize,
    /// Longest message text, in characters.
    pub max_text_chars: usize,
    /// Sustained client frames per second per connection.
    pub frames_per_sec: u32,
    /// Burst allowance above the sustained rate.
    pub burst: u32,
    /// Frames queued for one connection before it is closed as a slow consumer.
    pub outbound_queue: usize,
    /// Seconds a new connection has to send `hello`.
    pub hello_timeout_secs: u64,
    /// Most entries replayed on resume; a larger gap gets `reload`.
    pub replay_limit: usize,
    /// Connections this node accepts before refusing new ones.
    pub max_connections: usize,
    /// Write buffer of the WebSocket codec, in bytes: queued frames are gathered up to this size per socket
    /// write. Grows only on connections that receive bursts.
    pub ws_buffer_bytes: usize,
    /// Read buffer of the WebSocket codec, in bytes. Every connection holds one, idle or not, so small keeps
    /// idle connections cheap; larger frames are read in several steps.
    pub ws_read_buffer_bytes: usize,
    /// Kernel send buffer (SO_SNDBUF) of each client socket, bytes; 0 leaves it to the kernel's autotuning
    /// (on loopback that grows to megabytes). Bounds what a stalled client can pin in kernel memory and how
    /// soon it is found out as a slow consumer.
    pub socket_send_buffer_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// HMAC secret for agent and visitor tokens. Empty: generated once and kept in `<data.dir>/secret.key`.
    pub secret: String,
    /// Lifetime of minted agent tokens, in seconds.
    pub agent_token_ttl_secs: u64,
    /// Lifetime of visitor tokens, in seconds.
    pub visitor_token_ttl_secs: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// Site secret for `identity_hash = hex(HMAC-SHA256(secret, user_id))`. Empty disables verification.
    pub secret: String,
    /// Refuse visitors without a valid identity hash.
    pub enforce: bool,
}

/// Routing strategy for queued conversations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    SkillsRing,
    RoundRobin,
    LeastLoaded,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    pub strategy: Strategy,
    /// skills-ring: an agent at or above this fraction of capacity is skipped for the fallback pool.
    pub load_threshold: f64,
    /// Seconds an agent has to accept an offer before it is re-offered.
    pub offer_timeout_secs: u64,
    /// Assign without waiting for the agent to accept.
    pub auto_accept: bool,
    /// Virtual nodes per agent on the skills ring.
    pub virtual_nodes: u32,
}

/// What the sensitive-word filter does with a match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FilterMode {
    Mask,
    Reject,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilterConfig {
    /// Words or phrases (case-insensitive).
    pub words: Vec<String>,
    /// Optional file with one word per line.
    pub words_file: Option<PathBuf>,
    pub mode: FilterMode,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TypingConfig {
    /// Minimum interval between forwarded typing frames per conversation (500 = at most 2/s).
    pub interval_ms: u64,
    /// Clients clear a typing indicator not refreshed within this time.
    pub ttl_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DemoConfig {
    /// Create a demo agent (admin) on first start and log its token.
    pub enabled: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: String,
    /// A tracing filter, e.g. `info` or `kefu_node=debug`.
    pub level: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: "kefu-0".into(),
            server: ServerConfig::default(),
            data: DataConfig::default(),
            limits: LimitsConfig::default(),
            auth: AuthConfig::default(),
            identity: IdentityConfig::default(),
            routing: RoutingConfig::default(),
            filter: FilterConfig::default(),
            typing: TypingConfig::default(),
            demo: DemoConfig { enabled: true },
            log: LogConfig::default(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            tcp_listen: "127.0.0.1:8081".into(),
            allowed_origins: Vec::new(),
            shutdown_grace_secs: 10,
            ping_interval_secs: 25,
            idle_timeout_secs: 75,
        }
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig { dir: PathBuf::from("./data"), commit_interval_us: 1000, index_interval_ms: 10_000 }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_frame_bytes: 16 * 1024,
            max_text_chars: 4000,
            frames_per_sec: 20,
            burst: 40,
            outbound_queue: 256,
            hello_timeout_secs: 10,
            replay_limit: 1000,
            max_connections: 19_000,
            ws_buffer_bytes: 4096,
            ws_read_buffer_bytes: 1024,
            socket_send_buffer_bytes: 64 * 1024,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            secret: String::new(),
            agent_token_ttl_secs: 30 * 24 * 3600,
            visitor_token_ttl_secs: 365 * 24 * 3600,
        }
    }
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            strategy: Strategy::SkillsRing,
            load_threshold: 0.8,
            offer_timeout_secs: 30,
            auto_accept: false,
            virtual_nodes: 64,
        }
    }
}

impl Default for FilterConfig {
    fn default() -> Self {
        FilterConfig { words: Vec::new(), words_file: None, mode: FilterMode::Mask }
    }
}

impl Default for TypingConfig {
    fn default() -> Self {
        TypingConfig { interval_ms: 500, ttl_ms: 5000 }
    }
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig { enabled: true }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: "text".into(), level: "info".into() }
    }
}

/// Prefix of environment overrides: `KEFU_ROUTING__STRATEGY=round-robin` sets `routing.strategy`.
pub const ENV_PREFIX: &str = "KEFU_";

impl Config {
    /// Load from an optional TOML file, then apply `KEFU_*` environment overrides, then validate.
    pub fn load(file: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Config> {
        let mut doc = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| Error::Config(format!("cannot read config file {}: {e}", path.display())))?;
                text.parse::<toml::Table>()
                    .map_err(|e| Error::Config(format!("{}: {}", path.display(), e.message())))?
            }
            None => toml::Table::new(),
        };
        for (key, value) in env {
            let Some(rest) = key.strip_prefix(ENV_PREFIX) else { continue };
            // Only `KEFU_SECTION__KEY` (and the top-level `KEFU_NODE_ID`) are config: other KEFU_* names, such
            // as the KEFU_SERVICE_HOST/KEFU_PORT that Kubernetes injects for a Service named `kefu`, or
            // KEFU_CONFIG (the file path, read by the CLI), are not ours to refuse.
            if !rest.contains("__") && rest != "NODE_ID" {
                continue;
            }
            let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
            set_path(&mut doc, &path, parse_env_value(&value))
                .map_err(|m| Error::Config(format!("environment variable {key}: {m}")))?;
        }
        let cfg: Config = serde_path_to_error::deserialize(toml::Value::Table(doc)).map_err(|e| {
            let path = e.path().to_string();
            Error::Config(format!("field `{path}`: {}", e.into_inner()))
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// A config for tests: ephemeral ports on 127.0.0.1, the given data dir, quick timeouts.
    pub fn for_test(data_dir: &Path) -> Config {
        let mut c = Config { node_id: "test-node".into(), ..Config::default() };
        c.server.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        c.server.tcp_listen = "127.0.0.1:0".into();
        c.server.shutdown_grace_secs = 2;
        c.data.dir = data_dir.to_path_buf();
        c.demo.enabled = false;
        c.auth.secret = "test-secret-test-secret-test-secret".into();
        c
    }

    /// Check values that parse but make no sense, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, why: &str| Err(Error::Config(format!("field `{field}`: {why}")));
        if self.node_id.is_empty() || self.node_id.len() > 64 {
            return bad("node_id", "must be 1..=64 characters");
        }
        if !self.server.tcp_listen.is_empty() && self.server.tcp_listen.parse::<SocketAddr>().is_err() {
            return bad("server.tcp_listen", "must be an address like 127.0.0.1:8081, or empty to disable");
        }
        for o in &self.server.allowed_origins {
            if o != "*" && !(o.starts_with("http://") || o.starts_with("https://")) {
                return bad("server.allowed_origins", "each entry must be `*` or start with http:// or https://");
            }
        }
        if self.server.ping_interval_secs == 0 || self.server.idle_timeout_secs <= self.server.ping_interval_secs {
            return bad("server.idle_timeout_secs", "must be greater than server.ping_interval_secs (> 0)");
        }
        if self.data.dir.as_os_str().is_empty() {
            return bad("data.dir", "must not be empty");
        }
        if self.data.commit_interval_us > 100_000 {
            return bad("data.commit_interval_us", "must be at most 100000 (0.1 s)");
        }
        if !(10..=60_000).contains(&self.data.index_interval_ms) {
            return bad("data.index_interval_ms", "must be between 10 and 60000");
        }
        let l = &self.limits;
        if !(256..=1024 * 1024).contains(&l.max_frame_bytes) {
            return bad("limits.max_frame_bytes", "must be between 256 and 1048576");
        }
        if l.max_text_chars == 0 || l.max_text_chars > l.max_frame_bytes {
            return bad("limits.max_text_chars", "must be between 1 and limits.max_frame_bytes");
        }
        if l.frames_per_sec == 0 {
            return bad("limits.frames_per_sec", "must be at least 1");
        }
        if l.burst < l.frames_per_sec {
            return bad("limits.burst", "must be at least limits.frames_per_sec");
        }
        if !(8..=65536).contains(&l.outbound_queue) {
            return bad("limits.outbound_queue", "must be between 8 and 65536");
        }
        if l.hello_timeout_secs == 0 {
            return bad("limits.hello_timeout_secs", "must be at least 1");
        }
        if l.replay_limit == 0 {
            return bad("limits.replay_limit", "must be at least 1");
        }
        if l.max_connections == 0 {
            return bad("limits.max_connections", "must be at least 1");
        }
        if !(512..=1024 * 1024).contains(&l.ws_buffer_bytes) {
            return bad("limits.ws_buffer_bytes", "must be between 512 and 1048576");
        }
        if !(256..=1024 * 1024).contains(&l.ws_read_buffer_bytes) {
            return bad("limits.ws_read_buffer_bytes", "must be between 256 and 1048576");
        }
        if l.socket_send_buffer_bytes != 0 && !(4096..=16 * 1024 * 1024).contains(&l.socket_send_buffer_bytes) {
            return bad(
                "limits.socket_send_buffer_bytes",
                "must be 0 (kernel autotuning) or between 4096 and 16777216",
            );
        }
        if !self.auth.secret.is_empty() && self.auth.secret.len() < 16 {
            return bad("auth.secret", "must be at least 16 bytes (or empty to generate one)");
        }
        if self.auth.agent_token_ttl_secs == 0 || self.auth.visitor_token_ttl_secs == 0 {
            return bad("auth.agent_token_ttl_secs", "token lifetimes must be at least 1 second");
        }
        if self.identity.enforce && self.identity.secret.is_empty() {
            return bad("identity.enforce", "requires identity.secret");
        }
        let r = &self.routing;
        if !(r.load_threshold > 0.0 && r.load_threshold <= 1.0) {
            return bad("routing.load_threshold", "must be in (0, 1]");
        }
        if r.offer_timeout_secs == 0 {
            return bad("routing.offer_timeout_secs", "must be at least 1");
        }
        if !(1..=1024).contains(&r.virtual_nodes) {
            return bad("routing.virtual_nodes", "must be between 1 and 1024");
        }
        if self.filter.words.iter().any(|w| w.trim().is_empty()) {
            return bad("filter.words", "entries must not be empty");
        }
        if self.typing.interval_ms == 0 || self.typing.ttl_ms < self.typing.interval_ms {
            return bad("typing.ttl_ms", "must be at least typing.interval_ms (> 0)");
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return bad("log.format", "must be `text` or `json`");
        }
        Ok(())
    }

    /// The effective configuration as TOML, with secrets redacted (it is printed and logged).
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        for secret in [&mut shown.auth.secret, &mut shown.identity.secret] {
            if !secret.is_empty() {
                *secret = "<redacted>".into();
            }
        }
        toml::to_string_pretty(&shown).unwrap_or_default()
    }

    /// The sensitive words from `filter.words` and `filter.words_file`.
    pub fn filter_words(&self) -> Result<Vec<String>> {
        let mut words: BTreeSet<String> = self.filter.words.iter().map(|w| w.trim().to_owned()).collect();
        if let Some(path) = &self.filter.words_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                Error::Config(format!("field `filter.words_file`: cannot read {}: {e}", path.display()))
            })?;
            words.extend(
                text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_owned),
            );
        }
        Ok(words.into_iter().collect())
    }
}

fn parse_env_value(raw: &str) -> toml::Value {
    // Numbers, booleans and arrays parse as TOML; anything else is a plain string.
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.to_owned())),
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}

fn set_path(doc: &mut toml::Table, path: &[String], value: toml::Value) -> std::result::Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty key")?;
    let mut table = doc;
    for p in parents {
        let entry = table.entry(p.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry.as_table_mut().ok_or_else(|| format!("`{p}` is not a section"))?;
    }
    table.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str, env: &[(&str, &str)]) -> Result<Config> {
        let dir = std::env::temp_dir().join(format!("kefu-cfg-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.toml");
        std::fs::write(&f, text).unwrap();
        let r = Config::load(Some(&f), env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let _ = std::fs::remove_dir_all(&dir);
        r
    }

    #[test]
    fn defaults_are_valid_and_round_trip_through_toml() {
        let c = Config::default();
        c.validate().unwrap();
        let back: Config = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn printed_config_never_shows_secrets() {
        let mut c = Config::default();
        c.auth.secret = "super-secret-signing-key".into();
        c.identity.secret = "site-hmac-secret".into();
        let text = c.to_toml();
        assert!(!text.contains("super-secret") && !text.contains("site-hmac"), "{text}");
        assert!(text.contains("<redacted>"));
    }

    #[test]
    fn unknown_key_is_refused_with_its_path() {
        let err = load_str("[routing]\nstrategee = 'x'\n", &[]).unwrap_err().to_string();
        assert!(err.contains("routing") && err.contains("strategee"), "{err}");
    }

    #[test]
    fn invalid_value_names_the_field() {
        let err = load_str("[routing]\nstrategy = 'random'\n", &[]).unwrap_err().to_string();
        assert!(err.contains("routing.strategy"), "{err}");
        let err = load_str("[limits]\nmax_frame_bytes = 10\n", &[]).unwrap_err().to_string();
        assert!(err.contains("limits.max_frame_bytes"), "{err}");
    }

    #[test]
    fn env_overrides_file() {
        let c = load_str(
            "[routing]\nstrategy = 'round-robin'\n",
            &[("KEFU_ROUTING__STRATEGY", "least-loaded"), ("KEFU_LIMITS__BURST", "99"), ("OTHER", "x")],
        )
        .unwrap();
        assert_eq!(c.routing.strategy, Strategy::LeastLoaded);
        assert_eq!(c.limits.burst, 99);
    }

    #[test]
    fn unknown_env_key_is_refused_but_foreign_kefu_vars_are_ignored() {
        let err = load_str("", &[("KEFU_NOPE__X", "1")]).unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
        let err = load_str("", &[("KEFU_ROUTING__NOPE", "1")]).unwrap_err().to_string();
        assert!(err.contains("routing.nope"), "{err}");
        let c = load_str("", &[("KEFU_SERVICE_HOST", "10.0.0.1"), ("KEFU_PORT", "tcp://x"), ("KEFU_NODE_ID", "n7")])
            .unwrap();
        assert_eq!(c.node_id, "n7");
    }
}
