//! Replays the fuzz corpora (seeds and every crash input kept there) through
//! the same checks the fuzz targets run, so plain `cargo test` covers them.
//! The checks live in `fuzz/src/lib.rs` and `fuzz/src/net.rs`; the fuzz
//! package is not a workspace member, so the files are included here rather
//! than depended on.

#[allow(dead_code, unexpected_cfgs)]
#[path = "../../fuzz/src/lib.rs"]
mod checks;
#[path = "../../fuzz/src/net.rs"]
mod net;

// net.rs reaches the shared checks as `crate::...`.
use checks::{after_transport, MAX_FRAME};

use std::path::PathBuf;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let result = std::panic::catch_unwind(|| check(&data));
        assert!(
            result.is_ok(),
            "{target}: {} fails its check",
            path.display()
        );
        n += 1;
    }
    assert!(n > 0, "{target}: no seeds in {}", dir.display());
}

#[test]
fn framing_decode_corpus_passes() {
    replay("framing_decode", net::framing_decode);
}

#[test]
fn framing_stream_corpus_passes() {
    replay("framing_stream", net::framing_stream);
}

#[test]
fn ws_messages_corpus_passes() {
    replay("ws_messages", net::ws_messages);
}

#[test]
fn control_json_corpus_passes() {
    replay("control_json", checks::control_json);
}

#[test]
fn ip_header_corpus_passes() {
    replay("ip_header", checks::ip_header);
}

#[test]
fn lz4_decompress_corpus_passes() {
    replay("lz4_decompress", checks::lz4_decompress);
}

#[test]
fn server_handshake_corpus_passes() {
    replay("server_handshake", net::server_handshake);
}
