//! The client's TOML configuration, parsed then validated. Errors name the
//! file and the key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sallyport_core::message::Token;
use serde::Deserialize;

/// A validated client configuration.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `[server]`.
    pub server: ServerSection,
    /// `[transport]`.
    pub transport: TransportSection,
    /// `[auth]`.
    pub auth: AuthSection,
    /// `[vpn]`.
    pub vpn: VpnSection,
    /// `[reconnect]`.
    pub reconnect: ReconnectSection,
    /// `[pipeline]`.
    pub pipeline: PipelineSection,
    /// `[logging]`.
    pub logging: LoggingSection,
    /// `server.pin_sha256`, decoded.
    pub pins: Vec<[u8; 32]>,
}

/// `[server]`: where the server is and how to trust it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// `wss://host:port/path`.
    pub url: String,
    /// Verify the server's certificate (default true; false only for testing).
    #[serde(default = "yes")]
    pub verify_tls: bool,
    /// Trust this CA in addition to the public roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// SHA-256 of the server's public key (SubjectPublicKeyInfo), base64 or
    /// hex, one or a list (key rotation). When set, the server is trusted by
    /// its key alone: no CA, host name or expiry check.
    #[serde(default, deserialize_with = "one_or_many")]
    pub pin_sha256: Vec<String>,
    /// Time allowed for TCP, TLS and the transport handshake.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// TLS server name to send instead of the URL's host (fronting).
    #[serde(default)]
    pub sni: Option<String>,
    /// HTTP `Host` to send instead of the URL's host (fronting).
    #[serde(default)]
    pub host_header: Option<String>,
}

/// Which transport to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Try the transports in `order` and keep the first that works.
    Auto,
    /// WebSocket over TLS.
    Wss,
    /// A gRPC-shaped HTTP/2 stream over TLS.
    H2,
    /// Length-prefixed frames directly over TLS.
    Tls,
}

/// One transport, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// WebSocket.
    Wss,
    /// HTTP/2.
    H2,
    /// Raw TLS.
    Tls,
}

impl Transport {
    /// The transport crate's kind.
    pub fn kind(self) -> sallyport_transports::TransportKind {
        use sallyport_transports::TransportKind as K;
        match self {
            Transport::Wss => K::WebSocket,
            Transport::H2 => K::Http2,
            Transport::Tls => K::RawTls,
        }
    }
}

/// `[transport]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportSection {
    /// `auto`, `wss`, `h2` or `tls`.
    #[serde(default = "default_mode")]
    pub mode: Mode,
    /// The order `auto` tries (the last winner first).
    #[serde(default = "default_order")]
    pub order: Vec<Transport>,
    /// Time each `auto` attempt gets to complete the VPN handshake.
    #[serde(default = "default_attempt_timeout", with = "humantime_serde")]
    pub attempt_timeout: Duration,
    /// HTTP CONNECT proxy, `http://[user:pass@]host:port`; `"none"` ignores
    /// the environment; absent: `https_proxy`/`HTTPS_PROXY` and `NO_PROXY`.
    #[serde(default)]
    pub proxy: Option<String>,
    /// The client's state file: the client id (made once, kept) and the last
    /// transport that worked (tried first by `auto`).
    #[serde(default = "default_state_file")]
    pub state_file: Option<PathBuf>,
}

impl Default for TransportSection {
    fn default() -> Self {
        Self {
            mode: default_mode(),
            order: default_order(),
            attempt_timeout: default_attempt_timeout(),
            proxy: None,
            state_file: default_state_file(),
        }
    }
}

/// `[auth]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    /// The bearer token.
    pub token: Token,
}

/// `[vpn]`: the local device.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VpnSection {
    /// TUN interface name.
    #[serde(default = "default_interface")]
    pub interface_name: String,
    /// Largest MTU to use; the server's, if smaller, wins.
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    /// Ping interval when the server does not announce one; silence for 3
    /// intervals means the server is gone.
    #[serde(default = "default_keepalive", with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// Offer lz4 compression to the server (used only if it accepts). Off by
    /// default: compression next to attacker-chosen data leaks through
    /// packet lengths (VORACLE).
    #[serde(default)]
    pub compression: bool,
    /// Segmentation offload (Linux): open the TUN with it and offer it to the
    /// server, so TCP moves as 64 KiB super-packets (PROTOCOL.md §11).
    /// Ignored on Windows.
    #[serde(default = "yes")]
    pub offload: bool,
}

impl Default for VpnSection {
    fn default() -> Self {
        Self {
            interface_name: default_interface(),
            mtu: default_mtu(),
            keepalive_interval: default_keepalive(),
            compression: false,
            offload: true,
        }
    }
}

/// `[pipeline]`: switches for the packet pipeline.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSection {
    /// Drop packets from the TUN whose source is not the assigned address,
    /// and packets from the server whose destination is not.
    #[serde(default = "yes")]
    pub anti_spoof: bool,
    /// Count packets and bytes each way (logged when a session ends).
    #[serde(default = "yes")]
    pub stats: bool,
    /// With compression, packets smaller than this are sent as they are.
    #[serde(default = "default_compression_threshold")]
    pub compression_threshold_bytes: usize,
}

impl Default for PipelineSection {
    fn default() -> Self {
        Self {
            anti_spoof: true,
            stats: true,
            compression_threshold_bytes: default_compression_threshold(),
        }
    }
}

fn default_compression_threshold() -> usize {
    sallyport_middleware::compress::DEFAULT_THRESHOLD
}

/// `[reconnect]`: exponential backoff with jitter.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconnectSection {
    /// First delay.
    #[serde(default = "default_min_backoff", with = "humantime_serde")]
    pub min_backoff: Duration,
    /// Largest delay.
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
    /// A session that lasted this long resets the backoff.
    #[serde(default = "default_stable_after", with = "humantime_serde")]
    pub stable_after: Duration,
}

impl Default for ReconnectSection {
    fn default() -> Self {
        Self {
            min_backoff: default_min_backoff(),
            max_backoff: default_max_backoff(),
            stable_after: default_stable_after(),
        }
    }
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
    #[serde(default)]
    transport: TransportSection,
    auth: AuthSection,
    #[serde(default)]
    vpn: VpnSection,
    #[serde(default)]
    reconnect: ReconnectSection,
    #[serde(default)]
    pipeline: PipelineSection,
    #[serde(default)]
    logging: LoggingSection,
}

fn yes() -> bool {
    true
}

/// A string or a list of strings.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_mode() -> Mode {
    Mode::Auto
}
/// Fastest first: raw TLS has the least overhead and fails at once (no ALPN
/// match) where something in between speaks only HTTP; HTTP/2 passes gRPC
/// fronts (nginx grpc_pass, CDNs); WebSocket passes almost everything.
fn default_order() -> Vec<Transport> {
    vec![Transport::Tls, Transport::H2, Transport::Wss]
}
fn default_attempt_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_state_file() -> Option<PathBuf> {
    if cfg!(windows) {
        std::env::var_os("ProgramData")
            .map(|p| PathBuf::from(p).join("Sallyport").join("client-state"))
    } else {
        Some(PathBuf::from("/var/lib/sallyport-client/state"))
    }
}
fn default_interface() -> String {
    "sallyport0".into()
}
fn default_mtu() -> u16 {
    1420
}
fn default_keepalive() -> Duration {
    Duration::from_secs(15)
}
fn default_min_backoff() -> Duration {
    Duration::from_secs(1)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(60)
}
fn default_stable_after() -> Duration {
    Duration::from_secs(30)
}
fn default_level() -> String {
    "info".into()
}

/// The token in the sample configuration, refused as a real one.
pub const PLACEHOLDER_TOKEN: &str = "change-me";

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
        /// Cause (names the key and line). Boxed: it is large, and so is
        /// `PathBuf` on Windows.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A value that parses but cannot work.
    #[error("config {path}: key `{key}`: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Dotted key.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
}

impl ClientConfig {
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
            source: Box::new(source),
        })?;
        let invalid = |key: &'static str, reason: String| ConfigError::Invalid {
            path: origin.into(),
            key,
            reason,
        };
        let endpoint = sallyport_transports::ws::Endpoint::parse(&raw.server.url)
            .map_err(|e| invalid("server.url", e.to_string()))?;
        if raw.transport.mode == Mode::Tls && !endpoint.tls {
            return Err(invalid(
                "transport.mode",
                "tls needs a wss:// or https:// server.url".into(),
            ));
        }
        if raw.transport.order.is_empty() {
            return Err(invalid(
                "transport.order",
                "must name at least one transport".into(),
            ));
        }
        if let Some(p) = raw
            .transport
            .proxy
            .as_deref()
            .filter(|p| *p != "none" && !p.is_empty())
        {
            sallyport_transports::connect::Proxy::parse(p)
                .map_err(|e| invalid("transport.proxy", e.to_string()))?;
        }
        let pins = raw
            .server
            .pin_sha256
            .iter()
            .map(|p| sallyport_transports::tls::parse_pin(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid("server.pin_sha256", e))?;
        if !pins.is_empty() && !raw.server.verify_tls {
            return Err(invalid(
                "server.pin_sha256",
                "pinning needs verify_tls = true (false would check nothing)".into(),
            ));
        }
        if !pins.is_empty() && raw.server.ca_file.is_some() {
            return Err(invalid(
                "server.pin_sha256",
                "give either server.ca_file or server.pin_sha256: a pin replaces the CA check"
                    .into(),
            ));
        }
        if raw.auth.token.expose().is_empty() {
            return Err(invalid("auth.token", "must not be empty".into()));
        }
        // The packaged default config ships this placeholder; refusing it makes
        // a freshly installed service stop with this message instead of
        // dialing the sample server forever.
        if raw.auth.token.expose() == PLACEHOLDER_TOKEN {
            return Err(invalid(
                "auth.token",
                format!(
                    "still the sample placeholder \"{PLACEHOLDER_TOKEN}\": set the token \
                     (and server.url) your server's admin gave you"
                ),
            ));
        }
        if !(576..=65_535).contains(&raw.vpn.mtu) {
            return Err(invalid(
                "vpn.mtu",
                format!("{} is outside 576..=65535", raw.vpn.mtu),
            ));
        }
        if raw.vpn.interface_name.is_empty() || raw.vpn.interface_name.len() > 15 {
            return Err(invalid(
                "vpn.interface_name",
                "must be 1 to 15 characters".into(),
            ));
        }
        if raw.vpn.keepalive_interval < Duration::from_millis(100) {
            return Err(invalid(
                "vpn.keepalive_interval",
                "must be at least 100ms".into(),
            ));
        }
        let r = &raw.reconnect;
        if r.min_backoff.is_zero() || r.min_backoff > r.max_backoff {
            return Err(invalid(
                "reconnect.min_backoff",
                format!(
                    "must be positive and at most reconnect.max_backoff ({:?})",
                    r.max_backoff
                ),
            ));
        }
        if let Some(ca) = &raw.server.ca_file {
            if !ca.is_file() {
                return Err(invalid(
                    "server.ca_file",
                    format!("{} does not exist or is not a file", ca.display()),
                ));
            }
        }
        Ok(Self {
            server: raw.server,
            transport: raw.transport,
            auth: raw.auth,
            vpn: raw.vpn,
            reconnect: raw.reconnect,
            pipeline: raw.pipeline,
            logging: raw.logging,
            pins,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[server]
url = "wss://vpn.example.com:443/tunnel"
[auth]
token = "secret-token-1"
"#;

    fn parse(s: &str) -> Result<ClientConfig, ConfigError> {
        ClientConfig::from_toml_str(s, Path::new("client.toml"))
    }

    #[test]
    fn minimal_config_takes_the_documented_defaults() {
        let c = parse(MINIMAL).expect("valid");
        assert!(c.server.verify_tls);
        assert_eq!(c.transport.mode, Mode::Auto);
        assert_eq!(c.vpn.interface_name, "sallyport0");
        assert_eq!(c.vpn.mtu, 1420);
        assert_eq!(c.reconnect.min_backoff, Duration::from_secs(1));
        assert_eq!(c.reconnect.max_backoff, Duration::from_secs(60));
    }

    #[test]
    fn bad_url_names_the_key_and_file() {
        let e = parse(&MINIMAL.replace("wss://vpn.example.com:443/tunnel", "gopher://x"))
            .expect_err("invalid")
            .to_string();
        assert!(e.contains("client.toml") && e.contains("server.url"), "{e}");
    }

    #[test]
    fn backoff_order_is_checked() {
        let e = parse(&format!(
            "{MINIMAL}\n[reconnect]\nmin_backoff = \"2m\"\nmax_backoff = \"1m\""
        ))
        .expect_err("invalid")
        .to_string();
        assert!(e.contains("reconnect.min_backoff"), "{e}");
    }

    #[test]
    fn missing_ca_file_is_refused() {
        let e = parse(&MINIMAL.replace("[auth]", "ca_file = \"/nonexistent/ca.pem\"\n[auth]"))
            .expect_err("invalid")
            .to_string();
        assert!(e.contains("server.ca_file"), "{e}");
    }

    #[test]
    fn auto_defaults_to_tls_h2_wss() {
        let c = parse(MINIMAL).expect("valid");
        assert_eq!(
            c.transport.order,
            vec![Transport::Tls, Transport::H2, Transport::Wss]
        );
    }

    #[test]
    fn proxy_is_validated_and_never_echoes_the_password() {
        let e = parse(&format!(
            "{MINIMAL}\n[transport]\nproxy = \"socks5://u:hunter2@h:1\""
        ))
        .expect_err("invalid")
        .to_string();
        assert!(
            e.contains("transport.proxy") && !e.contains("hunter2"),
            "{e}"
        );
        let ok = parse(&format!(
            "{MINIMAL}\n[transport]\nproxy = \"http://u:p@proxy:3128\""
        ));
        assert!(ok.is_ok());
    }

    #[test]
    fn raw_tls_needs_a_tls_url() {
        let text = MINIMAL.replace("wss://", "ws://");
        let e = parse(&format!("{text}\n[transport]\nmode = \"tls\""))
            .expect_err("invalid")
            .to_string();
        assert!(e.contains("transport.mode"), "{e}");
    }

    #[test]
    fn compression_is_not_offered_by_default_and_the_pipeline_is_on() {
        let c = parse(MINIMAL).expect("valid");
        assert!(!c.vpn.compression);
        assert!(c.pipeline.anti_spoof && c.pipeline.stats);
        assert_eq!(c.pipeline.compression_threshold_bytes, 128);
        let c = parse(&format!(
            "{MINIMAL}[vpn]\ncompression = true\n[pipeline]\nanti_spoof = false"
        ))
        .expect("valid");
        assert!(c.vpn.compression && !c.pipeline.anti_spoof);
    }

    #[test]
    fn unknown_pipeline_keys_are_refused_by_name() {
        let e = parse(&format!("{MINIMAL}[pipeline]\nantispoof = false"))
            .expect_err("invalid")
            .to_string();
        assert!(e.contains("antispoof") && e.contains("client.toml"), "{e}");
    }

    #[test]
    fn sample_placeholder_token_is_refused() {
        let e = parse(&MINIMAL.replace("secret-token-1", PLACEHOLDER_TOKEN))
            .expect_err("invalid")
            .to_string();
        assert!(e.contains("auth.token") && e.contains("placeholder"), "{e}");
    }

    #[test]
    fn unknown_mode_is_refused() {
        let e = parse(&format!(
            "{MINIMAL}\n[transport]\nmode = \"carrier-pigeon\""
        ))
        .expect_err("invalid")
        .to_string();
        assert!(e.contains("mode"), "{e}");
    }

    #[test]
    fn pins_are_one_or_a_list_and_exclude_ca_file_and_verify_tls_false() {
        let base = "[server]\nurl = \"wss://vpn.example.com/tunnel\"\n";
        let tail = "[auth]\ntoken = \"t\"\n";
        let hex = "ab".repeat(32);
        let one = format!("{base}pin_sha256 = \"{hex}\"\n{tail}");
        let c = ClientConfig::from_toml_str(&one, Path::new("client.toml")).expect("one");
        assert_eq!(c.pins, vec![[0xab; 32]]);
        let b64 = sallyport_transports::tls::format_pin(&[1; 32]);
        let two = format!("{base}pin_sha256 = [\"{hex}\", \"{b64}\"]\n{tail}");
        let c = ClientConfig::from_toml_str(&two, Path::new("client.toml")).expect("two");
        assert_eq!(c.pins, vec![[0xab; 32], [1; 32]]);
        for bad in [
            format!("{base}pin_sha256 = \"abc\"\n{tail}"),
            format!("{base}pin_sha256 = \"{hex}\"\nca_file = \"/x\"\n{tail}"),
            format!("{base}pin_sha256 = \"{hex}\"\nverify_tls = false\n{tail}"),
        ] {
            let e = ClientConfig::from_toml_str(&bad, Path::new("client.toml"))
                .expect_err("refused")
                .to_string();
            assert!(e.contains("server.pin_sha256"), "{e}");
        }
    }
}
