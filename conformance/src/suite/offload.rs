//! Checks of segmentation offload (docs/PROTOCOL.md §11): negotiation, what a
//! client that did not agree receives, and what happens to bad envelopes.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sallyport_core::ip::{build_ipv4, checksum, Ipv4Header};
use sallyport_core::offload::{OFFLOAD_GSO, TAG_GSO};
use sallyport_core::Frame;
use serde_json::Value;

use super::checks::delivers;
use super::session::{auth, auth_extensions, clip, prefix, Event, Grant, Probe, Session};
use super::{fail, lz4, skip, CheckResult, Ctx, Verdict};

const TCP: u8 = 6;
const SEQ: u32 = 1000;

fn token(cx: &Ctx) -> &str {
    &cx.target().token
}

/// A TCP super-packet `src` → `dst` as Linux hands one out, and its payload.
struct SuperPacket {
    envelope: Vec<u8>,
    payload: Vec<u8>,
    segment: u16,
    probe: Probe,
}

impl SuperPacket {
    /// `segments` segments of `segment` payload bytes (the last one half full).
    fn new(src: Ipv4Addr, dst: Ipv4Addr, segments: usize, segment: u16, what: &str) -> Self {
        // A fresh marker, recognisable in any segment that carries it.
        let marker = Probe::ipv4(src, dst, 36, "").bytes[20..36].to_vec();
        let seg = usize::from(segment);
        let len = seg * (segments - 1) + seg / 2;
        let mut payload = marker.clone();
        payload.extend((payload.len()..len).map(|i| (i % 241) as u8));
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&40_000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&5201u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&SEQ.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = 0x18; // PSH, ACK: PSH belongs to the last segment only
        tcp[14..16].copy_from_slice(&65_535u16.to_be_bytes());
        // The partial checksum: the pseudo-header sum without the length.
        let partial = !checksum(&pseudo_header(src, dst, 0));
        tcp[16..18].copy_from_slice(&partial.to_be_bytes());
        tcp.extend_from_slice(&payload);
        let ip = build_ipv4(src, dst, TCP, &tcp);
        let [hi, lo] = segment.to_be_bytes();
        let mut envelope = vec![TAG_GSO, 1, hi, lo];
        envelope.extend_from_slice(&ip);
        SuperPacket {
            envelope,
            payload,
            segment,
            probe: Probe::raw(marker, what),
        }
    }

    fn frame(&self) -> Frame {
        Frame::Packet(Bytes::copy_from_slice(&self.envelope))
    }

    /// The same envelope with its header bytes 1..4 replaced and the IP packet
    /// cut to `ip_len` bytes (if given).
    fn altered(&self, kind: u8, segment: u16, ip_len: Option<usize>) -> Frame {
        let mut e = self.envelope.clone();
        e[1] = kind;
        e[2..4].copy_from_slice(&segment.to_be_bytes());
        if let Some(n) = ip_len {
            e.truncate(4 + n);
        }
        Frame::Packet(e.into())
    }
}

fn pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, len: u16) -> Vec<u8> {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[0, TCP]);
    p.extend_from_slice(&len.to_be_bytes());
    p
}

/// Checks one segment the way a receiving kernel would; returns its payload.
fn check_segment(p: &[u8], i: usize, last: bool, sp: &SuperPacket) -> Result<Vec<u8>, String> {
    let h = Ipv4Header::parse(p).map_err(|e| format!("segment {i} is not IPv4: {e}"))?;
    if h.protocol != TCP || h.total_len != p.len() {
        return Err(format!(
            "segment {i}: protocol {} and total length {} for a {}-byte TCP packet",
            h.protocol,
            h.total_len,
            p.len()
        ));
    }
    if checksum(&p[..h.header_len]) != 0 {
        return Err(format!("segment {i}: wrong IPv4 header checksum"));
    }
    let tcp = &p[h.header_len..];
    if tcp.len() < 20 || usize::from(tcp[12] >> 4) * 4 != 20 {
        return Err(format!("segment {i}: TCP header altered"));
    }
    let mut sum = pseudo_header(h.src, h.dst, tcp.len() as u16);
    sum.extend_from_slice(tcp);
    if checksum(&sum) != 0 {
        return Err(format!("segment {i}: wrong TCP checksum"));
    }
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let want = SEQ.wrapping_add(u32::from(sp.segment) * i as u32);
    if seq != want {
        return Err(format!(
            "segment {i}: sequence number {seq}, expected {want}"
        ));
    }
    if !last && tcp.len() - 20 != usize::from(sp.segment) {
        return Err(format!(
            "segment {i}: {} payload bytes, the segment size is {}",
            tcp.len() - 20,
            sp.segment
        ));
    }
    if (tcp[13] & 0x08 != 0) != last {
        return Err(format!(
            "segment {i}: PSH must be set on the last segment only"
        ));
    }
    Ok(tcp[20..].to_vec())
}

impl Session {
    /// Waits for `sp` to arrive cut into plain segments (a peer that did not
    /// agree to offload) [G1][G4]; with `whole_ok`, also accepts it whole;
    /// with `lz4_ok` (the peer agreed to compression), segments may come as
    /// lz4 frames, but the super-packet itself never does [G5].
    async fn expect_super(
        &mut self,
        sp: &SuperPacket,
        whole_ok: bool,
        lz4_ok: bool,
        within: Duration,
    ) -> CheckResult {
        let deadline = Instant::now() + within;
        let mut segments: Vec<Bytes> = Vec::new();
        let mut got = 0usize;
        while got < sp.payload.len() {
            let Some(ev) = self.next_event_until(deadline).await else {
                return Err(fail(format!(
                    "{} did not arrive within {within:?} ({got} of {} payload bytes in {} segments)",
                    sp.probe.what(),
                    sp.payload.len(),
                    segments.len()
                )));
            };
            let p = match ev {
                Event::Closed(_) => return Err(fail("the session was closed while waiting")),
                Event::Packet(p) => p,
                Event::Control(_) => continue,
            };
            let p = match p.first() {
                Some(0x01) if lz4_ok => match lz4::decode(&p, 65_535) {
                    Ok(d) if d.first() == Some(&TAG_GSO) => {
                        return Err(fail(format!(
                            "received a super-packet as an lz4 frame ({} bytes) [G5]",
                            p.len()
                        )))
                    }
                    Ok(d) => Bytes::from(d),
                    Err(e) => return Err(fail(format!("received a bad lz4 frame: {e}"))),
                },
                _ => p,
            };
            match p.first() {
                Some(&TAG_GSO) if whole_ok && p[..] == sp.envelope[..] => return Ok(()),
                Some(&TAG_GSO) => {
                    return Err(fail(format!(
                        "received a super-packet ({} bytes){}",
                        p.len(),
                        if whole_ok {
                            ", altered"
                        } else {
                            " though offload was not agreed"
                        }
                    )))
                }
                Some(0x01) => {
                    return Err(fail(format!(
                        "received an lz4 frame ({} bytes) though compression was not agreed",
                        p.len()
                    )))
                }
                _ => {}
            }
            let from_us = Ipv4Header::parse(&p).is_ok_and(|h| {
                h.protocol == TCP && p.len() > 40 && {
                    let seq = u32::from_be_bytes([p[24], p[25], p[26], p[27]]);
                    seq.wrapping_sub(SEQ) < sp.payload.len() as u32
                }
            });
            if from_us {
                got += p.len() - 40;
                segments.push(p);
            }
        }
        let n = segments.len();
        let mut data = Vec::new();
        for (i, p) in segments.iter().enumerate() {
            data.extend(check_segment(p, i, i + 1 == n, sp).map_err(fail)?);
        }
        if data != sp.payload {
            return Err(fail(
                "the segments' payload differs from the super-packet's",
            ));
        }
        Ok(())
    }
}

/// A session offering offload, and whether the server agreed.
async fn gso_session(
    cx: &Ctx,
    compression: &[&str],
    name: &str,
) -> Result<(Session, Grant, bool), Verdict> {
    let hello = auth_extensions(token(cx), compression, &[OFFLOAD_GSO]);
    let (s, reply) = Session::hello(cx, &hello)
        .await
        .map_err(|v| prefix(v, name))?;
    let Some(g) = reply.grant.clone() else {
        return Err(fail(format!(
            "{name}: auth refused with a valid token: {}",
            clip(&reply.raw.to_string())
        )));
    };
    let agreed = g.offload.as_deref() == Some(OFFLOAD_GSO);
    Ok((s, g, agreed))
}

async fn plain_session(cx: &Ctx, name: &str) -> Result<(Session, Grant), Verdict> {
    let (s, reply) = Session::hello(cx, &auth(token(cx), None))
        .await
        .map_err(|v| prefix(v, name))?;
    let Some(g) = reply.grant.clone() else {
        return Err(fail(format!(
            "{name}: auth refused with a valid token: {}",
            clip(&reply.raw.to_string())
        )));
    };
    if let Some(v) = reply.raw.get("offload") {
        return Err(fail(format!(
            "{name}: auth without an offload offer got \"offload\":{v} [G1]"
        )));
    }
    Ok((s, g))
}

pub(super) async fn offload_negotiation(cx: Ctx) -> CheckResult {
    let offers: [(&[&str], &str); 4] = [
        (&[], "auth offering offload []"),
        (
            &["x-conformance-unknown"],
            "auth offering only an unknown offload",
        ),
        (&[OFFLOAD_GSO], "auth offering [\"gso\"]"),
        (
            &["x-conformance-unknown", OFFLOAD_GSO],
            "auth offering an unknown offload and gso",
        ),
    ];
    for (offer, what) in offers {
        let (_s, reply) = Session::hello(&cx, &auth_extensions(token(&cx), &[], offer))
            .await
            .map_err(|v| prefix(v, what))?;
        if !reply.success {
            return Err(fail(format!(
                "{what} was refused: {}",
                clip(&reply.raw.to_string())
            )));
        }
        match reply.raw.get("offload") {
            None => {}
            Some(Value::String(o)) if offer.contains(&o.as_str()) => {}
            Some(v) => {
                return Err(fail(format!(
                    "{what}: the server answered offload {v}, which the client did not offer"
                )))
            }
        }
    }
    Ok(())
}

pub(super) async fn offload_not_negotiated(cx: Ctx) -> CheckResult {
    let t = cx.t();
    let (mut a, ga, agreed) = gso_session(&cx, &[], "session A").await?;
    let (mut b, gb) = plain_session(&cx, "session B").await?;
    if agreed {
        let sp = SuperPacket::new(ga.ip, gb.ip, 3, 500, "a super-packet A → B");
        a.send(sp.frame()).await?;
        b.expect_super(&sp, false, false, t.reply)
            .await
            .map_err(|v| prefix(v, "B, which did not agree to offload"))?;
    }
    // B's own super-packet: malformed, dropped; B stays up.
    let sp = SuperPacket::new(
        gb.ip,
        ga.ip,
        3,
        500,
        "a super-packet from B, which did not agree",
    );
    b.send(sp.frame()).await?;
    a.expect_none(&[&sp.probe], t.quiet, super::checks::Match::Marker)
        .await
        .map_err(|v| prefix(v, "A"))?;
    delivers(&cx, &b, &gb, &mut a, &ga, "after B's super-packet").await
}

pub(super) async fn offload_bad_envelopes(cx: Ctx) -> CheckResult {
    let t = cx.t();
    let (a, ga, agreed) = gso_session(&cx, &[], "session A").await?;
    if !agreed {
        return Err(skip("the server did not agree to offload"));
    }
    let (mut b, gb) = plain_session(&cx, "session B").await?;
    let sp = SuperPacket::new(ga.ip, gb.ip, 3, 500, "a malformed super-packet");
    let bad: [(Frame, &str); 6] = [
        (sp.altered(4, 500, None), "kind TCPv6 on an IPv4 packet"),
        (sp.altered(5, 500, None), "kind UDP on a TCP packet"),
        (sp.altered(2, 500, None), "an unknown kind"),
        (sp.altered(1, 8, None), "a segment size of 8"),
        (
            sp.altered(1, 500, Some(30)),
            "a packet cut inside its TCP header",
        ),
        (
            sp.altered(1, 500, Some(10)),
            "a packet cut inside its IP header",
        ),
    ];
    for (frame, what) in bad {
        a.send(frame).await.map_err(|v| prefix(v, what))?;
    }
    let forged = SuperPacket::new(
        Ipv4Addr::new(192, 0, 2, 99),
        gb.ip,
        3,
        500,
        "a super-packet with a forged source",
    );
    a.send(forged.frame()).await?;
    let deadline = Instant::now() + t.quiet;
    while let Some(ev) = b.next_event_until(deadline).await {
        match ev {
            Event::Closed(_) => return Err(fail("B: the session was closed unexpectedly")),
            Event::Packet(p) if sp.probe.is_in(&p) || forged.probe.is_in(&p) => {
                return Err(fail(format!(
                    "B received part of a malformed or forged super-packet ({} bytes)",
                    p.len()
                )))
            }
            Event::Packet(p) if Ipv4Header::parse(&p).is_ok_and(|h| h.protocol == TCP) => {
                return Err(fail(format!(
                    "B received a TCP packet ({} bytes) cut from a malformed super-packet",
                    p.len()
                )))
            }
            _ => {}
        }
    }
    delivers(
        &cx,
        &a,
        &ga,
        &mut b,
        &gb,
        "after A's malformed super-packets",
    )
    .await
}

pub(super) async fn offload_routed(cx: Ctx) -> CheckResult {
    let t = cx.t();
    let (a, ga, agreed) = gso_session(&cx, &[], "session A").await?;
    if !agreed {
        return Err(skip("the server did not agree to offload"));
    }
    let (mut c, gc, c_agreed) = gso_session(&cx, &["lz4"], "session C").await?;
    if c_agreed && gc.compression.is_some() {
        return Err(fail(
            "C offered offload and lz4, and the server agreed to both [G5]",
        ));
    }
    let sp = SuperPacket::new(ga.ip, gc.ip, 4, 1200, "a super-packet A → C");
    a.send(sp.frame()).await?;
    let lz4_ok = gc.compression.as_deref() == Some("lz4");
    c.expect_super(&sp, c_agreed, lz4_ok, t.reply)
        .await
        .map_err(|v| prefix(v, "C, which offered offload and lz4"))
}
