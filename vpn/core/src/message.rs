//! The JSON control messages of the wire protocol (see docs/PROTOCOL.md).
//!
//! Field names are fixed by the original specification; extensions are optional
//! fields that older peers ignore. Unknown fields are ignored, unknown message
//! types are an error.

use std::net::Ipv4Addr;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Largest control message accepted, in bytes. Control messages are small; a
/// larger one is hostile or broken.
pub const MAX_CONTROL_LEN: usize = 4096;

/// A bearer token. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Token(String);

impl Token {
    /// Wraps a token.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself, for comparison and for sending.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// A control message. On the wire: a JSON object whose `type` names the variant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Control {
    /// Client → server, first message of a new session.
    Auth(Auth),
    /// Client → server, first message of a session that had an address before.
    Reconnect(Reconnect),
    /// Server → client, the answer to `auth` or `reconnect`.
    AuthResponse(AuthResponse),
    /// Either way: are you there?
    Ping(Ping),
    /// Either way: the answer to `ping`.
    Pong(Pong),
}

/// `{"type":"auth","token":...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Auth {
    /// The shared secret.
    pub token: Token,
    /// Extension: a stable identifier the client chose, so the server can
    /// replace this client's stale session at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Extension: compression algorithms the client offers, e.g. `["lz4"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<Vec<String>>,
    /// Extension: packet offloads the client offers, e.g. `["gso"]`
    /// (see [`crate::offload`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offload: Option<Vec<String>>,
}

/// `{"type":"reconnect","token":...,"previous_ip":...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reconnect {
    /// The shared secret.
    pub token: Token,
    /// The address this client had; the server gives it back when it can.
    pub previous_ip: Ipv4Addr,
    /// Extension: see [`Auth::client_id`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Extension: see [`Auth::compression`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<Vec<String>>,
    /// Extension: see [`Auth::offload`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offload: Option<Vec<String>>,
}

/// `{"type":"auth_response","success":...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct AuthResponse {
    /// Whether the session is established.
    pub success: bool,
    /// The client's address inside the tunnel (on success).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_ip: Option<Ipv4Addr>,
    /// The virtual LAN, CIDR notation, e.g. `10.100.0.0/24` (on success).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    /// The server's own address inside the tunnel (on success).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_ip: Option<Ipv4Addr>,
    /// The tunnel MTU the client must use (on success).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// Extension: a short reason on failure (`auth_failed`, `pool_exhausted`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Extension: the server's keepalive interval in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive_secs: Option<u64>,
    /// Extension: the server's id for this session, for correlating logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// Extension: the compression the server accepted from the client's
    /// offer (`"lz4"`); absent: none, and packets are raw both ways.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
    /// Extension: the offload the server accepted (`"gso"`); absent: none,
    /// and every packet is a plain IP packet of at most `mtu` bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offload: Option<String>,
}

/// The name of lz4 packet compression in `compression` fields.
pub const COMPRESSION_LZ4: &str = "lz4";

/// Whether an `auth`/`reconnect` offer includes lz4.
pub fn offers_lz4(offer: &Option<Vec<String>>) -> bool {
    offer
        .as_ref()
        .is_some_and(|o| o.iter().any(|a| a == COMPRESSION_LZ4))
}

/// `{"type":"ping"}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {
    /// Extension: an opaque number echoed in the pong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

/// `{"type":"pong"}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    /// Extension: the `seq` of the ping answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

/// Why bytes are not a control message.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    /// Larger than [`MAX_CONTROL_LEN`].
    #[error("control message of {0} bytes exceeds the {MAX_CONTROL_LEN}-byte limit")]
    TooLarge(usize),
    /// Not JSON, not an object, or a field of the wrong type.
    #[error("invalid control message: {0}")]
    Invalid(#[source] serde_json::Error),
    /// A JSON object with a `type` this implementation does not know.
    #[error("unknown control message type {0:?}")]
    UnknownType(String),
}

const KNOWN_TYPES: [&str; 5] = ["auth", "reconnect", "auth_response", "ping", "pong"];

impl Control {
    /// Parses a control message from untrusted bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, MessageError> {
        if bytes.len() > MAX_CONTROL_LEN {
            return Err(MessageError::TooLarge(bytes.len()));
        }
        serde_json::from_slice(bytes).map_err(|e| {
            // serde reports an unknown tag as a generic error; name it precisely.
            #[derive(Deserialize)]
            struct Tag {
                #[serde(rename = "type")]
                kind: String,
            }
            match serde_json::from_slice::<Tag>(bytes) {
                Ok(t) if !KNOWN_TYPES.contains(&t.kind.as_str()) => {
                    MessageError::UnknownType(t.kind)
                }
                _ => MessageError::Invalid(e),
            }
        })
    }

    /// Serialises to the bytes of a text message.
    pub fn encode(&self) -> Bytes {
        // Serialising these plain structs cannot fail: no maps with non-string
        // keys, no custom serialisers that error.
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    /// The `type` name, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Control::Auth(_) => "auth",
            Control::Reconnect(_) => "reconnect",
            Control::AuthResponse(_) => "auth_response",
            Control::Ping(_) => "ping",
            Control::Pong(_) => "pong",
        }
    }
}

impl From<Control> for crate::Frame {
    fn from(c: Control) -> Self {
        crate::Frame::Control(c.encode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn to_value(c: &Control) -> serde_json::Value {
        serde_json::from_slice(&c.encode()).expect("json")
    }

    #[test]
    fn auth_has_the_original_field_names() {
        let c = Control::Auth(Auth {
            token: Token::new("secret-token-1"),
            client_id: None,
            compression: None,
            offload: None,
        });
        assert_eq!(
            to_value(&c),
            json!({"type":"auth","token":"secret-token-1"})
        );
    }

    #[test]
    fn reconnect_has_the_original_field_names() {
        let c = Control::Reconnect(Reconnect {
            token: Token::new("t"),
            previous_ip: Ipv4Addr::new(10, 100, 0, 7),
            client_id: None,
            compression: None,
            offload: None,
        });
        assert_eq!(
            to_value(&c),
            json!({"type":"reconnect","token":"t","previous_ip":"10.100.0.7"})
        );
    }

    #[test]
    fn auth_response_has_the_original_field_names() {
        let c = Control::AuthResponse(AuthResponse {
            success: true,
            assigned_ip: Some(Ipv4Addr::new(10, 100, 0, 2)),
            subnet: Some("10.100.0.0/24".into()),
            server_ip: Some(Ipv4Addr::new(10, 100, 0, 1)),
            mtu: Some(1420),
            ..Default::default()
        });
        assert_eq!(
            to_value(&c),
            json!({"type":"auth_response","success":true,"assigned_ip":"10.100.0.2",
                   "subnet":"10.100.0.0/24","server_ip":"10.100.0.1","mtu":1420})
        );
        let fail = Control::AuthResponse(AuthResponse::default());
        assert_eq!(
            to_value(&fail),
            json!({"type":"auth_response","success":false})
        );
    }

    #[test]
    fn ping_and_pong_are_bare() {
        assert_eq!(
            to_value(&Control::Ping(Ping::default())),
            json!({"type":"ping"})
        );
        assert_eq!(
            to_value(&Control::Pong(Pong::default())),
            json!({"type":"pong"})
        );
    }

    #[test]
    fn every_message_round_trips() {
        let all = [
            Control::Auth(Auth {
                token: Token::new("a"),
                client_id: Some("c1".into()),
                compression: Some(vec!["lz4".into()]),
                offload: None,
            }),
            Control::Reconnect(Reconnect {
                token: Token::new("a"),
                previous_ip: Ipv4Addr::new(10, 0, 0, 9),
                client_id: None,
                compression: Some(vec![]),
                offload: None,
            }),
            Control::AuthResponse(AuthResponse {
                success: false,
                error: Some("auth_failed".into()),
                ..Default::default()
            }),
            Control::Ping(Ping { seq: Some(3) }),
            Control::Pong(Pong { seq: None }),
        ];
        for c in all {
            assert_eq!(Control::decode(&c.encode()).expect("decodes"), c);
        }
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let c = Control::decode(br#"{"type":"ping","future":[1,2,3]}"#).expect("ok");
        assert_eq!(c, Control::Ping(Ping::default()));
        let a =
            Control::decode(br#"{"type":"auth","token":"x","compression":["lz4"]}"#).expect("ok");
        assert_eq!(a.kind(), "auth");
    }

    #[test]
    fn compression_fields_are_optional_and_named_as_documented() {
        let a = Control::decode(br#"{"type":"auth","token":"x","compression":["zstd","lz4"]}"#)
            .expect("ok");
        let Control::Auth(a) = a else {
            panic!("auth expected")
        };
        assert!(offers_lz4(&a.compression));
        assert!(!offers_lz4(&None));
        assert!(!offers_lz4(&Some(vec!["zstd".into()])));
        let r = Control::AuthResponse(AuthResponse {
            success: true,
            compression: Some(COMPRESSION_LZ4.into()),
            ..Default::default()
        });
        assert_eq!(
            to_value(&r),
            json!({"type":"auth_response","success":true,"compression":"lz4"})
        );
    }

    #[test]
    fn unknown_type_is_named() {
        let e = Control::decode(br#"{"type":"hello"}"#).expect_err("unknown");
        assert!(
            matches!(e, MessageError::UnknownType(ref t) if t == "hello"),
            "{e}"
        );
    }

    #[test]
    fn malformed_inputs_are_errors() {
        let cases: &[&[u8]] = &[
            b"",
            b"not json",
            b"{",
            b"[]",
            b"null",
            b"42",
            br#"{"token":"x"}"#,
            br#"{"type":7}"#,
            br#"{"type":"auth"}"#,
            br#"{"type":"auth","token":5}"#,
            br#"{"type":"reconnect","token":"x"}"#,
            br#"{"type":"reconnect","token":"x","previous_ip":"not-an-ip"}"#,
            br#"{"type":"reconnect","token":"x","previous_ip":"::1"}"#,
            br#"{"type":"auth_response"}"#,
            br#"{"type":"auth_response","success":"yes"}"#,
            br#"{"type":"auth_response","success":true,"mtu":70000}"#,
            b"\xff\xfe\x00",
        ];
        for c in cases {
            assert!(
                Control::decode(c).is_err(),
                "{:?}",
                String::from_utf8_lossy(c)
            );
        }
    }

    #[test]
    fn oversized_message_is_rejected_before_parsing() {
        let big = format!(
            r#"{{"type":"ping","pad":"{}"}}"#,
            "x".repeat(MAX_CONTROL_LEN)
        );
        assert!(matches!(
            Control::decode(big.as_bytes()),
            Err(MessageError::TooLarge(_))
        ));
    }

    #[test]
    fn token_debug_is_redacted() {
        let t = Token::new("hunter2");
        assert!(!format!("{t:?}").contains("hunter2"));
        let a = Control::Auth(Auth {
            token: t,
            client_id: None,
            compression: None,
            offload: None,
        });
        assert!(!format!("{a:?}").contains("hunter2"));
    }
}
