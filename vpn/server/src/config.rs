//! The server's TOML configuration: parsed, then validated into typed values.
//! Errors name the file and the key.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::num::NonZeroU64;

use ipnet::Ipv4Net;
use sallyport_core::message::Token;
use sallyport_middleware::Rate;
use serde::Deserialize;

/// A validated server configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// `[server]`.
    pub server: ServerSection,
    /// `[vpn]`.
    pub vpn: VpnSection,
    /// `[auth]`.
    pub auth: AuthSection,
    /// `[limits]`.
    pub limits: LimitsSection,
    /// `[compression]`.
    pub compression: CompressionSection,
    /// `[pipeline]`.
    pub pipeline: PipelineSection,
    /// `[admin]`.
    pub admin: AdminSection,
    /// `[logging]`.
    pub logging: LoggingSection,
    /// The rate limit of each credential (by index into `credentials`),
    /// resolved from `limits.rate_limit_*` and `[[limits.per_token]]`;
    /// `None`: unlimited.
    pub rate_limits: Vec<Option<Rate>>,
    /// Every accepted token: `auth.tokens` in order, then `auth.clients`.
    pub credentials: Vec<Credential>,
}

/// One accepted token, as the server keeps it: only its SHA-256.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    /// The client's name (`[[auth.clients]] name`): its identity.
    pub name: Option<String>,
    /// SHA-256 of the token.
    pub digest: [u8; 32],
    /// The address reserved for it.
    pub ip: Option<Ipv4Addr>,
}

impl Credential {
    /// An unnamed credential for a plain token.
    pub fn plain(token: &str) -> Self {
        Self {
            name: None,
            digest: sallyport_transports::tls::sha256(token.as_bytes()),
            ip: None,
        }
    }
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("name", &self.name)
            .field("ip", &self.ip)
            .finish_non_exhaustive()
    }
}

/// The `sha256:<hex>` form of a token, for `[auth]` (`sallyport-server
/// --hash-token`).
pub fn hash_token(token: &str) -> String {
    let d = sallyport_transports::tls::sha256(token.as_bytes());
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// The digest a configured token stands for: `sha256:<64 hex>` as given,
/// anything else hashed.
fn token_digest(t: &Token) -> Result<[u8; 32], String> {
    let Some(hex) = t.expose().strip_prefix("sha256:") else {
        return Ok(sallyport_transports::tls::sha256(t.expose().as_bytes()));
    };
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err("a \"sha256:\" token needs exactly 64 hex digits after the prefix".into());
    }
    let mut d = [0u8; 32];
    for (i, b) in d.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
    }
    Ok(d)
}

impl ServerConfig {
    /// The rate limit for sessions of token `index`; `None`: unlimited.
    pub fn rate_limit_for(&self, index: usize) -> Option<Rate> {
        self.rate_limits.get(index).copied().flatten()
    }
}

/// `[server]`: where and how to listen.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// TLS listener for all transports.
    #[serde(default = "default_listen")]
    pub listen_addr: SocketAddr,
    /// PEM certificate chain.
    pub tls_cert: PathBuf,
    /// PEM private key.
    pub tls_key: PathBuf,
    /// Cleartext listener for running behind a TLS-terminating proxy.
    #[serde(default)]
    pub plain_listen_addr: Option<SocketAddr>,
    /// HTTP path of the tunnel.
    #[serde(default = "default_path")]
    pub path: String,
    /// Reverse proxies whose `X-Forwarded-For` names the real client.
    #[serde(default)]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// An HTML file served to GET requests that are not tunnel requests
    /// (default: a plain 404).
    #[serde(default)]
    pub static_page: Option<PathBuf>,
}

/// `[vpn]`: the virtual LAN.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VpnSection {
    /// The tunnel subnet.
    #[serde(default = "default_subnet")]
    pub subnet: Ipv4Net,
    /// The server's own address in it.
    #[serde(default = "default_server_ip")]
    pub server_ip: Ipv4Addr,
    /// MTU of the TUN device and of every client's.
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    /// Name of the TUN device.
    #[serde(default = "default_interface")]
    pub interface_name: String,
    /// How often each side pings; a peer silent for 3 intervals is dropped.
    #[serde(default = "default_keepalive", with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// How long a disconnected anonymous client's address (no name, no
    /// client id) stays reserved for it.
    #[serde(default = "default_grace", with = "humantime_serde")]
    pub lease_grace: Duration,
    /// How long the lease of a client with an identity (a name, or a client
    /// id) outlives its last session, across server restarts.
    #[serde(default = "default_lease_time", with = "humantime_serde")]
    pub lease_time: Duration,
    /// Where leases are kept across restarts (`""`: nowhere).
    #[serde(default = "default_lease_file")]
    pub lease_file: PathBuf,
    /// How often the statistics line is logged (0s: never).
    #[serde(default = "default_stats_interval", with = "humantime_serde")]
    pub stats_interval: Duration,
    /// Segmentation offload: open the TUN with it and accept clients that
    /// offer it, so TCP moves as 64 KiB super-packets (PROTOCOL.md §11).
    /// Needs `limits.max_frame_size` of at least 65539.
    #[serde(default = "yes")]
    pub offload: bool,
}

/// `[auth]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    /// Accepted bearer tokens, plain or `sha256:<hex>`.
    #[serde(default)]
    pub tokens: Vec<Token>,
    /// Named clients, each with its own token and optionally a fixed address.
    #[serde(default)]
    pub clients: Vec<ClientEntry>,
}

/// `[[auth.clients]]`: one named client.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientEntry {
    /// Unique name; the client's identity (its lease is bound to it).
    pub name: String,
    /// Its token, plain or `sha256:<hex>`.
    pub token: Token,
    /// An address reserved for this client alone.
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
}

/// `[limits]`: explicit bounds on what a peer may make the server do.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    /// Largest message (control or packet) accepted from a client, bytes.
    #[serde(default = "default_max_frame")]
    pub max_frame_size: usize,
    /// Time a new connection has to complete TLS, the upgrade and `auth`.
    #[serde(default = "default_auth_timeout", with = "humantime_serde")]
    pub auth_timeout: Duration,
    /// Most connections allowed at once that have not yet authenticated.
    #[serde(default = "default_max_unauthenticated")]
    pub max_unauthenticated: usize,
    /// Of those, most from one source address (0: no per-source limit).
    #[serde(default = "default_max_unauthenticated_per_source")]
    pub max_unauthenticated_per_source: usize,
    /// Packets queued towards one client before further ones are dropped.
    #[serde(default = "default_session_queue")]
    pub session_queue: usize,
    /// Rate limit of every session, each direction separately, in bytes per
    /// second of tunnel traffic (0: unlimited). Over it, packets are dropped.
    #[serde(default)]
    pub rate_limit_bytes_per_sec: u64,
    /// Burst above the rate, bytes (default: a tenth of a second's worth, at
    /// least 64 KiB). Must be at least `vpn.mtu`.
    #[serde(default)]
    pub rate_limit_burst_bytes: Option<u64>,
    /// Overrides of the rate limit for single tokens.
    #[serde(default)]
    pub per_token: Vec<PerTokenLimit>,
    /// Most sessions at once per token (0: unlimited). A client's new
    /// session that replaces its own stale one is always allowed.
    #[serde(default = "default_max_sessions_per_token")]
    pub max_sessions_per_token: usize,
    /// Failed authentications allowed per source address per minute (as a
    /// token bucket with that burst); beyond it, connections from that
    /// address are closed unread (0: no throttle).
    #[serde(default = "default_auth_failures_per_minute")]
    pub auth_failures_per_minute: u32,
    /// Close a session that carried no packet either way for this long
    /// (keepalive pings do not count). Unset: never.
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            max_frame_size: default_max_frame(),
            auth_timeout: default_auth_timeout(),
            max_unauthenticated: default_max_unauthenticated(),
            max_unauthenticated_per_source: default_max_unauthenticated_per_source(),
            session_queue: default_session_queue(),
            rate_limit_bytes_per_sec: 0,
            rate_limit_burst_bytes: None,
            per_token: Vec::new(),
            max_sessions_per_token: default_max_sessions_per_token(),
            auth_failures_per_minute: default_auth_failures_per_minute(),
            idle_timeout: None,
        }
    }
}

/// `[[limits.per_token]]`: the rate limit of the sessions of one token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerTokenLimit {
    /// Which token: its index in `auth.tokens`, from 0.
    pub token_index: usize,
    /// As `limits.rate_limit_bytes_per_sec` (0: unlimited for this token).
    pub rate_limit_bytes_per_sec: u64,
    /// As `limits.rate_limit_burst_bytes`.
    #[serde(default)]
    pub rate_limit_burst_bytes: Option<u64>,
}

/// `[compression]`: lz4 per packet, when a client offers it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressionSection {
    /// Accept a client's offer of lz4. Off by default: compression next to
    /// attacker-chosen data leaks through lengths (VORACLE).
    #[serde(default)]
    pub enabled: bool,
    /// Packets smaller than this are sent as they are, without trying.
    #[serde(default = "default_compression_threshold")]
    pub threshold_bytes: usize,
}

impl Default for CompressionSection {
    fn default() -> Self {
        Self {
            enabled: false,
            threshold_bytes: default_compression_threshold(),
        }
    }
}

/// `[pipeline]`: switches for the per-session packet pipeline.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSection {
    /// Drop packets from a client whose source is not its assigned address.
    #[serde(default = "yes")]
    pub anti_spoof: bool,
    /// Count packets and bytes each way (metrics, status, the stats line).
    #[serde(default = "yes")]
    pub stats: bool,
}

impl Default for PipelineSection {
    fn default() -> Self {
        Self {
            anti_spoof: true,
            stats: true,
        }
    }
}

/// `[admin]`: the metrics and status endpoint (off without `listen_addr`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Where to serve `GET /metrics`, `/status` and `/healthz` (plain HTTP:
    /// keep it on loopback or a management network).
    #[serde(default)]
    pub listen_addr: Option<SocketAddr>,
    /// Also export per-session series (one set per connected client).
    #[serde(default)]
    pub per_session_metrics: bool,
}

/// `[logging]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingSection {
    /// debug, info, warn or error (or a tracing filter directive).
    #[serde(default = "default_level")]
    pub level: String,
}

impl Default for LoggingSection {
    fn default() -> Self {
        Self {
            level: default_level(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: ServerSection,
    vpn: VpnSection,
    auth: AuthSection,
    #[serde(default)]
    limits: LimitsSection,
    #[serde(default)]
    compression: CompressionSection,
    #[serde(default)]
    pipeline: PipelineSection,
    #[serde(default)]
    admin: AdminSection,
    #[serde(default)]
    logging: LoggingSection,
}

fn yes() -> bool {
    true
}
fn default_compression_threshold() -> usize {
    sallyport_middleware::compress::DEFAULT_THRESHOLD
}

/// The rate for `bytes_per_sec` (0: none) with `burst` or its default.
fn rate(bytes_per_sec: u64, burst: Option<u64>, mtu: u16) -> Result<Option<Rate>, String> {
    let Some(per_sec) = NonZeroU64::new(bytes_per_sec) else {
        return Ok(None);
    };
    let burst = burst.unwrap_or((bytes_per_sec / 10).max(64 * 1024));
    if burst < u64::from(mtu) {
        return Err(format!(
            "burst of {burst} bytes is below vpn.mtu ({mtu}): full-size packets could never pass"
        ));
    }
    let burst = NonZeroU64::new(burst).ok_or("burst must be positive")?;
    Ok(Some(Rate::new(per_sec, burst)))
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 443))
}
fn default_path() -> String {
    "/tunnel".into()
}
fn default_subnet() -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(10, 100, 0, 0), 24).unwrap_or_default()
}
fn default_server_ip() -> Ipv4Addr {
    Ipv4Addr::new(10, 100, 0, 1)
}
fn default_mtu() -> u16 {
    1420
}
fn default_interface() -> String {
    "tun0".into()
}
fn default_keepalive() -> Duration {
    Duration::from_secs(15)
}
fn default_grace() -> Duration {
    Duration::from_secs(300)
}
fn default_lease_time() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_lease_file() -> PathBuf {
    PathBuf::from("/var/lib/sallyport/leases.json")
}
fn default_stats_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_max_frame() -> usize {
    sallyport_core::offload::MAX_ENVELOPE
}
fn default_auth_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_unauthenticated() -> usize {
    1024
}
fn default_max_unauthenticated_per_source() -> usize {
    128
}
fn default_max_sessions_per_token() -> usize {
    256
}
fn default_auth_failures_per_minute() -> u32 {
    30
}
fn default_session_queue() -> usize {
    1024
}
fn default_level() -> String {
    "info".into()
}

/// Validates `[auth]` into credentials: `tokens`, then `clients`.
fn credentials(
    auth: &AuthSection,
    vpn: &VpnSection,
) -> Result<Vec<Credential>, (&'static str, String)> {
    if auth.tokens.is_empty() && auth.clients.is_empty() {
        return Err((
            "auth.tokens",
            "at least one token (auth.tokens or [[auth.clients]]) is needed".into(),
        ));
    }
    let mut out: Vec<Credential> = Vec::new();
    for (i, t) in auth.tokens.iter().enumerate() {
        if t.expose().is_empty() {
            return Err(("auth.tokens", "tokens must not be empty".into()));
        }
        let digest = token_digest(t).map_err(|r| ("auth.tokens", format!("token {i}: {r}")))?;
        if out.iter().any(|c| c.digest == digest) {
            return Err(("auth.tokens", format!("token {i} is given twice")));
        }
        out.push(Credential {
            name: None,
            digest,
            ip: None,
        });
    }
    let net = vpn.subnet.trunc();
    for c in &auth.clients {
        let name = &c.name;
        if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err((
                "auth.clients.name",
                format!("{name:?}: 1 to 64 printable characters, no spaces"),
            ));
        }
        if out.iter().any(|o| o.name.as_ref() == Some(name)) {
            return Err(("auth.clients.name", format!("{name:?} is given twice")));
        }
        if c.token.expose().is_empty() {
            return Err(("auth.clients.token", format!("{name}: must not be empty")));
        }
        let digest =
            token_digest(&c.token).map_err(|r| ("auth.clients.token", format!("{name}: {r}")))?;
        if out.iter().any(|o| o.digest == digest) {
            return Err((
                "auth.clients.token",
                format!("{name}: the same token is already given (tokens identify clients)"),
            ));
        }
        if let Some(ip) = c.ip {
            if !net.contains(&ip) || ip == net.network() || ip == net.broadcast() {
                return Err((
                    "auth.clients.ip",
                    format!("{name}: {ip} is not an assignable address of vpn.subnet {net}"),
                ));
            }
            if ip == vpn.server_ip {
                return Err(("auth.clients.ip", format!("{name}: {ip} is vpn.server_ip")));
            }
            if let Some(other) = out.iter().find(|o| o.ip == Some(ip)) {
                return Err((
                    "auth.clients.ip",
                    format!(
                        "{name}: {ip} is already reserved for {}",
                        other.name.as_deref().unwrap_or("another client")
                    ),
                ));
            }
        }
        out.push(Credential {
            name: Some(name.clone()),
            digest,
            ip: c.ip,
        });
    }
    Ok(out)
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Not valid TOML, an unknown key, or a value of the wrong type.
    #[error("config {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Cause (names the key and line).
        #[source]
        source: toml::de::Error,
    },
    /// A value that parses but cannot work.
    #[error("config {path}: key `{key}`: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Dotted key, e.g. `vpn.server_ip`.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
}

impl ServerConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::from_toml_str(&text, path)
    }

    /// Parses and validates TOML; `origin` is used in error messages.
    pub fn from_toml_str(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: origin.into(),
            source,
        })?;
        let invalid = |key: &'static str, reason: String| ConfigError::Invalid {
            path: origin.into(),
            key,
            reason,
        };
        let vpn = &raw.vpn;
        let net = vpn.subnet.trunc();
        if vpn.subnet != net {
            return Err(invalid(
                "vpn.subnet",
                format!("{} has host bits set; did you mean {net}?", vpn.subnet),
            ));
        }
        if net.prefix_len() > 30 {
            return Err(invalid(
                "vpn.subnet",
                format!("{net} is too small: a /30 or larger is needed"),
            ));
        }
        if !net.contains(&vpn.server_ip) {
            return Err(invalid(
                "vpn.server_ip",
                format!("{} is not inside vpn.subnet {net}", vpn.server_ip),
            ));
        }
        if vpn.server_ip == net.network() || vpn.server_ip == net.broadcast() {
            return Err(invalid(
                "vpn.server_ip",
                format!(
                    "{} is the network or broadcast address of {net}",
                    vpn.server_ip
                ),
            ));
        }
        if !(576..=65_535).contains(&vpn.mtu) {
            return Err(invalid(
                "vpn.mtu",
                format!("{} is outside 576..=65535", vpn.mtu),
            ));
        }
        if vpn.interface_name.is_empty() || vpn.interface_name.len() > 15 {
            return Err(invalid(
                "vpn.interface_name",
                "must be 1 to 15 characters".into(),
            ));
        }
        if vpn.keepalive_interval < Duration::from_millis(100) {
            return Err(invalid(
                "vpn.keepalive_interval",
                "must be at least 100ms".into(),
            ));
        }
        if !raw.server.path.starts_with('/') {
            return Err(invalid("server.path", "must start with '/'".into()));
        }
        if let Some(page) = &raw.server.static_page {
            if !page.is_file() {
                return Err(invalid(
                    "server.static_page",
                    format!("{} does not exist or is not a file", page.display()),
                ));
            }
        }
        let credentials = credentials(&raw.auth, vpn).map_err(|(k, r)| invalid(k, r))?;
        let min_frame = usize::from(vpn.mtu);
        if raw.limits.max_frame_size < min_frame {
            return Err(invalid(
                "limits.max_frame_size",
                format!("must be at least vpn.mtu ({min_frame})"),
            ));
        }
        if raw.limits.max_unauthenticated == 0 || raw.limits.session_queue == 0 {
            return Err(invalid(
                "limits",
                "max_unauthenticated and session_queue must be positive".into(),
            ));
        }
        if raw.limits.idle_timeout.is_some_and(|d| d.is_zero()) {
            return Err(invalid(
                "limits.idle_timeout",
                "must be positive; leave it out to never close idle sessions".into(),
            ));
        }
        let l = &raw.limits;
        let default_rate = rate(
            l.rate_limit_bytes_per_sec,
            l.rate_limit_burst_bytes,
            vpn.mtu,
        )
        .map_err(|r| invalid("limits.rate_limit_burst_bytes", r))?;
        let mut rate_limits = vec![default_rate; credentials.len()];
        let mut seen = vec![false; raw.auth.tokens.len()];
        for o in &l.per_token {
            let n = raw.auth.tokens.len();
            let Some(slot) = rate_limits.get_mut(o.token_index) else {
                return Err(invalid(
                    "limits.per_token.token_index",
                    format!(
                        "{} is not an index into auth.tokens (0..{n})",
                        o.token_index
                    ),
                ));
            };
            if std::mem::replace(&mut seen[o.token_index], true) {
                return Err(invalid(
                    "limits.per_token.token_index",
                    format!("token {} has more than one override", o.token_index),
                ));
            }
            *slot = rate(
                o.rate_limit_bytes_per_sec,
                o.rate_limit_burst_bytes,
                vpn.mtu,
            )
            .map_err(|r| invalid("limits.per_token.rate_limit_burst_bytes", r))?;
        }
        if raw.compression.threshold_bytes > usize::from(u16::MAX) {
            return Err(invalid(
                "compression.threshold_bytes",
                "must be at most 65535".into(),
            ));
        }
        Ok(Self {
            server: raw.server,
            vpn: raw.vpn,
            auth: raw.auth,
            limits: raw.limits,
            compression: raw.compression,
            pipeline: raw.pipeline,
            admin: raw.admin,
            logging: raw.logging,
            rate_limits,
            credentials,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[server]
tls_cert = "/etc/sallyport/server.crt"
tls_key = "/etc/sallyport/server.key"
[vpn]
[auth]
tokens = ["secret-token-1"]
"#;

    fn parse(s: &str) -> Result<ServerConfig, ConfigError> {
        ServerConfig::from_toml_str(s, Path::new("server.toml"))
    }

    #[test]
    fn minimal_config_takes_the_documented_defaults() {
        let c = parse(MINIMAL).expect("valid");
        assert_eq!(c.server.listen_addr, "0.0.0.0:443".parse().expect("addr"));
        assert_eq!(c.server.path, "/tunnel");
        assert_eq!(c.vpn.subnet.to_string(), "10.100.0.0/24");
        assert_eq!(c.vpn.server_ip, Ipv4Addr::new(10, 100, 0, 1));
        assert_eq!(c.vpn.mtu, 1420);
        assert_eq!(c.vpn.interface_name, "tun0");
        assert_eq!(c.vpn.lease_grace, Duration::from_secs(300));
        assert_eq!(c.vpn.keepalive_interval, Duration::from_secs(15));
        assert_eq!(c.limits.auth_timeout, Duration::from_secs(10));
        assert_eq!(c.logging.level, "info");
    }

    #[test]
    fn the_design_example_parses() {
        let text = r#"
[server]
listen_addr = "0.0.0.0:443"
tls_cert = "/etc/sallyport/server.crt"
tls_key  = "/etc/sallyport/server.key"
plain_listen_addr = "127.0.0.1:8080"
path = "/tunnel"
[vpn]
subnet = "10.100.0.0/24"
server_ip = "10.100.0.1"
mtu = 1420
interface_name = "tun0"
[auth]
tokens = ["secret-token-1", "secret-token-2"]
[logging]
level = "info"
"#;
        let c = parse(text).expect("valid");
        assert_eq!(c.auth.tokens.len(), 2);
        assert_eq!(
            c.server.plain_listen_addr,
            Some("127.0.0.1:8080".parse().expect("a"))
        );
    }

    fn err(s: &str) -> String {
        parse(s).expect_err("invalid").to_string()
    }

    #[test]
    fn server_ip_outside_subnet_names_the_key_and_file() {
        let e = err(&MINIMAL.replace("[vpn]", "[vpn]\nserver_ip = \"10.9.0.1\""));
        assert!(
            e.contains("server.toml") && e.contains("vpn.server_ip"),
            "{e}"
        );
    }

    #[test]
    fn server_ip_on_network_or_broadcast_is_refused() {
        for ip in ["10.100.0.0", "10.100.0.255"] {
            let e = err(&MINIMAL.replace("[vpn]", &format!("[vpn]\nserver_ip = \"{ip}\"")));
            assert!(e.contains("network or broadcast"), "{e}");
        }
    }

    #[test]
    fn subnet_with_host_bits_or_too_small_is_refused() {
        let e = err(&MINIMAL.replace("[vpn]", "[vpn]\nsubnet = \"10.100.0.1/24\""));
        assert!(e.contains("vpn.subnet") && e.contains("host bits"), "{e}");
        let e = err(&MINIMAL.replace(
            "[vpn]",
            "[vpn]\nsubnet = \"10.100.0.0/31\"\nserver_ip = \"10.100.0.1\"",
        ));
        assert!(e.contains("too small"), "{e}");
    }

    #[test]
    fn garbage_subnet_is_a_parse_error_naming_the_key() {
        let e = err(&MINIMAL.replace("[vpn]", "[vpn]\nsubnet = \"banana\""));
        assert!(e.contains("subnet"), "{e}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = err(&MINIMAL.replace("[vpn]", "[vpn]\nsubnett = \"10.0.0.0/24\""));
        assert!(e.contains("subnett"), "{e}");
    }

    #[test]
    fn empty_token_list_is_refused() {
        let e = err(&MINIMAL.replace("tokens = [\"secret-token-1\"]", "tokens = []"));
        assert!(e.contains("auth.tokens"), "{e}");
    }

    #[test]
    fn missing_certificate_key_is_named() {
        let e = err(&MINIMAL.replace("tls_key = \"/etc/sallyport/server.key\"", ""));
        assert!(e.contains("tls_key"), "{e}");
    }

    #[test]
    fn durations_are_human_readable() {
        let c = parse(&MINIMAL.replace(
            "[vpn]",
            "[vpn]\nlease_grace = \"2m\"\nkeepalive_interval = \"500ms\"",
        ))
        .expect("valid");
        assert_eq!(c.vpn.lease_grace, Duration::from_secs(120));
        assert_eq!(c.vpn.keepalive_interval, Duration::from_millis(500));
    }

    #[test]
    fn pipeline_defaults_are_safe() {
        let c = parse(MINIMAL).expect("valid");
        assert!(!c.compression.enabled, "compression is off by default");
        assert_eq!(c.compression.threshold_bytes, 128);
        assert!(c.pipeline.anti_spoof && c.pipeline.stats);
        assert_eq!(c.admin.listen_addr, None, "no admin endpoint by default");
        assert!(!c.admin.per_session_metrics);
        assert_eq!(c.rate_limit_for(0), None, "unlimited by default");
    }

    #[test]
    fn rate_limits_resolve_per_token_with_a_default_burst() {
        let c = parse(&MINIMAL.replace(
            "tokens = [\"secret-token-1\"]",
            "tokens = [\"a\", \"b\", \"c\"]\n\
             [limits]\nrate_limit_bytes_per_sec = 1000000\n\
             [[limits.per_token]]\ntoken_index = 1\nrate_limit_bytes_per_sec = 0\n\
             [[limits.per_token]]\ntoken_index = 2\nrate_limit_bytes_per_sec = 2500000\nrate_limit_burst_bytes = 30000\n\
             [admin]\nlisten_addr = \"127.0.0.1:9100\"\nper_session_metrics = true",
        ))
        .expect("valid");
        let r0 = c.rate_limit_for(0).expect("default applies");
        assert_eq!((r0.bytes_per_sec(), r0.burst_bytes()), (1_000_000, 100_000));
        assert_eq!(c.rate_limit_for(1), None, "override to unlimited");
        let r2 = c.rate_limit_for(2).expect("override");
        assert_eq!((r2.bytes_per_sec(), r2.burst_bytes()), (2_500_000, 30_000));
        assert_eq!(
            c.admin.listen_addr,
            Some("127.0.0.1:9100".parse().expect("addr"))
        );
    }

    #[test]
    fn a_per_token_override_for_a_missing_token_is_refused() {
        let e = err(&format!(
            "{MINIMAL}[limits]\n[[limits.per_token]]\ntoken_index = 1\nrate_limit_bytes_per_sec = 10"
        ));
        assert!(
            e.contains("server.toml") && e.contains("limits.per_token.token_index"),
            "{e}"
        );
    }

    #[test]
    fn a_burst_below_the_mtu_is_refused() {
        let e = err(&format!(
            "{MINIMAL}[limits]\nrate_limit_bytes_per_sec = 100000\nrate_limit_burst_bytes = 1000"
        ));
        assert!(e.contains("limits.rate_limit_burst_bytes"), "{e}");
    }

    #[test]
    fn unknown_keys_in_new_sections_are_refused() {
        for (section, key) in [
            ("compression", "enable"),
            ("pipeline", "antispoof"),
            ("admin", "listen"),
        ] {
            let e = err(&format!("{MINIMAL}[{section}]\n{key} = true"));
            assert!(e.contains(key) && e.contains("server.toml"), "{e}");
        }
    }

    #[test]
    fn connection_limits_have_safe_defaults_and_parse() {
        let c = parse(MINIMAL).expect("minimal");
        assert_eq!(c.limits.max_sessions_per_token, 256);
        assert_eq!(c.limits.auth_failures_per_minute, 30);
        assert_eq!(c.limits.max_unauthenticated_per_source, 128);
        assert_eq!(c.limits.idle_timeout, None);
        let c = parse(&format!(
            "{MINIMAL}\n[limits]\nmax_sessions_per_token = 0\nauth_failures_per_minute = 5\nidle_timeout = \"10m\"\n"
        ))
        .expect("limits");
        assert_eq!(c.limits.max_sessions_per_token, 0);
        assert_eq!(c.limits.auth_failures_per_minute, 5);
        assert_eq!(c.limits.idle_timeout, Some(Duration::from_secs(600)));
        let e = err(&format!("{MINIMAL}\n[limits]\nidle_timeout = \"0s\"\n"));
        assert!(e.contains("limits.idle_timeout"), "{e}");
    }

    #[test]
    fn tokens_are_redacted_in_debug() {
        let c = parse(MINIMAL).expect("valid");
        assert!(!format!("{c:?}").contains("secret-token-1"));
    }

    fn with_auth(auth: &str) -> String {
        MINIMAL.replace("tokens = [\"secret-token-1\"]", auth)
    }

    #[test]
    fn hashed_plain_and_named_tokens_resolve_to_digests_in_order() {
        let hashed = hash_token("bob-secret");
        assert_eq!(hashed.len(), "sha256:".len() + 64);
        let c = parse(&with_auth(&format!(
            "tokens = [\"plain\", \"{}\"]\n\
             [[auth.clients]]\nname = \"alice\"\ntoken = \"{hashed}\"\nip = \"10.100.0.50\"\n\
             [[auth.clients]]\nname = \"carol\"\ntoken = \"carol-plain\"",
            hash_token("other")
                .to_uppercase()
                .replace("SHA256:", "sha256:")
        )))
        .expect("valid");
        let d = |t: &str| sallyport_transports::tls::sha256(t.as_bytes());
        let got: Vec<_> = c
            .credentials
            .iter()
            .map(|c| (c.name.as_deref(), c.digest, c.ip))
            .collect();
        assert_eq!(
            got,
            vec![
                (None, d("plain"), None),
                (None, d("other"), None),
                (
                    Some("alice"),
                    d("bob-secret"),
                    Some(Ipv4Addr::new(10, 100, 0, 50))
                ),
                (Some("carol"), d("carol-plain"), None),
            ]
        );
        assert_eq!(c.rate_limits.len(), 4);
        let dbg = format!("{c:?}");
        assert!(
            !dbg.contains("carol-plain") && !dbg.contains("plain\""),
            "{dbg}"
        );
    }

    #[test]
    fn named_clients_alone_are_enough() {
        let c = parse(&with_auth("[[auth.clients]]\nname = \"a\"\ntoken = \"t\"")).expect("valid");
        assert_eq!(c.credentials.len(), 1);
        assert_eq!(c.vpn.lease_time, Duration::from_secs(86_400));
        assert_eq!(
            c.vpn.lease_file,
            Path::new("/var/lib/sallyport/leases.json")
        );
    }

    #[test]
    fn bad_auth_entries_name_the_key() {
        let client = |name: &str, token: &str, ip: &str| {
            format!("[[auth.clients]]\nname = \"{name}\"\ntoken = \"{token}\"\n{ip}\n")
        };
        let cases = [
            ("tokens = [\"sha256:abc\"]".to_string(), "auth.tokens"),
            ("tokens = [\"a\", \"a\"]".to_string(), "auth.tokens"),
            ("tokens = []".to_string(), "auth.tokens"),
            (
                format!("tokens = [\"a\"]\n{}", client("x", &hash_token("a"), "")),
                "auth.clients.token",
            ),
            (
                format!("{}{}", client("x", "1", ""), client("x", "2", "")),
                "auth.clients.name",
            ),
            (client("has space", "1", ""), "auth.clients.name"),
            (client("x", "1", "ip = \"10.9.0.5\""), "auth.clients.ip"),
            (client("x", "1", "ip = \"10.100.0.1\""), "auth.clients.ip"),
            (client("x", "1", "ip = \"10.100.0.255\""), "auth.clients.ip"),
            (
                format!(
                    "{}{}",
                    client("x", "1", "ip = \"10.100.0.9\""),
                    client("y", "2", "ip = \"10.100.0.9\"")
                ),
                "auth.clients.ip",
            ),
        ];
        for (auth, key) in cases {
            let e = err(&with_auth(&auth));
            assert!(e.contains(key) && e.contains("server.toml"), "{auth}: {e}");
        }
    }
}
