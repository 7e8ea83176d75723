//! Plain HTTP/1.1 requests to the server's TLS port, for [F3]: what someone
//! who is not a Sallyport client sees there.

use std::sync::Arc;
use std::time::Duration;

use sallyport_transports::tls::client_config;
use sallyport_transports::ws::{connect_tcp, Endpoint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::Target;

/// What came back: the status code and the whole response (head and body).
#[derive(Debug)]
pub(crate) struct HttpResponse {
    pub status: u16,
    pub text: String,
}

/// Sends `GET path` with `headers` (each `Name: value`) and reads the
/// response until the server closes or 16 KiB have arrived.
pub(crate) async fn get(
    target: &Target,
    path: &str,
    headers: &[&str],
    within: Duration,
) -> Result<HttpResponse, String> {
    let ep = Endpoint::parse(&target.url).map_err(|e| e.to_string())?;
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {}:{}\r\nConnection: close\r\n",
        ep.host, ep.port
    );
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    let work = async {
        let tcp = connect_tcp(&ep.host, ep.port)
            .await
            .map_err(|e| e.to_string())?;
        if ep.tls {
            let cfg = client_config(&target.trust, &[b"http/1.1"]).map_err(|e| e.to_string())?;
            let name = rustls::pki_types::ServerName::try_from(ep.host.clone())
                .map_err(|e| format!("{}: {e}", ep.host))?;
            let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
                .connect(name, tcp)
                .await
                .map_err(|e| format!("tls handshake: {e}"))?;
            exchange(tls, &req).await
        } else {
            exchange(tcp, &req).await
        }
    };
    tokio::time::timeout(within, work)
        .await
        .map_err(|_| format!("no HTTP response within {within:?}"))?
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    req: &str,
) -> Result<HttpResponse, String> {
    io.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("send request: {e}"))?;
    io.flush().await.map_err(|e| format!("send request: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while buf.len() < 16 * 1024 {
        match io.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            // A peer that closes without close_notify still sent its answer.
            Err(_) if !buf.is_empty() => break,
            Err(e) => return Err(format!("read response: {e}")),
        }
        if complete(&buf) {
            break;
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {:?}", super::session::clip(&text)))?;
    Ok(HttpResponse { status, text })
}

/// Whether `buf` holds a whole response with a `Content-Length` body (so we
/// need not wait for the server to close).
fn complete(buf: &[u8]) -> bool {
    let text = String::from_utf8_lossy(buf);
    let Some(end) = text.find("\r\n\r\n") else {
        return false;
    };
    let head = text[..end].to_ascii_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    match len {
        Some(n) => buf.len() >= end + 4 + n,
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_with_content_length_is_complete_once_the_body_is_in() {
        let head = b"HTTP/1.1 404 Not Found\r\ncontent-length: 4\r\n\r\n";
        let mut r = head.to_vec();
        assert!(!complete(&r));
        r.extend_from_slice(b"nope");
        assert!(complete(&r));
        assert!(!complete(b"HTTP/1.1 404 Not Found\r\n\r\n"));
    }
}
