//! The client's small state file: the transport that worked last (tried
//! first by `auto`) and the client id, generated once and kept, by which the
//! server recognises this client across restarts of either side (its lease
//! and the replacement of a stale session are bound to it).
//!
//! TOML, written atomically (temporary file, fsync, rename). A file in the
//! old one-line format (just the transport) is still read.

use std::path::Path;

use sallyport_transports::TransportKind;
use serde::{Deserialize, Serialize};

/// What the state file holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientState {
    /// The transport that worked last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// This client's id, sent in `auth`/`reconnect`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
}

impl ClientState {
    /// Reads `path`; a missing or unreadable file is an empty state (logged
    /// when unreadable).
    pub fn load(path: &Path) -> Self {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Self::default(),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot read the client state file");
                return Self::default();
            }
        };
        if let Ok(s) = toml::from_str::<ClientState>(&text) {
            return s;
        }
        match TransportKind::parse(text.trim()) {
            Some(_) => Self {
                transport: Some(text.trim().into()),
                client_id: None,
            },
            None => {
                tracing::warn!(file = %path.display(), "client state file is malformed, starting afresh");
                Self::default()
            }
        }
    }

    /// Writes `path` atomically, creating its directory.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let text = toml::to_string(self).map_err(std::io::Error::other)?;
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }

    /// The stored transport, if it names one.
    pub fn transport_kind(&self) -> Option<TransportKind> {
        self.transport.as_deref().and_then(TransportKind::parse)
    }

    /// The stored client id, or a new one, stored at once (`path` `None`:
    /// nowhere to keep it, so this process's own).
    pub fn client_id(&mut self, path: Option<&Path>) -> String {
        if let Some(id) = self.client_id.as_ref().filter(|id| valid_id(id)) {
            return id.clone();
        }
        let id = format!("{:032x}", rand::random::<u128>());
        self.client_id = Some(id.clone());
        match path {
            None => tracing::warn!(
                "no transport.state_file: the client id lasts only as long as this process"
            ),
            Some(p) => match self.save(p) {
                Ok(()) => tracing::info!(file = %p.display(), "new client id stored"),
                Err(e) => tracing::warn!(
                    file = %p.display(), error = %e,
                    "cannot store the client id: the server will see a new client after a restart"
                ),
            },
        }
        id
    }
}

fn valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("sallyport-state-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn the_client_id_is_generated_once_and_kept_with_the_transport() {
        let d = dir("id");
        let path = d.join("sub").join("state");
        let mut s = ClientState::load(&path);
        assert_eq!(s, ClientState::default(), "missing file: empty");
        let id = s.client_id(Some(&path));
        assert_eq!(id.len(), 32);
        let mut again = ClientState::load(&path);
        assert_eq!(again.client_id(Some(&path)), id, "same id after a restart");
        again.transport = Some("h2".into());
        again.save(&path).expect("save");
        let third = ClientState::load(&path);
        assert_eq!(third.transport_kind(), Some(TransportKind::Http2));
        assert_eq!(third.client_id.as_deref(), Some(id.as_str()));
        assert!(!path.with_extension("tmp").exists(), "no temporary left");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn the_old_one_line_format_and_garbage_are_read_without_failing() {
        let d = dir("old");
        std::fs::create_dir_all(&d).expect("dir");
        let path = d.join("state");
        std::fs::write(&path, "wss\n").expect("write");
        let s = ClientState::load(&path);
        assert_eq!(s.transport_kind(), Some(TransportKind::WebSocket));
        assert_eq!(s.client_id, None);
        std::fs::write(&path, "\u{0}\u{1} not toml [").expect("write");
        assert_eq!(ClientState::load(&path), ClientState::default());
        let _ = std::fs::remove_dir_all(&d);
    }
}
