//! The lease file: identified clients' leases kept across server restarts.
//!
//! JSON, written atomically (temporary file in the same directory, fsync,
//! rename, fsync of the directory), so a crash leaves the old file or the new
//! one, never half of one. A file that cannot be parsed is moved aside
//! (`leases.json.corrupt-<unix time>`) with a warning, and the server starts
//! with no leases: it never refuses to start over it. The file holds
//! identities (`name:<name>` or `id:<hash of token digest and client id>`),
//! never a token.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::pool::SavedLease;

const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    version: u32,
    leases: Vec<SavedLease>,
}

/// Where leases are kept.
#[derive(Debug, Clone)]
pub struct LeaseFile {
    path: PathBuf,
}

impl LeaseFile {
    /// The lease file at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the leases. A missing file is no leases; an unreadable one is
    /// logged; a malformed one is moved aside and logged.
    pub fn load(&self) -> Vec<SavedLease> {
        let text = match std::fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => {
                tracing::warn!(file = %self.path.display(), error = %e, "cannot read the lease file; starting without leases");
                return Vec::new();
            }
        };
        match serde_json::from_slice::<FileFormat>(&text) {
            Ok(f) if f.version == VERSION => f.leases,
            Ok(f) => {
                self.move_aside(&format!("unknown version {}", f.version));
                Vec::new()
            }
            Err(e) => {
                self.move_aside(&e.to_string());
                Vec::new()
            }
        }
    }

    fn move_aside(&self, why: &str) {
        let secs = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut name = self.path.as_os_str().to_owned();
        name.push(format!(".corrupt-{secs}"));
        let aside = PathBuf::from(name);
        match std::fs::rename(&self.path, &aside) {
            Ok(()) => tracing::warn!(
                file = %self.path.display(), moved_to = %aside.display(), error = why,
                "lease file is corrupt: moved aside, starting without leases"
            ),
            Err(e) => tracing::warn!(
                file = %self.path.display(), error = why, rename_error = %e,
                "lease file is corrupt and cannot be moved aside; starting without leases"
            ),
        }
    }

    /// Replaces the file with `leases`, atomically.
    pub fn save(&self, leases: &[SavedLease]) -> std::io::Result<()> {
        let body = serde_json::to_vec_pretty(&FileFormat {
            version: VERSION,
            leases: leases.to_vec(),
        })
        .map_err(std::io::Error::other)?;
        let mut tmp = self.path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&body)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &self.path)?;
        // Make the rename itself durable.
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sallyport-leases-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("dir");
        d
    }

    fn lease(id: &str, last: u8) -> SavedLease {
        SavedLease {
            identity: id.into(),
            ip: std::net::Ipv4Addr::new(10, 100, 0, last),
            expires_unix: 4_000_000_000,
        }
    }

    #[test]
    fn saves_and_loads_atomically_leaving_no_temporary() {
        let d = dir("rt");
        let f = LeaseFile::new(d.join("leases.json"));
        assert!(f.load().is_empty(), "missing file: no leases");
        let leases = vec![lease("name:alice", 50), lease("id:00ff", 2)];
        f.save(&leases).expect("save");
        assert_eq!(f.load(), leases);
        f.save(&leases[..1]).expect("replace");
        assert_eq!(f.load(), leases[..1]);
        let names: Vec<_> = std::fs::read_dir(&d)
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["leases.json"], "no temporary file left");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_corrupt_file_is_moved_aside_and_yields_no_leases() {
        let d = dir("bad");
        let path = d.join("leases.json");
        let f = LeaseFile::new(&path);
        for junk in [
            &b"{\"version\":1,\"leases\":[{\"identity\":"[..],
            b"\xff\xfe garbage",
            b"{\"version\":99,\"leases\":[]}",
        ] {
            std::fs::write(&path, junk).expect("write");
            assert!(f.load().is_empty());
            assert!(!path.exists(), "moved away");
            let aside: Vec<_> = std::fs::read_dir(&d)
                .expect("ls")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("leases.json.corrupt-"))
                .collect();
            assert_eq!(aside.len(), 1, "{aside:?}");
            std::fs::remove_file(d.join(&aside[0])).expect("rm");
        }
        // And saving afterwards works again.
        f.save(&[lease("name:a", 9)]).expect("save");
        assert_eq!(f.load().len(), 1);
        let _ = std::fs::remove_dir_all(&d);
    }
}
