//! The checks, each mapped to the statements of docs/PROTOCOL.md it tests.
//!
//! Conventions: every check opens its own sessions and closes them when it
//! returns; "the session stays up" is proved by routing a packet through it
//! (not by ping, so that a server that never answers `ping` fails the ping
//! check only); "X does not arrive" is watched for `quiet`.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use sallyport_core::ip::build_ipv6;
use serde_json::Value;

use bytes::Bytes;
use sallyport_core::message::{Control, Reconnect, Token};
use sallyport_core::Frame;

use super::offload::{
    offload_bad_envelopes, offload_negotiation, offload_not_negotiated, offload_routed,
};
use super::session::{
    auth, auth_offering, clip, parse_auth_reply, prefix, reconnect, top_addresses, Event, Grant,
    Pings, Probe, Session,
};
use super::{fail, http, lz4, skip, Check, CheckResult, Ctx, Transport, Verdict};

macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(fail(format!($($arg)+)));
        }
    };
}

macro_rules! check {
    ($id:literal, [$($spec:literal),+], $desc:literal, $f:ident) => {
        Check {
            id: $id,
            spec: &[$($spec),+],
            description: $desc,
            run: |cx| Box::pin($f(cx)),
            alongside: false,
        }
    };
    ($id:literal, [$($spec:literal),+], $desc:literal, $f:ident, alongside) => {
        Check {
            id: $id,
            spec: &[$($spec),+],
            description: $desc,
            run: |cx| Box::pin($f(cx)),
            alongside: true,
        }
    };
}

/// Every check, in the order they run. The pool-exhaustion check is last:
/// it leaves every address held.
pub static CHECKS: &[Check] = &[
    check!(
        "handshake.auth_response",
        ["H1"],
        "auth with a valid token gets success, an assignable address inside subnet and an mtu in 576..=65535",
        handshake_auth_response
    ),
    check!(
        "handshake.unknown_fields",
        ["§2"],
        "fields the server does not know, in auth and ping, are ignored",
        handshake_unknown_fields
    ),
    check!(
        "handshake.bad_token",
        ["H2"],
        "a wrong token gets exactly {success:false, error:auth_failed}, the same whatever is wrong, and the connection closes",
        handshake_bad_token
    ),
    check!(
        "handshake.auth_timeout",
        ["H3"],
        "a connection that sends nothing is closed once limits.auth_timeout has passed",
        handshake_auth_timeout,
        alongside
    ),
    check!(
        "handshake.packet_before_auth",
        ["H4"],
        "a packet before auth gets auth_required and the connection closes",
        handshake_packet_before_auth
    ),
    check!(
        "handshake.wrong_first_message",
        ["H4"],
        "a first control message other than auth/reconnect (ping, an unknown type) gets auth_required and the connection closes",
        handshake_wrong_first_message
    ),
    check!(
        "handshake.invalid_json",
        ["H4"],
        "invalid JSON as the first message gets invalid_message and the connection closes",
        handshake_invalid_json
    ),
    check!(
        "address.unique",
        ["A2"],
        "ten sessions authenticating at once get ten different assignable addresses",
        address_unique
    ),
    check!(
        "address.sequential",
        ["A1"],
        "sessions opened one after another get increasing addresses (the lowest free each time)",
        address_sequential
    ),
    check!(
        "address.held_after_close",
        ["A3"],
        "a closed session's address is not given to a fresh session",
        address_held_after_close
    ),
    check!(
        "address.held_for_other_token",
        ["A3"],
        "a held address is not given to a reconnect with another token (needs --token2)",
        address_held_for_other_token
    ),
    check!(
        "address.reconnect_same",
        ["A4"],
        "reconnect with previous_ip gets its held address back",
        address_reconnect_same
    ),
    check!(
        "address.reconnect_in_use",
        ["A2", "A4"],
        "reconnect asking for an address a live session holds gets a different one; the live session keeps its route",
        address_reconnect_in_use
    ),
    check!(
        "address.client_id_replaces",
        ["A4"],
        "reconnect with the client_id of a live session gets its address and the old session is closed",
        address_client_id_replaces
    ),
    check!(
        "address.identity_lease",
        ["A3", "A6"],
        "a fresh auth with the client_id of a closed session gets its address back without asking",
        address_identity_lease
    ),
    check!(
        "address.identity_replaces",
        ["A6"],
        "a fresh auth with the client_id of a live session gets its address and the old session is closed",
        address_identity_replaces
    ),
    check!(
        "address.reconnect_free",
        ["A4"],
        "reconnect asking for a free address (the top of the subnet) gets it",
        address_reconnect_free
    ),
    check!(
        "address.reconnect_reserved",
        ["A1", "A4"],
        "reconnect asking for server_ip, the network, the broadcast or an outside address succeeds with an assignable one",
        address_reconnect_reserved
    ),
    check!(
        "keepalive.ping_pong",
        ["K1"],
        "ping gets pong within the reply timeout, echoing seq",
        keepalive_ping_pong
    ),
    check!(
        "keepalive.server_pings",
        ["K1"],
        "the server sends ping within its announced keepalive interval",
        keepalive_server_pings,
        alongside
    ),
    check!(
        "keepalive.answered_stays_open",
        ["K1", "K2"],
        "a client that only answers the server's pings stays connected past 3 intervals",
        keepalive_answered_stays_open,
        alongside
    ),
    check!(
        "keepalive.silence_closes",
        ["K2"],
        "a client that sends nothing, not even pong, is closed after 3 intervals",
        keepalive_silence_closes,
        alongside
    ),
    check!(
        "routing.client_to_client",
        ["R2"],
        "a packet from A to B's address arrives at B byte for byte, small and MTU-sized, both ways",
        routing_client_to_client
    ),
    check!(
        "routing.forged_source",
        ["R1", "P1"],
        "packets whose source is not the sender's address are not delivered; the session stays up",
        routing_forged_source
    ),
    check!(
        "routing.server_reachable",
        ["R3", "R6"],
        "an ICMP echo request to server_ip reaches the server's TUN and its reply comes back",
        routing_server_reachable
    ),
    check!(
        "routing.to_server_not_echoed",
        ["R3"],
        "packets to server_ip or outside subnet are not delivered to any client; the session stays up",
        routing_to_server_not_echoed
    ),
    check!(
        "routing.unknown_destination",
        ["R4"],
        "a packet to an unheld address in subnet is delivered to no one; the session stays up",
        routing_unknown_destination
    ),
    check!(
        "routing.malformed_dropped",
        ["R5"],
        "empty, truncated, bad-length and unknown-version packets are dropped; the session stays up",
        routing_malformed_dropped
    ),
    check!(
        "routing.ipv6_dropped",
        ["R5"],
        "IPv6 packets are dropped; the session stays up",
        routing_ipv6_dropped
    ),
    check!(
        "routing.larger_than_mtu",
        ["R5"],
        "a packet one byte larger than mtu is dropped; the session stays up",
        routing_larger_than_mtu
    ),
    check!(
        "routing.slow_receiver",
        ["R7"],
        "a client that stops reading does not slow the sessions sending to it",
        routing_slow_receiver
    ),
    check!(
        "errors.invalid_json",
        ["E1", "E3"],
        "invalid JSON after the handshake ends that session only; others continue and new ones are accepted",
        errors_invalid_json
    ),
    check!(
        "errors.unknown_type",
        ["E2"],
        "a control message of an unknown type is ignored; the session stays up",
        errors_unknown_type
    ),
    check!(
        "errors.auth_after_handshake",
        ["E2"],
        "auth after the handshake is ignored: no reply, same address, the session stays up",
        errors_auth_after_handshake
    ),
    check!(
        "errors.control_too_large",
        ["F2", "E3"],
        "a control message over 4096 bytes is not acted on; other sessions continue and new ones are accepted",
        errors_control_too_large
    ),
    check!(
        "errors.binary_too_large",
        ["F1", "E3"],
        "a message of max_frame_size bytes is accepted, one byte more ends that session only",
        errors_binary_too_large
    ),
    check!(
        "transport.not_found",
        ["F3"],
        "other paths, and the tunnel path without an upgrade, get a plain 404 that does not reveal a VPN",
        transport_not_found
    ),
    check!(
        "transport.bad_framing",
        ["F4"],
        "a framed message with compressed flag 1, an unknown kind or length 0 ends that session only (HTTP/2 and raw TLS)",
        transport_bad_framing
    ),
    check!(
        "compression.negotiation",
        ["C2"],
        "auth and reconnect offering no, unknown or lz4 compression succeed; the answer is absent or one the client offered",
        compression_negotiation
    ),
    check!(
        "compression.not_negotiated",
        ["C1"],
        "a client that offers nothing gets no compression field and only raw IP packets, also from a sender that negotiated lz4; its own lz4 frame is dropped and it stays up",
        compression_not_negotiated
    ),
    check!(
        "compression.lz4_delivered",
        ["C3", "C5"],
        "lz4 frames and raw packets in any mix arrive at a client without compression as the original packets and at an lz4 client raw or as frames decoding to them",
        compression_lz4_delivered
    ),
    check!(
        "compression.lz4_policy",
        ["C5", "P1"],
        "a decompressed packet is routed and policed like any: forged sources are dropped, an echo request to server_ip is answered",
        compression_lz4_policy
    ),
    check!(
        "compression.bad_frames_dropped",
        ["C4"],
        "lz4 frames with stated length 0, above mtu or not matching the block, an unknown tag, truncated or corrupt are dropped; the session stays up",
        compression_bad_frames_dropped
    ),
    check!(
        "offload.negotiation",
        ["G2"],
        "auth offering no, unknown or gso offload succeeds; the answer is absent or one the client offered",
        offload_negotiation
    ),
    check!(
        "offload.not_negotiated",
        ["G1", "G4"],
        "a client that offers nothing gets no offload field and a super-packet sent to it as valid plain segments; its own super-packet is dropped and it stays up",
        offload_not_negotiated
    ),
    check!(
        "offload.bad_envelopes",
        ["G3", "G4"],
        "super-packets with a mismatched or unknown kind, a tiny segment size, cut headers or a forged source are dropped; the session stays up",
        offload_bad_envelopes
    ),
    check!(
        "offload.routed",
        ["G4", "G5"],
        "a client offering offload and lz4 gets at most one of them; a super-packet reaches it whole or as valid segments, never compressed",
        offload_routed
    ),
    check!(
        "policy.rate_limit",
        ["P3"],
        "a rate-limited session gets at most burst + rate x time through each way, excess dropped not queued, and stays up (needs --rate-limit-bps)",
        policy_rate_limit
    ),
    check!(
        "concurrency.sessions",
        ["A2", "E3"],
        "--sessions sessions (default 200) handshake at once, get distinct addresses and each exchange a packet",
        concurrency_sessions
    ),
    check!(
        "handshake.pool_exhausted",
        ["H5"],
        "when no address is free the server answers pool_exhausted and closes (needs --exhaust-pool)",
        handshake_pool_exhausted
    ),
];

/// Statements of docs/PROTOCOL.md no check covers, and why.
pub static NOT_CHECKED: &[(&str, &str)] = &[
    (
        "A5",
        "needs a server restart, which a client cannot cause (the project's netns tests restart the real server: conformance/tests/netns_identity.rs)",
    ),
    (
        "H6",
        "depends on the server's limits.max_sessions_per_token, which a client cannot know; vpn/server/tests/hub_memory.rs checks it against the real session code",
    ),
    (
        "H7",
        "would throttle the suite's own source address for the rest of the run; vpn/server/tests/hub_memory.rs checks it against the real session code",
    ),
    (
        "K3",
        "depends on the server's limits.idle_timeout (unset by default); vpn/server/tests/hub_memory.rs checks it against the real session code",
    ),
    (
        "P2",
        "is what a client does with its own TUN device; a suite that tests servers has no client to watch",
    ),
];

fn token(cx: &Ctx) -> &str {
    &cx.target().token
}

/// Two authenticated sessions.
async fn pair(cx: &Ctx) -> Result<((Session, Grant), (Session, Grant)), Verdict> {
    let a = Session::auth(cx, token(cx))
        .await
        .map_err(|v| prefix(v, "session A"))?;
    let b = Session::auth(cx, token(cx))
        .await
        .map_err(|v| prefix(v, "session B"))?;
    Ok((a, b))
}

/// Proves `from` still routes to `to`: a fresh packet arrives byte for byte.
pub(super) async fn delivers(
    cx: &Ctx,
    from: &Session,
    fg: &Grant,
    to: &mut Session,
    tg: &Grant,
    when: &str,
) -> CheckResult {
    let p = Probe::ipv4(fg.ip, tg.ip, 64, "a probe");
    from.send(p.frame())
        .await
        .map_err(|v| prefix(v, &format!("{when}, {} → {}", fg.ip, tg.ip)))?;
    to.expect_packet(&p, cx.t().reply)
        .await
        .map_err(|v| prefix(v, &format!("{when}, {} → {}", fg.ip, tg.ip)))
}

/// Expects a refusal `{success:false, error}` and then the close.
async fn expect_refusal(cx: &Ctx, s: &mut Session, error: &str, after: &str) -> CheckResult {
    let text = s
        .next_control(cx.t().reply)
        .await
        .map_err(|v| prefix(v, &format!("after {after}")))?;
    let reply = parse_auth_reply(&text).map_err(|e| fail(format!("after {after}: {e}")))?;
    ensure!(
        !reply.success,
        "after {after}: the server accepted the session"
    );
    ensure!(
        reply.error.as_deref() == Some(error),
        "after {after}: expected error {error:?}, got {}",
        clip(&reply.raw.to_string())
    );
    s.expect_closed(cx.t().reply)
        .await
        .map_err(|v| prefix(v, &format!("after {after} and the refusal")))?;
    Ok(())
}

// ---------------------------------------------------------------- handshake

async fn handshake_auth_response(cx: Ctx) -> CheckResult {
    let (s, reply) = Session::hello(&cx, &auth(token(&cx), None)).await?;
    let Some(g) = reply.grant else {
        return Err(fail(format!(
            "valid token refused: {}",
            clip(&reply.raw.to_string())
        )));
    };
    g.check_address().map_err(fail)?;
    g.check_mtu().map_err(fail)?;
    ensure!(
        g.subnet.contains(&g.server_ip),
        "server_ip {} is outside subnet {}",
        g.server_ip,
        g.subnet
    );
    s.close(cx.t().reply).await;
    Ok(())
}

async fn handshake_unknown_fields(cx: Ctx) -> CheckResult {
    let hello = serde_json::json!({
        "type": "auth",
        "token": token(&cx),
        "x_conformance_unknown": {"nested": [1, 2, 3]},
        "x_conformance_flag": true,
    });
    let mut s = Session::dial(&cx, Pings::Answer).await?;
    s.send_text(&hello.to_string()).await?;
    let text = s.next_control(cx.t().reply).await?;
    let reply = parse_auth_reply(&text).map_err(fail)?;
    ensure!(
        reply.success,
        "auth with unknown fields refused: {}",
        clip(&reply.raw.to_string())
    );
    s.send_text(r#"{"type":"ping","seq":7,"x_conformance_unknown":"x"}"#)
        .await?;
    let deadline = Instant::now() + cx.t().reply;
    loop {
        match s.next_event_until(deadline).await {
            None => return Err(fail("ping with an unknown field got no pong")),
            Some(Event::Closed(_)) => {
                return Err(fail("the server closed on a ping with an unknown field"))
            }
            Some(Event::Control(b)) => {
                let v: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
                if v.get("type").and_then(Value::as_str) == Some("pong") {
                    break;
                }
            }
            Some(Event::Packet(_)) => {}
        }
    }
    s.close(cx.t().reply).await;
    Ok(())
}

async fn handshake_bad_token(cx: Ctx) -> CheckResult {
    let good = token(&cx).to_string();
    // One that extends the real token and one that shares nothing with it:
    // the reply must not tell them apart.
    let wrong = [format!("{good}-wrong"), "x".to_string()];
    let mut replies = Vec::new();
    for (i, w) in wrong.iter().enumerate() {
        let what = if i == 0 {
            "the token with a suffix"
        } else {
            "a short unrelated token"
        };
        let (mut s, reply) = Session::hello(&cx, &auth(w, None))
            .await
            .map_err(|v| prefix(v, what))?;
        ensure!(!reply.success, "{what} was accepted");
        ensure!(
            reply.error.as_deref() == Some("auth_failed"),
            "{what}: expected error \"auth_failed\", got {}",
            clip(&reply.raw.to_string())
        );
        if let Some(obj) = reply.raw.as_object() {
            let extra: Vec<_> = obj
                .keys()
                .filter(|k| !["type", "success", "error"].contains(&k.as_str()))
                .collect();
            ensure!(
                extra.is_empty(),
                "{what}: a failure must carry only type, success and error, also got {extra:?}"
            );
        }
        s.expect_closed(cx.t().reply)
            .await
            .map_err(|v| prefix(v, &format!("{what}, after auth_failed")))?;
        replies.push(reply.raw);
    }
    ensure!(
        replies[0] == replies[1],
        "the replies to two wrong tokens differ: {} vs {}",
        replies[0],
        replies[1]
    );
    Ok(())
}

async fn handshake_auth_timeout(cx: Ctx) -> CheckResult {
    let t = cx.t();
    let wait = t.auth_timeout + t.margin;
    if wait > t.max_wait {
        return Err(skip(format!(
            "would wait {wait:?} for the server's auth timeout, more than --max-wait {:?}",
            t.max_wait
        )));
    }
    let t0 = Instant::now();
    let mut s = Session::dial(&cx, Pings::Ignore).await?;
    let said = s
        .expect_closed(wait.saturating_sub(t0.elapsed()))
        .await
        .map_err(|v| prefix(v, "sent nothing"))?;
    let took = t0.elapsed();
    ensure!(
        took >= t.auth_timeout / 2,
        "closed after {took:.1?}, long before --auth-timeout {:?}: is that the server's limits.auth_timeout?",
        t.auth_timeout
    );
    for m in said {
        if let Ok(r) = parse_auth_reply(&m) {
            ensure!(
                !r.success,
                "the server sent a successful auth_response to a silent client"
            );
        }
    }
    Ok(())
}

async fn handshake_packet_before_auth(cx: Ctx) -> CheckResult {
    let mut s = Session::dial(&cx, Pings::Ignore).await?;
    let p = Probe::ipv4(
        Ipv4Addr::new(192, 0, 2, 10),
        Ipv4Addr::new(192, 0, 2, 11),
        64,
        "a packet",
    );
    s.send(p.frame()).await?;
    expect_refusal(&cx, &mut s, "auth_required", "a packet before auth").await
}

async fn handshake_wrong_first_message(cx: Ctx) -> CheckResult {
    for (first, what) in [
        (r#"{"type":"ping"}"#, "ping as the first message"),
        (
            r#"{"type":"x_conformance_hello","token":"x"}"#,
            "an unknown type as the first message",
        ),
    ] {
        let mut s = Session::dial(&cx, Pings::Ignore).await?;
        s.send_text(first).await?;
        expect_refusal(&cx, &mut s, "auth_required", what).await?;
    }
    Ok(())
}

async fn handshake_invalid_json(cx: Ctx) -> CheckResult {
    for (first, what) in [
        ("this is not json", "text that is not JSON"),
        (r#"{"type":"auth","token":"#, "a truncated JSON object"),
    ] {
        let mut s = Session::dial(&cx, Pings::Ignore).await?;
        s.send_text(first).await?;
        expect_refusal(&cx, &mut s, "invalid_message", what).await?;
    }
    Ok(())
}

async fn handshake_pool_exhausted(cx: Ctx) -> CheckResult {
    let target = cx.target();
    if !target.exhaust_pool {
        return Err(skip(
            "leaves every address held for the lease grace period; enable with --exhaust-pool",
        ));
    }
    let mut live = Vec::new();
    for n in 0..target.exhaust_limit {
        let (mut s, reply) = Session::hello(&cx, &auth(token(&cx), None)).await?;
        if let Some(g) = reply.grant {
            g.check_address()
                .map_err(|e| fail(format!("session {n}: {e}")))?;
            live.push((s, g));
            continue;
        }
        ensure!(
            reply.error.as_deref() == Some("pool_exhausted"),
            "after {n} sessions: expected error \"pool_exhausted\", got {}",
            clip(&reply.raw.to_string())
        );
        s.expect_closed(cx.t().reply)
            .await
            .map_err(|v| prefix(v, "after pool_exhausted"))?;
        // The sessions that have addresses are unaffected.
        if live.len() >= 2 {
            let (mut b, bg) = live.swap_remove(1);
            let (a, ag) = &live[0];
            delivers(&cx, a, ag, &mut b, &bg, "after the refusal").await?;
        }
        return Ok(());
    }
    Err(skip(format!(
        "no refusal after {} sessions: the pool is larger than --exhaust-limit",
        target.exhaust_limit
    )))
}

// ---------------------------------------------------------------- addresses

async fn address_unique(cx: Ctx) -> CheckResult {
    let n = 10;
    let sessions = join_all((0..n).map(|_| Session::auth(&cx, token(&cx)))).await;
    let mut seen: Vec<Ipv4Addr> = Vec::new();
    let mut keep = Vec::new();
    for (i, r) in sessions.into_iter().enumerate() {
        let (s, g) = r.map_err(|v| prefix(v, &format!("session {i}")))?;
        g.check_address().map_err(fail)?;
        ensure!(
            !seen.contains(&g.ip),
            "{} was given to two live sessions",
            g.ip
        );
        seen.push(g.ip);
        keep.push(s);
    }
    Ok(())
}

async fn address_sequential(cx: Ctx) -> CheckResult {
    // Let the server finish closing earlier checks' sessions: an address
    // freed during this check would rightly be given out below the others.
    tokio::time::sleep(cx.t().settle).await;
    let mut keep = Vec::new();
    let mut got: Vec<Ipv4Addr> = Vec::new();
    for i in 0..5 {
        let (s, g) = Session::auth(&cx, token(&cx))
            .await
            .map_err(|v| prefix(v, &format!("session {i}")))?;
        g.check_address().map_err(fail)?;
        if let Some(prev) = got.last() {
            ensure!(
                g.ip > *prev,
                "sessions opened one after another got {got:?} then {}: not the lowest free address each time",
                g.ip
            );
        }
        got.push(g.ip);
        keep.push(s);
    }
    Ok(())
}

async fn address_held_after_close(cx: Ctx) -> CheckResult {
    // Let the server finish closing earlier checks' sessions, so that no
    // lower address frees up during this one.
    tokio::time::sleep(cx.t().settle).await;
    let (a, ga) = Session::auth(&cx, token(&cx)).await?;
    a.close_and_wait(cx.t().reply).await;
    tokio::time::sleep(cx.t().settle).await;
    let (_b, gb) = Session::auth(&cx, token(&cx))
        .await
        .map_err(|v| prefix(v, "fresh session"))?;
    ensure!(
        gb.ip != ga.ip,
        "{} was given to a fresh session right after its session closed; it must be held for lease_grace",
        ga.ip
    );
    Ok(())
}

async fn address_held_for_other_token(cx: Ctx) -> CheckResult {
    let Some(token2) = cx.target().token2.clone() else {
        return Err(skip("needs a second identity: pass --token2"));
    };
    let (a, ga) = Session::auth(&cx, token(&cx)).await?;
    a.close_and_wait(cx.t().reply).await;
    tokio::time::sleep(cx.t().settle).await;
    let (_b, gb) = Session::auth_with(&cx, reconnect(&token2, ga.ip, None), Pings::Answer)
        .await
        .map_err(|v| prefix(v, "reconnect with --token2"))?;
    ensure!(
        gb.ip != ga.ip,
        "{} was held for --token and given to a reconnect with --token2",
        ga.ip
    );
    gb.check_address().map_err(fail)?;
    Ok(())
}

async fn address_reconnect_same(cx: Ctx) -> CheckResult {
    let (a, ga) = Session::auth(&cx, token(&cx)).await?;
    a.close_and_wait(cx.t().reply).await;
    tokio::time::sleep(cx.t().settle).await;
    let (_b, gb) = Session::auth_with(&cx, reconnect(token(&cx), ga.ip, None), Pings::Answer)
        .await
        .map_err(|v| prefix(v, "reconnect"))?;
    ensure!(
        gb.ip == ga.ip,
        "reconnect asking for its held address {} got {}",
        ga.ip,
        gb.ip
    );
    Ok(())
}

async fn address_reconnect_in_use(cx: Ctx) -> CheckResult {
    let (mut a, ga) = Session::auth(&cx, token(&cx)).await?;
    let (mut c, gc) = Session::auth_with(&cx, reconnect(token(&cx), ga.ip, None), Pings::Answer)
        .await
        .map_err(|v| prefix(v, "reconnect asking for a live session's address"))?;
    ensure!(
        gc.ip != ga.ip,
        "reconnect without client_id was given {}, which a live session holds",
        ga.ip
    );
    gc.check_address().map_err(fail)?;
    delivers(&cx, &c, &gc, &mut a, &ga, "the live session lost its route").await?;
    delivers(&cx, &a, &ga, &mut c, &gc, "after the reconnect").await?;
    Ok(())
}

async fn address_client_id_replaces(cx: Ctx) -> CheckResult {
    let id = format!("sallyport-conformance-{}", std::process::id());
    let (mut a, ga) = Session::auth_with(&cx, auth(token(&cx), Some(&id)), Pings::Answer).await?;
    let (mut b, gb) = Session::auth(&cx, token(&cx)).await?;
    let (mut c, gc) =
        Session::auth_with(&cx, reconnect(token(&cx), ga.ip, Some(&id)), Pings::Answer)
            .await
            .map_err(|v| prefix(v, "reconnect with the same client_id"))?;
    ensure!(
        gc.ip == ga.ip,
        "reconnect with the client_id of the live session holding {} got {}",
        ga.ip,
        gc.ip
    );
    a.expect_closed(cx.t().reply)
        .await
        .map_err(|v| prefix(v, "the replaced session"))?;
    delivers(&cx, &b, &gb, &mut c, &gc, "to the replacing session").await?;
    delivers(&cx, &c, &gc, &mut b, &gb, "from the replacing session").await?;
    Ok(())
}

async fn address_identity_lease(cx: Ctx) -> CheckResult {
    let id = format!("sallyport-conformance-lease-{}", std::process::id());
    let (a, ga) = Session::auth_with(&cx, auth(token(&cx), Some(&id)), Pings::Answer).await?;
    a.close_and_wait(cx.t().reply).await;
    tokio::time::sleep(cx.t().settle).await;
    let (_b, gb) = Session::auth_with(&cx, auth(token(&cx), Some(&id)), Pings::Answer)
        .await
        .map_err(|v| prefix(v, "auth with the same client_id"))?;
    ensure!(
        gb.ip == ga.ip,
        "the client_id whose session held {} got {} on its next auth",
        ga.ip,
        gb.ip
    );
    Ok(())
}

async fn address_identity_replaces(cx: Ctx) -> CheckResult {
    let id = format!("sallyport-conformance-live-{}", std::process::id());
    let (mut a, ga) = Session::auth_with(&cx, auth(token(&cx), Some(&id)), Pings::Answer).await?;
    let (_b, gb) = Session::auth_with(&cx, auth(token(&cx), Some(&id)), Pings::Answer)
        .await
        .map_err(|v| prefix(v, "auth with the client_id of a live session"))?;
    ensure!(
        gb.ip == ga.ip,
        "auth with the client_id of the live session holding {} got {}",
        ga.ip,
        gb.ip
    );
    a.expect_closed(cx.t().reply)
        .await
        .map_err(|v| prefix(v, "the replaced session"))?;
    Ok(())
}

async fn address_reconnect_free(cx: Ctx) -> CheckResult {
    let (a, ga) = Session::auth(&cx, token(&cx)).await?;
    let Some(top) = top_addresses(&ga, &[ga.ip], 1).first().copied() else {
        return Err(skip(format!("subnet {} has no spare address", ga.subnet)));
    };
    let (_b, gb) = Session::auth_with(&cx, reconnect(token(&cx), top, None), Pings::Answer)
        .await
        .map_err(|v| prefix(v, &format!("reconnect asking for {top}")))?;
    ensure!(
        gb.ip == top,
        "reconnect asking for {top} (free unless another client holds it) got {}",
        gb.ip
    );
    drop(a);
    Ok(())
}

async fn address_reconnect_reserved(cx: Ctx) -> CheckResult {
    let (_a, ga) = Session::auth(&cx, token(&cx)).await?;
    let asks = [
        (ga.server_ip, "server_ip"),
        (ga.subnet.network(), "the network address"),
        (ga.subnet.broadcast(), "the broadcast address"),
        (Ipv4Addr::new(192, 0, 2, 77), "an address outside subnet"),
    ];
    for (prev, what) in asks {
        let (_s, g) = Session::auth_with(&cx, reconnect(token(&cx), prev, None), Pings::Answer)
            .await
            .map_err(|v| prefix(v, &format!("reconnect asking for {what} {prev}")))?;
        g.check_address()
            .map_err(|e| fail(format!("reconnect asking for {what}: {e}")))?;
    }
    Ok(())
}

// ---------------------------------------------------------------- keepalive

async fn keepalive_ping_pong(cx: Ctx) -> CheckResult {
    let (mut s, _g) = Session::auth(&cx, token(&cx)).await?;
    let seq = 4_000_000_007;
    s.ping(Some(seq), cx.t().reply).await?;
    s.ping(None, cx.t().reply).await?;
    s.ping(Some(0), cx.t().reply).await?;
    Ok(())
}

async fn keepalive_server_pings(cx: Ctx) -> CheckResult {
    let (mut s, g) = Session::auth(&cx, token(&cx)).await?;
    let wait = g.keepalive() + cx.t().margin;
    if wait > cx.t().max_wait {
        return Err(skip(format!(
            "would wait {wait:?} for a server ping, more than --max-wait {:?}",
            cx.t().max_wait
        )));
    }
    let deadline = Instant::now() + wait;
    while s.pings_seen() == 0 {
        let step = (Instant::now() + Duration::from_millis(50)).min(deadline);
        if let Some(Event::Closed(_)) = s.next_event_until(step).await {
            return Err(fail(
                "the server closed the session while we waited for its ping",
            ));
        }
        if Instant::now() >= deadline {
            return Err(fail(format!(
                "no ping from the server within {wait:?} (keepalive_secs {:?})",
                g.keepalive_secs
            )));
        }
    }
    Ok(())
}

async fn keepalive_answered_stays_open(cx: Ctx) -> CheckResult {
    let (mut s, g) = Session::auth(&cx, token(&cx)).await?;
    let ka = g.keepalive();
    let watch = ka * 3 + ka / 2 + cx.t().margin;
    if watch > cx.t().max_wait {
        return Err(skip(format!(
            "would watch for {watch:?}, more than --max-wait {:?}",
            cx.t().max_wait
        )));
    }
    let deadline = Instant::now() + watch;
    while let Some(ev) = s.next_event_until(deadline).await {
        if let Event::Closed(_) = ev {
            return Err(fail(format!(
                "closed after answering {} pings (keepalive {ka:?}): pongs must count as traffic",
                s.pings_seen()
            )));
        }
    }
    ensure!(
        s.pings_seen() >= 3,
        "only {} server pings in {watch:?} (keepalive {ka:?})",
        s.pings_seen()
    );
    Ok(())
}

async fn keepalive_silence_closes(cx: Ctx) -> CheckResult {
    let (mut s, g) = Session::auth_with(&cx, auth(token(&cx), None), Pings::Ignore).await?;
    let ka = g.keepalive();
    let wait = ka * 3 + cx.t().margin;
    if wait > cx.t().max_wait {
        return Err(skip(format!(
            "would wait {wait:?} (3 keepalive intervals), more than --max-wait {:?}",
            cx.t().max_wait
        )));
    }
    let t0 = Instant::now();
    s.expect_closed(wait)
        .await
        .map_err(|v| prefix(v, "a client that sent nothing after the handshake"))?;
    let took = t0.elapsed();
    ensure!(
        took >= ka * 2,
        "closed after {took:.1?}, before 3 keepalive intervals of {ka:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------- routing

async fn routing_client_to_client(cx: Ctx) -> CheckResult {
    let ((mut a, ga), (mut b, gb)) = pair(&cx).await?;
    let mtu = usize::try_from(ga.mtu.min(gb.mtu)).unwrap_or(1280);
    for (len, what) in [(64, "a small packet"), (mtu, "an MTU-sized packet")] {
        let p = Probe::ipv4(ga.ip, gb.ip, len, what);
        a.send(p.frame()).await?;
        b.expect_packet(&p, cx.t().reply)
            .await
            .map_err(|v| prefix(v, &format!("{what} A → B")))?;
        let q = Probe::ipv4(gb.ip, ga.ip, len, what);
        b.send(q.frame()).await?;
        a.expect_packet(&q, cx.t().reply)
            .await
            .map_err(|v| prefix(v, &format!("{what} B → A")))?;
    }
    Ok(())
}

async fn routing_forged_source(cx: Ctx) -> CheckResult {
    let ((a, ga), (mut b, gb)) = pair(&cx).await?;
    let other = top_addresses(&ga, &[ga.ip, gb.ip], 1)
        .first()
        .copied()
        .unwrap_or(ga.server_ip);
    let forged = [
        Probe::ipv4(gb.ip, gb.ip, 64, "a packet forged with B's own source"),
        Probe::ipv4(
            other,
            gb.ip,
            64,
            "a packet forged with another subnet source",
        ),
        Probe::ipv4(
            ga.server_ip,
            gb.ip,
            64,
            "a packet forged with server_ip as source",
        ),
        Probe::ipv4(
            Ipv4Addr::new(192, 0, 2, 99),
            gb.ip,
            64,
            "a packet forged with an outside source",
        ),
    ];
    for p in &forged {
        a.send(p.frame()).await?;
    }
    b.expect_none(
        &forged.iter().collect::<Vec<_>>(),
        cx.t().quiet,
        Match::Marker,
    )
    .await
    .map_err(|v| prefix(v, "B"))?;
    delivers(&cx, &a, &ga, &mut b, &gb, "after forged packets").await
}

async fn routing_server_reachable(cx: Ctx) -> CheckResult {
    let (mut a, ga) = Session::auth(&cx, token(&cx)).await?;
    let p = Probe::echo_request(ga.ip, ga.server_ip);
    a.send(p.frame()).await?;
    a.expect_echo_reply(&p, ga.server_ip, cx.t().reply).await
}

async fn routing_to_server_not_echoed(cx: Ctx) -> CheckResult {
    let ((mut a, ga), (mut b, gb)) = pair(&cx).await?;
    let sent = [
        Probe::ipv4(ga.ip, ga.server_ip, 64, "the packet to server_ip"),
        Probe::ipv4(
            ga.ip,
            Ipv4Addr::new(192, 0, 2, 1),
            64,
            "the packet to an outside address",
        ),
    ];
    for p in &sent {
        a.send(p.frame()).await?;
    }
    let all: Vec<_> = sent.iter().collect();
    // The server's kernel may answer with an ICMP error quoting the packet:
    // the sender may see that, but never its own packet back.
    a.expect_none(&all, cx.t().quiet, Match::Exact)
        .await
        .map_err(|v| prefix(v, "A got its own packet back"))?;
    b.expect_none(&all, cx.t().quiet, Match::Marker)
        .await
        .map_err(|v| prefix(v, "B"))?;
    delivers(&cx, &a, &ga, &mut b, &gb, "afterwards").await
}

async fn routing_unknown_destination(cx: Ctx) -> CheckResult {
    let ((mut a, ga), (mut b, gb)) = pair(&cx).await?;
    let tops = top_addresses(&ga, &[ga.ip, gb.ip], 3);
    let Some(nobody) = tops.last().copied() else {
        return Err(skip(format!("subnet {} has no spare address", ga.subnet)));
    };
    let p = Probe::ipv4(ga.ip, nobody, 64, format!("the packet to unheld {nobody}"));
    a.send(p.frame()).await?;
    a.expect_none(&[&p], cx.t().quiet, Match::Exact)
        .await
        .map_err(|v| prefix(v, "A got its own packet back"))?;
    b.expect_none(&[&p], cx.t().quiet, Match::Marker)
        .await
        .map_err(|v| prefix(v, "B"))?;
    delivers(&cx, &a, &ga, &mut b, &gb, "afterwards").await
}

async fn routing_malformed_dropped(cx: Ctx) -> CheckResult {
    let ((a, ga), (mut b, gb)) = pair(&cx).await?;
    let valid = Probe::ipv4(ga.ip, gb.ip, 64, "").bytes;
    let mut bad_len = valid.clone();
    bad_len[2..4].copy_from_slice(&1000u16.to_be_bytes());
    let mut bad_ihl = valid.clone();
    bad_ihl[0] = 0x4f; // a 60-byte header in a shorter packet
    let mut v5 = valid.clone();
    v5[0] = 0x55;
    let cases = [
        Probe::raw(valid[..12].to_vec(), "a truncated IPv4 header (12 bytes)"),
        Probe::raw(bad_len, "a packet whose total length exceeds its size"),
        Probe::raw(
            bad_ihl[..40].to_vec(),
            "a packet whose header length exceeds its size",
        ),
        Probe::raw(v5, "a packet of IP version 5"),
    ];
    a.send(sallyport_core::Frame::Packet(bytes::Bytes::new()))
        .await
        .map_err(|v| prefix(v, "an empty packet"))?;
    for p in &cases {
        a.send(p.frame()).await?;
    }
    b.expect_none(
        &cases.iter().collect::<Vec<_>>(),
        cx.t().quiet,
        Match::Exact,
    )
    .await
    .map_err(|v| prefix(v, "B"))?;
    delivers(&cx, &a, &ga, &mut b, &gb, "after malformed packets").await
}

async fn routing_ipv6_dropped(cx: Ctx) -> CheckResult {
    let ((a, ga), (mut b, gb)) = pair(&cx).await?;
    let mapped = |ip: Ipv4Addr| ip.to_ipv6_mapped();
    let marker = Probe::ipv4(ga.ip, gb.ip, 36, "");
    let p = Probe::raw(
        build_ipv6(mapped(ga.ip), mapped(gb.ip), 59, &marker.bytes),
        "an IPv6 packet",
    );
    a.send(p.frame()).await?;
    b.expect_none(&[&p, &marker], cx.t().quiet, Match::Marker)
        .await
        .map_err(|v| prefix(v, "B"))?;
    delivers(&cx, &a, &ga, &mut b, &gb, "after an IPv6 packet").await
}

async fn routing_larger_than_mtu(cx: Ctx) -> CheckResult {
    let ((a, ga), (mut b, gb)) = pair(&cx).await?;
    let len = usize::try_from(ga.mtu).unwrap_or(65_535) + 1;
    if len > 65_535 {
        return Err(skip(format!(
            "mtu {} leaves no room for a larger IPv4 packet",
            ga.mtu
        )));
    }
    let p = Probe::ipv4(
        ga.ip,
        gb.ip,
        len,
        format!("a {len}-byte packet (mtu {})", ga.mtu),
    );
    a.send(p.frame()).await?;
    b.expect_none(&[&p], cx.t().quiet, Match::Marker)
        .await
        .map_err(|v| prefix(v, "B"))?;
    delivers(&cx, &a, &ga, &mut b, &gb, "after an oversized packet").await
}

/// Bytes the suite pushes at a client that does not read: more than the
/// socket buffers and queues between can absorb (a server that waits for the
/// slow client was caught from 8 MiB on over loopback; twice that for margin).
const FLOOD_BYTES: usize = 16 << 20;

async fn routing_slow_receiver(cx: Ctx) -> CheckResult {
    let (a, ga) = Session::auth(&cx, token(&cx)).await?;
    // B reads nothing (its queue is tiny), but talks, so that the server
    // does not close it for silence while the flood is under way.
    let (b, gb) = Session::auth_stalled(&cx, token(&cx)).await?;
    let talk = b.keep_talking(Duration::from_millis(250));
    let (mut c, gc) = Session::auth(&cx, token(&cx)).await?;
    let mtu = usize::try_from(ga.mtu).unwrap_or(1280).min(1400);
    let n = FLOOD_BYTES / mtu;
    let flood: Vec<_> = (0..n)
        .map(|_| Probe::ipv4(ga.ip, gb.ip, mtu, "").frame())
        .collect();
    let t0 = Instant::now();
    let sent = a.send_flood(flood, cx.t().reply).await;
    talk.abort();
    sent.map_err(|v| {
        prefix(
            v,
            &format!(
                "flooding B, which does not read, with {} MiB",
                FLOOD_BYTES >> 20
            ),
        )
    })?;
    delivers(
        &cx,
        &a,
        &ga,
        &mut c,
        &gc,
        "A → C right after flooding the stalled B",
    )
    .await
    .map_err(|v| prefix(v, &format!("(flood took {:.1?})", t0.elapsed())))?;
    drop(b);
    Ok(())
}

// ---------------------------------------------------------------- errors

/// After a session misbehaved: `b` still routes to a fresh session.
async fn others_unaffected(cx: &Ctx, b: &Session, gb: &Grant, after: &str) -> CheckResult {
    let (mut c, gc) = Session::auth(cx, token(cx))
        .await
        .map_err(|v| prefix(v, &format!("a fresh session after {after}")))?;
    delivers(
        cx,
        b,
        gb,
        &mut c,
        &gc,
        &format!("another session after {after}"),
    )
    .await
}

async fn errors_invalid_json(cx: Ctx) -> CheckResult {
    let ((mut a, _ga), (b, gb)) = pair(&cx).await?;
    a.send_text("{this is not json").await?;
    a.expect_closed(cx.t().reply)
        .await
        .map_err(|v| prefix(v, "after invalid JSON"))?;
    others_unaffected(&cx, &b, &gb, "invalid JSON").await
}

async fn errors_unknown_type(cx: Ctx) -> CheckResult {
    let ((a, ga), (mut b, gb)) = pair(&cx).await?;
    a.send_text(r#"{"type":"x_conformance_future","data":[1,2,3]}"#)
        .await?;
    delivers(&cx, &a, &ga, &mut b, &gb, "after an unknown message type").await
}

async fn errors_auth_after_handshake(cx: Ctx) -> CheckResult {
    let ((mut a, ga), (mut b, gb)) = pair(&cx).await?;
    a.send_control(&auth(token(&cx), None)).await?;
    let deadline = Instant::now() + cx.t().quiet;
    while let Some(ev) = a.next_event_until(deadline).await {
        match ev {
            Event::Closed(_) => return Err(fail("the server closed the session on a second auth")),
            Event::Control(t) => {
                return Err(fail(format!(
                    "a second auth was answered instead of ignored: {}",
                    clip(&String::from_utf8_lossy(&t))
                )))
            }
            Event::Packet(_) => {}
        }
    }
    delivers(&cx, &a, &ga, &mut b, &gb, "after a second auth").await?;
    delivers(
        &cx,
        &b,
        &gb,
        &mut a,
        &ga,
        "to the same address after a second auth",
    )
    .await
}

async fn errors_control_too_large(cx: Ctx) -> CheckResult {
    let ((mut a, _ga), (b, gb)) = pair(&cx).await?;
    let seq = 911_000_001u64;
    let pad = "x".repeat(5000);
    let big = format!(r#"{{"type":"ping","seq":{seq},"pad":"{pad}"}}"#);
    a.send_text(&big).await?;
    let deadline = Instant::now() + cx.t().quiet;
    while let Some(ev) = a.next_event_until(deadline).await {
        match ev {
            Event::Closed(_) => break,
            Event::Control(t) => {
                let v: Value = serde_json::from_slice(&t).unwrap_or(Value::Null);
                ensure!(
                    !(v.get("type").and_then(Value::as_str) == Some("pong")
                        && v.get("seq").and_then(Value::as_u64) == Some(seq)),
                    "a {}-byte ping was answered: control messages over 4096 bytes are a protocol error",
                    big.len()
                );
            }
            Event::Packet(_) => {}
        }
    }
    others_unaffected(&cx, &b, &gb, "an oversized control message").await
}

async fn errors_binary_too_large(cx: Ctx) -> CheckResult {
    let ((mut a, ga), (mut b, gb)) = pair(&cx).await?;
    let max = cx.target().max_frame;
    let message = |len: usize| {
        let mut p = Probe::ipv4(ga.ip, gb.ip, len.min(65_535), "").bytes;
        p.resize(len, 0);
        sallyport_core::Frame::Packet(p.into())
    };
    a.send(message(max))
        .await
        .map_err(|v| prefix(v, &format!("a {max}-byte message")))?;
    delivers(
        &cx,
        &a,
        &ga,
        &mut b,
        &gb,
        &format!("after a {max}-byte message (--max-frame)"),
    )
    .await?;
    // The server may close while the message is still being written.
    let _ = a.send(message(max + 1)).await;
    a.expect_closed(cx.t().reply)
        .await
        .map_err(|v| prefix(v, &format!("after a {}-byte message", max + 1)))?;
    others_unaffected(&cx, &b, &gb, "an oversized message").await
}

// ---------------------------------------------------------------- transport

async fn transport_not_found(cx: Ctx) -> CheckResult {
    if cx.transport() != Transport::Wss {
        return Err(skip("the HTTP paths belong to the WebSocket transport"));
    }
    let target = cx.target();
    let url =
        sallyport_transports::ws::Endpoint::parse(&target.url).map_err(|e| fail(e.to_string()))?;
    let path = url.url.path().to_string();
    let other = if path == "/" {
        "/sallyport-conformance-elsewhere".to_string()
    } else {
        format!("{}-elsewhere", path.trim_end_matches('/'))
    };
    let cases = [
        (other.clone(), vec![], format!("GET {other}")),
        (
            path.clone(),
            vec![],
            format!("GET {path} without an upgrade"),
        ),
        (
            path.clone(),
            vec![
                "Upgrade: websocket",
                "Connection: Upgrade",
                "Sec-WebSocket-Version: 13",
            ],
            format!("GET {path} with an upgrade but no Sec-WebSocket-Key"),
        ),
    ];
    for (p, headers, what) in cases {
        let r = http::get(target, &p, &headers, cx.t().reply)
            .await
            .map_err(|e| fail(format!("{what}: {e}")))?;
        ensure!(r.status == 404, "{what}: status {}, expected 404", r.status);
        let lower = r.text.to_ascii_lowercase();
        for word in ["sallyport", "vpn", "websocket", "tunnel"] {
            ensure!(
                !lower.contains(word),
                "{what}: the 404 mentions {word:?}: {}",
                clip(&r.text)
            );
        }
    }
    Ok(())
}

/// A framed message written byte by byte: the gRPC prefix (`flag`, then the
/// length of kind and payload) and the message.
fn framed(flag: u8, kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut m = vec![flag];
    m.extend_from_slice(&((payload.len() + 1) as u32).to_be_bytes());
    m.push(kind);
    m.extend_from_slice(payload);
    m
}

async fn transport_bad_framing(cx: Ctx) -> CheckResult {
    if cx.transport() == Transport::Wss {
        return Err(skip("not applicable to WebSocket"));
    }
    let (mut b, gb) = Session::auth(&cx, token(&cx))
        .await
        .map_err(|v| prefix(v, "session B"))?;
    let mut carried = Vec::new();
    for case in 0..3 {
        let mut a = Session::dial_raw(&cx).await?;
        a.send_control(&auth(token(&cx), None)).await?;
        let text = a.next_control(cx.t().reply).await?;
        let Some(ga) = parse_auth_reply(&text).map_err(fail)?.grant else {
            return Err(fail(format!(
                "auth refused with a valid token: {}",
                clip(&String::from_utf8_lossy(&text))
            )));
        };
        let (what, bytes) = match case {
            0 => {
                // Well-formed frames written the same way are carried: the
                // check's own framing is right.
                delivers(&cx, &a, &ga, &mut b, &gb, "a packet from a raw session").await?;
                let p = Probe::ipv4(ga.ip, gb.ip, 64, "the packet in a frame flagged compressed");
                let m = framed(1, 0x02, &p.bytes);
                carried.push(p);
                ("a framed message with compressed flag 1", m)
            }
            1 => {
                let p = Probe::ipv4(ga.ip, gb.ip, 64, "the packet in a frame of kind 0x09");
                let m = framed(0, 0x09, &p.bytes);
                carried.push(p);
                ("a framed message of unknown kind 0x09", m)
            }
            _ => ("a framed message of length 0", vec![0u8; 5]),
        };
        a.send_raw(&bytes).await?;
        a.expect_closed(cx.t().reply)
            .await
            .map_err(|v| prefix(v, &format!("after {what}")))?;
    }
    b.expect_none(
        &carried.iter().collect::<Vec<_>>(),
        cx.t().quiet,
        Match::Marker,
    )
    .await
    .map_err(|v| prefix(v, "B"))?;
    others_unaffected(&cx, &b, &gb, "malformed framed messages").await
}

// ---------------------------------------------------------------- compression

/// A session that offered `["lz4"]`; its grant says whether the server
/// accepted.
async fn auth_lz4(cx: &Ctx) -> Result<(Session, Grant), Verdict> {
    Session::auth_with(cx, auth_offering(token(cx), &["lz4"]), Pings::Answer).await
}

/// A session with lz4 negotiated, or the skip when the server offers none.
async fn lz4_session(cx: &Ctx, name: &str) -> Result<(Session, Grant), Verdict> {
    let (s, g) = auth_lz4(cx).await.map_err(|v| prefix(v, name))?;
    match g.compression.as_deref() {
        Some("lz4") => Ok((s, g)),
        None => Err(skip("server does not offer compression")),
        Some(other) => Err(fail(format!(
            "{name}: offered [\"lz4\"], the server answered compression {other:?}"
        ))),
    }
}

/// An IPv4 packet `len` bytes long that lz4 makes smaller, and its frame.
fn compressible(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    len: usize,
    what: impl Into<String>,
) -> Result<(Probe, Bytes), Verdict> {
    let p = Probe::ipv4(src, dst, len, what);
    let f = lz4::compress(&p.bytes).ok_or_else(|| {
        fail(format!(
            "internal: a {len}-byte probe does not compress (the mtu is too small?)"
        ))
    })?;
    Ok((p, f.into()))
}

/// The smaller of two grants' MTUs, as a length.
fn mtu_of(a: &Grant, b: &Grant) -> usize {
    usize::try_from(a.mtu.min(b.mtu)).unwrap_or(1280)
}

/// As [`delivers`], to a session that negotiated lz4 (the probe may come as
/// a frame).
async fn delivers_lz4(
    cx: &Ctx,
    from: &Session,
    fg: &Grant,
    to: &mut Session,
    tg: &Grant,
    when: &str,
) -> CheckResult {
    let p = Probe::ipv4(fg.ip, tg.ip, 64, "a probe");
    let ctx = || format!("{when}, {} → {}", fg.ip, tg.ip);
    from.send(p.frame()).await.map_err(|v| prefix(v, &ctx()))?;
    to.expect_packet_lz4(&p, mtu_of(fg, tg), cx.t().reply)
        .await
        .map_err(|v| prefix(v, &ctx()))
}

/// Whether the `compression` of an `auth_response` is absent or offered.
fn answer_was_offered(raw: &Value, offer: Option<&[&str]>, what: &str) -> CheckResult {
    match raw.get("compression") {
        None => Ok(()),
        Some(Value::String(c)) if offer.is_some_and(|o| o.contains(&c.as_str())) => Ok(()),
        Some(v) => Err(fail(format!(
            "{what}: the server answered compression {v}, which the client did not offer"
        ))),
    }
}

async fn compression_negotiation(cx: Ctx) -> CheckResult {
    let offers: [(Option<&[&str]>, &str); 5] = [
        (None, "auth without compression"),
        (Some(&[]), "auth offering []"),
        (
            Some(&["x-conformance-unknown"]),
            "auth offering only an unknown compression",
        ),
        (Some(&["lz4"]), "auth offering [\"lz4\"]"),
        (
            Some(&["x-conformance-unknown", "lz4"]),
            "auth offering an unknown compression and lz4",
        ),
    ];
    for (offer, what) in offers {
        let hello = match offer {
            None => auth(token(&cx), None),
            Some(o) => auth_offering(token(&cx), o),
        };
        let (_s, reply) = Session::hello(&cx, &hello)
            .await
            .map_err(|v| prefix(v, what))?;
        ensure!(
            reply.success,
            "{what} was refused: {}",
            clip(&reply.raw.to_string())
        );
        answer_was_offered(&reply.raw, offer, what)?;
    }
    let (_a, ga) = Session::auth(&cx, token(&cx)).await?;
    let offer: &[&str] = &["x-conformance-unknown"];
    let what = "reconnect offering only an unknown compression";
    let hello = Control::Reconnect(Reconnect {
        token: Token::new(token(&cx)),
        previous_ip: ga.server_ip,
        client_id: None,
        compression: Some(offer.iter().map(|s| s.to_string()).collect()),
        offload: None,
    });
    let (_s, reply) = Session::hello(&cx, &hello)
        .await
        .map_err(|v| prefix(v, what))?;
    ensure!(
        reply.success,
        "{what} was refused: {}",
        clip(&reply.raw.to_string())
    );
    answer_was_offered(&reply.raw, Some(offer), what)
}

impl Session {
    /// Waits for `want`, byte for byte, on a session that did not negotiate
    /// compression: every binary message meanwhile must be an IP packet [C1].
    async fn expect_plain_packet(&mut self, want: &Probe, within: Duration) -> CheckResult {
        let deadline = Instant::now() + within;
        loop {
            match self.next_event_until(deadline).await {
                None => return Err(fail(format!("the packet did not arrive within {within:?}"))),
                Some(Event::Closed(_)) => {
                    return Err(fail("the session was closed while waiting for a packet"))
                }
                Some(Event::Packet(p)) if lz4::is_extension(&p) => {
                    let carrying = lz4::decode_lenient(&p).is_some_and(|d| want.is_in(&d));
                    return Err(fail(format!(
                        "received an extension frame (first byte {:#04x}, {} bytes{}) though compression was not negotiated",
                        p[0],
                        p.len(),
                        if carrying { ", carrying the packet" } else { "" }
                    )));
                }
                Some(Event::Packet(p)) if p[..] == want.bytes[..] => return Ok(()),
                Some(Event::Packet(p)) if want.is_in(&p) => {
                    return Err(fail(format!(
                        "the packet arrived altered: {} bytes, sent {}",
                        p.len(),
                        want.bytes.len()
                    )))
                }
                Some(_) => continue,
            }
        }
    }
}

async fn compression_not_negotiated(cx: Ctx) -> CheckResult {
    // A offers lz4 (the server may accept it), B offers nothing.
    let (mut a, ga) = auth_lz4(&cx).await.map_err(|v| prefix(v, "session A"))?;
    let (mut b, reply) = Session::hello(&cx, &auth(token(&cx), None))
        .await
        .map_err(|v| prefix(v, "session B"))?;
    let Some(gb) = reply.grant.clone() else {
        return Err(fail(format!(
            "session B: auth refused with a valid token: {}",
            clip(&reply.raw.to_string())
        )));
    };
    if let Some(v) = reply.raw.get("compression") {
        return Err(fail(format!(
            "auth without compression got \"compression\":{v} in auth_response"
        )));
    }
    let a_lz4 = ga.compression.as_deref() == Some("lz4");
    let mtu = mtu_of(&ga, &gb);
    let p = Probe::ipv4(ga.ip, gb.ip, mtu, "an MTU-sized compressible packet");
    a.send(p.frame()).await?;
    b.expect_plain_packet(&p, cx.t().reply)
        .await
        .map_err(|v| prefix(v, "B, sent a compressible packet raw"))?;
    if a_lz4 {
        let (q, f) = compressible(ga.ip, gb.ip, mtu, "a packet A sent as an lz4 frame")?;
        a.send(Frame::Packet(f)).await?;
        b.expect_plain_packet(&q, cx.t().reply).await.map_err(|v| {
            prefix(
                v,
                "B, sent a packet as an lz4 frame by A, which negotiated lz4",
            )
        })?;
    }
    // B's own lz4 frame: a malformed packet, dropped; B stays up.
    let (r, f) = compressible(
        gb.ip,
        ga.ip,
        mtu,
        "the packet inside an lz4 frame from B, which did not negotiate compression",
    )?;
    b.send(Frame::Packet(f)).await?;
    a.expect_none(&[&r], cx.t().quiet, Match::Marker)
        .await
        .map_err(|v| prefix(v, "A"))?;
    let after = Probe::ipv4(gb.ip, ga.ip, 64, "a probe after B's lz4 frame");
    b.send(after.frame()).await?;
    let arrived = if a_lz4 {
        a.expect_packet_lz4(&after, mtu, cx.t().reply).await
    } else {
        a.expect_packet(&after, cx.t().reply).await
    };
    arrived.map_err(|v| prefix(v, "B → A after B's lz4 frame"))
}

/// Sends `A → to` lz4 frames and raw packets in a mix, one at a time, and
/// expects each at `to`: byte for byte when it has no compression, raw or
/// as a frame decoding to it when it negotiated lz4.
async fn mix_arrives(
    cx: &Ctx,
    a: &Session,
    ga: &Grant,
    to: &mut Session,
    tg: &Grant,
    name: &str,
) -> CheckResult {
    let mtu = mtu_of(ga, tg);
    let negotiated = tg.compression.as_deref() == Some("lz4");
    let mid = 600.min(mtu);
    for (len, framed, what) in [
        (mtu, true, "an MTU-sized packet as an lz4 frame"),
        (64, false, "a small raw packet"),
        (mid, true, "a medium packet as an lz4 frame"),
        (mtu, false, "an MTU-sized raw packet"),
    ] {
        let p = if framed {
            let (p, f) = compressible(ga.ip, tg.ip, len, what)?;
            a.send(Frame::Packet(f)).await?;
            p
        } else {
            let p = Probe::ipv4(ga.ip, tg.ip, len, what);
            a.send(p.frame()).await?;
            p
        };
        let arrived = if negotiated {
            to.expect_packet_lz4(&p, mtu, cx.t().reply).await
        } else {
            to.expect_plain_packet(&p, cx.t().reply).await
        };
        arrived.map_err(|v| prefix(v, &format!("{what} A → {name}")))?;
    }
    Ok(())
}

async fn compression_lz4_delivered(cx: Ctx) -> CheckResult {
    let (mut a, ga) = lz4_session(&cx, "session A").await?;
    let (mut b, gb) = Session::auth(&cx, token(&cx))
        .await
        .map_err(|v| prefix(v, "session B"))?;
    let (mut c, gc) = lz4_session(&cx, "session C").await?;
    mix_arrives(&cx, &a, &ga, &mut b, &gb, "B (no compression)").await?;
    mix_arrives(&cx, &a, &ga, &mut c, &gc, "C (lz4)").await?;
    mix_arrives(&cx, &c, &gc, &mut a, &ga, "A (lz4)").await?;
    // And B's raw packets reach the lz4 sessions.
    delivers_lz4(&cx, &b, &gb, &mut a, &ga, "B (no compression) → A (lz4)").await
}

async fn compression_lz4_policy(cx: Ctx) -> CheckResult {
    let (mut a, ga) = lz4_session(&cx, "session A").await?;
    let (mut b, gb) = lz4_session(&cx, "session B").await?;
    let mtu = mtu_of(&ga, &gb);
    let other = top_addresses(&ga, &[ga.ip, gb.ip], 1)
        .first()
        .copied()
        .unwrap_or(ga.server_ip);
    let mut forged = Vec::new();
    for (src, what) in [
        (gb.ip, "an lz4 frame of a packet forged with B's own source"),
        (
            other,
            "an lz4 frame of a packet forged with another subnet source",
        ),
        (
            ga.server_ip,
            "an lz4 frame of a packet forged with server_ip as source",
        ),
        (
            Ipv4Addr::new(192, 0, 2, 99),
            "an lz4 frame of a packet forged with an outside source",
        ),
    ] {
        let (p, f) = compressible(src, gb.ip, mtu, what)?;
        a.send(Frame::Packet(f)).await?;
        forged.push(p);
    }
    b.expect_none(
        &forged.iter().collect::<Vec<_>>(),
        cx.t().quiet,
        Match::Marker,
    )
    .await
    .map_err(|v| prefix(v, "B"))?;
    // Routing applies to the decompressed packet: an echo request for
    // server_ip goes to the server's TUN, and the reply comes back.
    let echo = Probe::echo_request_padded(ga.ip, ga.server_ip, mtu.min(600));
    let f = lz4::compress(&echo.bytes)
        .ok_or_else(|| fail("internal: the padded echo request does not compress"))?;
    a.send(Frame::Packet(f.into())).await?;
    a.expect_echo_reply(&echo, ga.server_ip, cx.t().reply)
        .await
        .map_err(|v| prefix(v, "an echo request to server_ip sent as an lz4 frame"))?;
    delivers_lz4(&cx, &a, &ga, &mut b, &gb, "after forged lz4 frames").await
}

async fn compression_bad_frames_dropped(cx: Ctx) -> CheckResult {
    let (a, ga) = lz4_session(&cx, "session A").await?;
    let (mut b, gb) = lz4_session(&cx, "session B").await?;
    let mtu = mtu_of(&ga, &gb);
    let len = 600.min(mtu);
    let stated = |n: usize| u16::try_from(n).unwrap_or(u16::MAX);
    let mut probes = Vec::new();
    let mut frames: Vec<(String, Vec<u8>)> = Vec::new();
    let mut case = |p: Probe, tag: u8, n: usize| {
        let f = lz4::frame_with(tag, stated(n), &lz4::block(&p.bytes));
        frames.push((p.what().to_string(), f));
        probes.push(p);
    };
    case(
        Probe::ipv4(
            ga.ip,
            gb.ip,
            len,
            "the packet in a frame of stated length 0",
        ),
        lz4::TAG_LZ4,
        0,
    );
    if mtu < 65_535 {
        case(
            Probe::ipv4(
                ga.ip,
                gb.ip,
                mtu + 1,
                format!("the {}-byte packet in a frame stating mtu + 1", mtu + 1),
            ),
            lz4::TAG_LZ4,
            mtu + 1,
        );
    }
    case(
        Probe::ipv4(
            ga.ip,
            gb.ip,
            len,
            "the packet in a frame stating one byte more",
        ),
        lz4::TAG_LZ4,
        len + 1,
    );
    case(
        Probe::ipv4(
            ga.ip,
            gb.ip,
            len,
            "the packet in a frame stating one byte less",
        ),
        lz4::TAG_LZ4,
        len - 1,
    );
    case(
        Probe::ipv4(
            ga.ip,
            gb.ip,
            len,
            "the packet in a frame of unknown tag 0x02",
        ),
        0x02,
        len,
    );
    frames.push(("a truncated frame".into(), vec![lz4::TAG_LZ4, 0x02]));
    frames.push((
        "a frame whose block is not lz4".into(),
        lz4::frame_with(lz4::TAG_LZ4, stated(len), &[0xff; 40]),
    ));
    for (what, f) in frames {
        a.send(Frame::Packet(f.into()))
            .await
            .map_err(|v| prefix(v, &what))?;
    }
    b.expect_none(
        &probes.iter().collect::<Vec<_>>(),
        cx.t().quiet,
        Match::Marker,
    )
    .await
    .map_err(|v| prefix(v, "B"))?;
    delivers_lz4(&cx, &a, &ga, &mut b, &gb, "after malformed lz4 frames").await
}

// ---------------------------------------------------------------- policy

/// Floods `to` from `from` with identical packets, many times more than the
/// rate lets through; returns an error when more arrive than the bucket
/// allows, or fewer than its burst.
async fn police(
    cx: &Ctx,
    from: &Session,
    fg: &Grant,
    to: &mut Session,
    tg: &Grant,
    rl: &super::RateLimit,
) -> CheckResult {
    let t = cx.t();
    let pkt = 1000.min(mtu_of(fg, tg));
    let rate = rl.bytes_per_sec as f64;
    let burst = rl.burst_bytes as f64;
    // The server may read what we sent up to a reply timeout late, earning
    // tokens meanwhile: allow for that, and send three times as much.
    let lag = t.reply.as_secs_f64();
    let n = ((3.0 * (burst + rate * (lag + 0.5))) / pkt as f64).ceil() as usize;
    let p = Probe::ipv4(fg.ip, tg.ip, pkt, "");
    let t0 = Instant::now();
    from.send_flood(vec![p.frame(); n], t.reply).await?;
    let sent_for = t0.elapsed();
    // Count what arrives until it stops (a queueing server keeps going).
    let stop = Instant::now() + t.reply * 2;
    let mut got = 0usize;
    let mut last = Instant::now();
    loop {
        let step = (Instant::now() + t.quiet).min(stop);
        match to.next_event_until(step).await {
            None => break,
            Some(Event::Closed(_)) => {
                return Err(fail(format!(
                    "the receiving session was closed after {got} of {n} packets"
                )))
            }
            Some(Event::Packet(q)) if q[..] == p.bytes[..] => {
                got += 1;
                last = Instant::now();
            }
            Some(_) => {}
        }
        if Instant::now() >= stop {
            break;
        }
    }
    let bytes = (got * pkt) as u64;
    let earned = (rate * (sent_for.as_secs_f64() + lag)).ceil() as u64;
    let allowed = rl.burst_bytes + earned + pkt as u64;
    ensure!(
        bytes <= allowed,
        "{got} of {n} {pkt}-byte packets arrived ({bytes} bytes, the last {:.1?} after sending ended, which took {sent_for:.1?}): more than the burst of {burst} bytes and {rate} bytes/s allow",
        last.saturating_duration_since(t0 + sent_for)
    );
    ensure!(
        bytes + pkt as u64 >= rl.burst_bytes.min((n * pkt) as u64),
        "only {got} of {n} {pkt}-byte packets arrived: less than the burst of {burst} bytes (is --rate-limit-burst right?)"
    );
    // Tokens for a probe, then the session still routes.
    let refill = Duration::from_secs_f64((200.0 / rate).max(0.1)).min(t.max_wait);
    tokio::time::sleep(refill).await;
    delivers(cx, from, fg, to, tg, "after the flood").await
}

async fn policy_rate_limit(cx: Ctx) -> CheckResult {
    let Some(rl) = cx.target().rate_limit.clone() else {
        return Err(skip(
            "needs the server's rate limit: pass --rate-limit-bps (and --rate-limit-token, --rate-limit-burst)",
        ));
    };
    let limited = rl.token.clone().unwrap_or_else(|| token(&cx).to_string());
    let (mut a, ga) = Session::auth(&cx, &limited)
        .await
        .map_err(|v| prefix(v, "the rate-limited session A"))?;
    let (mut b, gb) = Session::auth(&cx, token(&cx))
        .await
        .map_err(|v| prefix(v, "session B"))?;
    police(&cx, &a, &ga, &mut b, &gb, &rl)
        .await
        .map_err(|v| prefix(v, "A (limited) → B"))?;
    police(&cx, &b, &gb, &mut a, &ga, &rl)
        .await
        .map_err(|v| prefix(v, "B → A (limited)"))
}

// ---------------------------------------------------------------- concurrency

/// Addresses the other checks of one run leave held (about 100, rounded up).
const OTHER_CHECKS_HOLD: u64 = 110;

async fn concurrency_sessions(cx: Ctx) -> CheckResult {
    let n = cx.target().sessions;
    if n < 2 {
        return Err(skip("--sessions must be at least 2"));
    }
    let (probe, g) = Session::auth(&cx, token(&cx)).await?;
    drop(probe);
    let capacity = (1u64 << (32 - u32::from(g.subnet.prefix_len()))).saturating_sub(3);
    if n as u64 + OTHER_CHECKS_HOLD > capacity {
        return Err(skip(format!(
            "subnet {} has {capacity} addresses; {n} sessions on top of the ~{OTHER_CHECKS_HOLD} the other checks hold would exhaust it: use a larger subnet or pass --sessions {}",
            g.subnet,
            capacity.saturating_sub(OTHER_CHECKS_HOLD)
        )));
    }
    // Dial in waves: the check is about sessions held at once, not about the
    // server's accept backlog.
    let gate = Arc::new(tokio::sync::Semaphore::new(32));
    let t0 = Instant::now();
    let opened = join_all((0..n).map(|_| {
        let (cx, gate) = (cx.clone(), gate.clone());
        async move {
            let _permit = gate.acquire().await;
            Session::auth(&cx, token(&cx)).await
        }
    }))
    .await;
    let mut sessions = Vec::with_capacity(n);
    for (i, r) in opened.into_iter().enumerate() {
        sessions.push(r.map_err(|v| prefix(v, &format!("session {i} of {n}")))?);
    }
    let handshakes = t0.elapsed();
    let mut addrs: Vec<Ipv4Addr> = sessions.iter().map(|(_, g)| g.ip).collect();
    for (_, g) in &sessions {
        g.check_address().map_err(fail)?;
    }
    addrs.sort_unstable();
    addrs.dedup();
    ensure!(
        addrs.len() == n,
        "{n} live sessions got only {} distinct addresses",
        addrs.len()
    );
    // Session i sends one packet to session i+1 (the last to the first).
    let probes: Vec<Probe> = (0..n)
        .map(|i| Probe::ipv4(sessions[i].1.ip, sessions[(i + 1) % n].1.ip, 100, ""))
        .collect();
    for (i, p) in probes.iter().enumerate() {
        sessions[i]
            .0
            .send(p.frame())
            .await
            .map_err(|v| prefix(v, &format!("session {i}")))?;
    }
    let within = cx.t().reply * 2;
    let results = join_all(sessions.iter_mut().enumerate().map(|(j, (s, _))| {
        let p = &probes[(j + n - 1) % n];
        async move { s.expect_packet(p, within).await }
    }))
    .await;
    let missing: Vec<usize> = results
        .iter()
        .enumerate()
        .filter(|(_, r)| r.is_err())
        .map(|(j, _)| j)
        .collect();
    ensure!(
        missing.is_empty(),
        "{} of {n} sessions did not receive their packet (first: session {}: {:?}); handshakes took {handshakes:.1?}",
        missing.len(),
        missing[0],
        results[missing[0]]
    );
    Ok(())
}

/// How `expect_none` recognises a packet it must not see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Match {
    /// The same bytes.
    Exact,
    /// Anything carrying the probe's marker (also quoted inside another packet).
    Marker,
}

impl Session {
    /// Watches for `within` that none of `probes` arrives and that the
    /// session stays open.
    pub(crate) async fn expect_none(
        &mut self,
        probes: &[&Probe],
        within: Duration,
        how: Match,
    ) -> CheckResult {
        let deadline = Instant::now() + within;
        while let Some(ev) = self.next_event_until(deadline).await {
            match ev {
                Event::Closed(_) => return Err(fail("the session was closed unexpectedly")),
                Event::Packet(p) => {
                    // A probe let through inside an lz4 frame counts too.
                    let inner = lz4::is_extension(&p)
                        .then(|| lz4::decode_lenient(&p))
                        .flatten();
                    for probe in probes {
                        let hit = |x: &[u8]| match how {
                            Match::Exact => x == &probe.bytes[..],
                            Match::Marker => probe.is_in(x),
                        };
                        ensure!(!hit(&p), "received {} ({} bytes)", probe.what(), p.len());
                        ensure!(
                            !inner.as_deref().is_some_and(hit),
                            "received {} inside an lz4 frame ({} bytes)",
                            probe.what(),
                            p.len()
                        );
                    }
                }
                Event::Control(_) => {}
            }
        }
        Ok(())
    }
}
