//! The admin endpoint: plain HTTP/1.1 on its own listener (`[admin]
//! listen_addr`), for operators and Prometheus, not for clients.
//!
//! - `GET /metrics`: Prometheus text format, every name prefixed
//!   `sallyport_`. Per-session series only with `per_session_metrics`, so the
//!   number of series stays bounded by default.
//! - `GET /status`: JSON, one object per session.
//! - `GET /healthz`: `ok`.
//!
//! Everything is read from the same atomic counters the packet path writes;
//! serving a request takes no lock that the packet path holds for long.

use std::convert::Infallible;
use std::fmt::Write;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use sallyport_middleware::{Counters, Direction, DropReason};
use tokio::net::TcpListener;

use crate::hub::Hub;

/// Serves the admin endpoint on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, hub: Arc<Hub>, per_session: bool) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let hub = hub.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let hub = hub.clone();
                async move { Ok::<_, Infallible>(handle(&hub, per_session, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            // Bounded, so an idle or slow admin client cannot hold a task forever.
            match tokio::time::timeout(std::time::Duration::from_secs(30), conn).await {
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "admin connection failed"),
                Err(_) => tracing::debug!(%peer, "admin connection timed out"),
                Ok(Ok(())) => {}
            }
        });
    }
}

/// Answers one request.
pub fn handle(hub: &Hub, per_session: bool, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    route(hub, per_session, req.method(), req.uri().path())
}

fn route(hub: &Hub, per_session: bool, method: &Method, path: &str) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n".into(),
        );
    }
    match path {
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            render_metrics(hub, per_session),
        ),
        "/status" => reply(StatusCode::OK, "application/json", render_status(hub)),
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

fn help(out: &mut String, name: &str, kind: &str, text: &str) {
    let _ = writeln!(out, "# HELP {name} {text}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

type Read = fn(&Counters, Direction) -> u64;

/// The per-direction counter families: name, help, how to read.
const FAMILIES: [(&str, &str, Read); 4] = [
    (
        "packets_total",
        "Packets through the stats layer (decap: from clients, encap: to clients).",
        Counters::packets,
    ),
    (
        "bytes_total",
        "Bytes on the wire through the stats layer (after compression).",
        Counters::bytes,
    ),
    (
        "compression_in_bytes_total",
        "Bytes into the lz4 compressor (encap) or decompressor (decap).",
        Counters::compress_in,
    ),
    (
        "compression_out_bytes_total",
        "Bytes out of the lz4 compressor (encap) or decompressor (decap).",
        Counters::compress_out,
    ),
];

/// Writes every counter family once, with HELP and TYPE, and in each family
/// a series per direction (and reason) for every `(labels, counters)` pair;
/// `labels` are preformatted and end in `,` unless empty.
fn counter_families(out: &mut String, prefix: &str, sets: &[(String, &Counters)]) {
    for (name, text, read) in FAMILIES {
        let full = format!("{prefix}{name}");
        help(out, &full, "counter", text);
        for (labels, c) in sets {
            for d in Direction::ALL {
                let _ = writeln!(
                    out,
                    "{full}{{{labels}direction=\"{}\"}} {}",
                    d.as_str(),
                    read(c, d)
                );
            }
        }
    }
    let full = format!("{prefix}dropped_packets_total");
    help(
        out,
        &full,
        "counter",
        "Packets dropped by policy or routing, by direction and reason.",
    );
    for (labels, c) in sets {
        for d in Direction::ALL {
            for r in DropReason::ALL {
                let _ = writeln!(
                    out,
                    "{full}{{{labels}direction=\"{}\",reason=\"{}\"}} {}",
                    d.as_str(),
                    r.as_str(),
                    c.dropped(d, r)
                );
            }
        }
    }
}

/// The Prometheus text exposition of the hub's counters.
pub fn render_metrics(hub: &Hub, per_session: bool) -> String {
    let mut out = String::with_capacity(8192);
    help(
        &mut out,
        "sallyport_sessions",
        "gauge",
        "Sessions established now.",
    );
    let _ = writeln!(out, "sallyport_sessions {}", hub.sessions());
    counter_families(&mut out, "sallyport_", &[(String::new(), hub.stats())]);
    for (name, text, value) in hub.limits().series() {
        let full = format!("sallyport_{name}");
        help(&mut out, &full, "counter", text);
        let _ = writeln!(out, "{full} {value}");
    }
    if per_session {
        let sessions = hub.session_meta();
        let sets: Vec<(String, &Counters)> = sessions
            .iter()
            .map(|m| {
                (
                    format!("session=\"{}\",addr=\"{}\",", m.id, m.addr),
                    &*m.counters,
                )
            })
            .collect();
        counter_families(&mut out, "sallyport_session_", &sets);
    }
    out
}

/// The `/status` document.
pub fn render_status(hub: &Hub) -> String {
    let now = SystemTime::now();
    let sessions: Vec<serde_json::Value> = hub
        .session_meta()
        .iter()
        .map(|m| {
            let c = &m.counters;
            serde_json::json!({
                "id": m.id,
                "assigned_ip": m.addr.to_string(),
                "token_index": m.token_index,
                "transport": m.transport,
                "peer": m.peer.map(|p| p.to_string()),
                "connected_since": humantime::format_rfc3339_seconds(m.since).to_string(),
                "connected_secs": now.duration_since(m.since).map(|d| d.as_secs()).unwrap_or(0),
                "compression": m.compression.then_some("lz4"),
                "bytes_from_client": c.bytes(Direction::Decap),
                "bytes_to_client": c.bytes(Direction::Encap),
                "packets_from_client": c.packets(Direction::Decap),
                "packets_to_client": c.packets(Direction::Encap),
            })
        })
        .collect();
    let doc = serde_json::json!({ "sessions": sessions });
    let mut s = serde_json::to_string_pretty(&doc).unwrap_or_else(|_| "{}".into());
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    use crate::hub::SessionMeta;
    use crate::pool::IpPool;

    fn hub() -> Hub {
        let subnet = "10.100.0.0/24".parse().expect("net");
        let server = Ipv4Addr::new(10, 100, 0, 1);
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        Hub::new(
            IpPool::new(subnet, server, Duration::from_secs(1)),
            subnet,
            server,
            tx,
        )
    }

    fn attach(h: &Hub, id: u64, addr: Ipv4Addr) -> Arc<Counters> {
        let counters = Counters::new_shared();
        h.attach_meta(Arc::new(SessionMeta {
            id,
            addr,
            token_index: 1,
            transport: "wss",
            peer: Some("198.18.0.10:40000".parse().expect("addr")),
            since: SystemTime::now(),
            compression: true,
            counters: counters.clone(),
        }));
        counters
    }

    #[test]
    fn metrics_are_prometheus_text_with_the_prefix_and_labels() {
        let h = hub();
        h.stats().record_packets(Direction::Decap, 3, 300);
        h.drop_packet(Direction::Decap, DropReason::Spoofed);
        crate::limits::LimitCounters::hit(&h.limits().idle_closed);
        let m = render_metrics(&h, false);
        assert!(m.contains("sallyport_limit_idle_closed_total 1\n"), "{m}");
        assert!(
            m.contains("sallyport_limit_token_sessions_refused_total 0\n"),
            "{m}"
        );
        assert!(
            m.contains("sallyport_packets_total{direction=\"decap\"} 3\n"),
            "{m}"
        );
        assert!(
            m.contains("sallyport_bytes_total{direction=\"decap\"} 300\n"),
            "{m}"
        );
        assert!(
            m.contains(
                "sallyport_dropped_packets_total{direction=\"decap\",reason=\"spoofed\"} 1\n"
            ),
            "{m}"
        );
        assert!(m.contains("# TYPE sallyport_dropped_packets_total counter"));
        for line in m.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("sallyport_"), "{line}");
            let value = line.rsplit(' ').next().expect("value");
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }

    #[test]
    fn per_session_series_appear_only_when_enabled_and_families_stay_whole() {
        let h = hub();
        let a = attach(&h, 7, Ipv4Addr::new(10, 100, 0, 2));
        attach(&h, 8, Ipv4Addr::new(10, 100, 0, 3));
        a.record_packets(Direction::Encap, 5, 500);
        assert!(!render_metrics(&h, false).contains("sallyport_session_"));
        let m = render_metrics(&h, true);
        assert!(
            m.contains(
                "sallyport_session_packets_total{session=\"7\",addr=\"10.100.0.2\",direction=\"encap\"} 5\n"
            ),
            "{m}"
        );
        // Each family's lines follow its TYPE line without interruption.
        let lines: Vec<&str> = m.lines().collect();
        let mut current = "";
        for l in lines {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                current = rest.split(' ').next().expect("name");
            } else if !l.starts_with('#') {
                assert_eq!(
                    l.split('{').next().expect("name").split(' ').next(),
                    Some(current),
                    "{l}"
                );
            }
        }
    }

    #[test]
    fn status_lists_each_session_with_its_address_token_and_bytes() {
        let h = hub();
        let c = attach(&h, 7, Ipv4Addr::new(10, 100, 0, 2));
        c.record_packets(Direction::Decap, 2, 1234);
        let v: serde_json::Value = serde_json::from_str(&render_status(&h)).expect("json");
        let s = &v["sessions"][0];
        assert_eq!(s["assigned_ip"], "10.100.0.2");
        assert_eq!(s["token_index"], 1);
        assert_eq!(s["transport"], "wss");
        assert_eq!(s["peer"], "198.18.0.10:40000");
        assert_eq!(s["bytes_from_client"], 1234);
        assert_eq!(s["bytes_to_client"], 0);
        assert_eq!(s["compression"], "lz4");
        assert!(s["connected_since"].as_str().expect("str").ends_with('Z'));
    }

    #[test]
    fn unknown_paths_and_methods_are_refused() {
        let h = hub();
        assert_eq!(
            route(&h, false, &Method::GET, "/healthz").status(),
            StatusCode::OK
        );
        assert_eq!(
            route(&h, false, &Method::GET, "/nope").status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            route(&h, false, &Method::POST, "/metrics").status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }
}
