//! Anti-spoofing: a session may only send from, or receive to, its own
//! assigned address.
//!
//! On the server, packets from a client are checked by source. On the client,
//! packets read from the TUN are checked by source before they are sent, and
//! packets from the server by destination before they reach the TUN. IPv6 is
//! dropped (and counted as [`DropReason::Ipv6`]) unless the session was given
//! an IPv6 address. Anything that is not a valid IP packet is dropped as
//! [`DropReason::Malformed`].

use std::net::{Ipv4Addr, Ipv6Addr};
use std::task::{Context, Poll};

use sallyport_core::ip::IpHeader;
use sallyport_core::PacketBatch;
use tower_layer::Layer;
use tower_service::Service;

use crate::stats::{Direction, DropReason, StatsHandle};

/// Which address of a packet must be the session's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The source (what a client sends).
    Source,
    /// The destination (what a client receives).
    Destination,
}

/// Drops packets whose checked address is not the session's.
#[derive(Debug, Clone)]
pub struct AntiSpoofLayer {
    check: Check,
    v4: Ipv4Addr,
    v6: Option<Ipv6Addr>,
    stats: StatsHandle,
    dir: Direction,
}

impl AntiSpoofLayer {
    /// Checks `check` against the assigned `v4` (and `v6`, when the session
    /// has one); drops are counted into `stats` as traffic in `dir`.
    pub fn new(
        check: Check,
        v4: Ipv4Addr,
        v6: Option<Ipv6Addr>,
        stats: StatsHandle,
        dir: Direction,
    ) -> Self {
        Self {
            check,
            v4,
            v6,
            stats,
            dir,
        }
    }
}

impl<S> Layer<S> for AntiSpoofLayer {
    type Service = AntiSpoof<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AntiSpoof {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`AntiSpoofLayer`].
#[derive(Debug, Clone)]
pub struct AntiSpoof<S> {
    inner: S,
    layer: AntiSpoofLayer,
}

impl AntiSpoofLayer {
    fn verdict(&self, packet: &[u8]) -> Result<(), DropReason> {
        // A super-packet's header is its first segment's (PROTOCOL.md §11).
        match IpHeader::parse(sallyport_core::offload::ip_bytes(packet)) {
            Ok(IpHeader::V4(h)) => {
                let addr = match self.check {
                    Check::Source => h.src,
                    Check::Destination => h.dst,
                };
                if addr == self.v4 {
                    Ok(())
                } else {
                    Err(DropReason::Spoofed)
                }
            }
            Ok(IpHeader::V6(h)) => {
                let Some(mine) = self.v6 else {
                    return Err(DropReason::Ipv6);
                };
                let addr = match self.check {
                    Check::Source => h.src,
                    Check::Destination => h.dst,
                };
                if addr == mine {
                    Ok(())
                } else {
                    Err(DropReason::Spoofed)
                }
            }
            Err(_) => Err(DropReason::Malformed),
        }
    }
}

impl<S> Service<PacketBatch> for AntiSpoof<S>
where
    S: Service<PacketBatch>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut batch: PacketBatch) -> Self::Future {
        let mut drops = [0u64; DropReason::COUNT];
        let layer = &self.layer;
        batch.retain(|p| match layer.verdict(p) {
            Ok(()) => true,
            Err(reason) => {
                drops[reason as usize] += 1;
                false
            }
        });
        for reason in DropReason::ALL {
            layer
                .stats
                .record_drops(layer.dir, reason, drops[reason as usize]);
        }
        self.inner.call(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use sallyport_core::ip::{build_ipv4, build_ipv6};
    use tower_test::{assert_request_eq, mock};

    const ME: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 2);
    const OTHER: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 3);

    fn v4(src: Ipv4Addr, dst: Ipv4Addr) -> Bytes {
        Bytes::from(build_ipv4(src, dst, 17, b"payload"))
    }

    fn v6(src: &str, dst: &str) -> Bytes {
        Bytes::from(build_ipv6(
            src.parse().expect("v6"),
            dst.parse().expect("v6"),
            59,
            b"x",
        ))
    }

    fn layer(check: Check, v6: Option<Ipv6Addr>, stats: &StatsHandle) -> AntiSpoofLayer {
        AntiSpoofLayer::new(check, ME, v6, stats.clone(), Direction::Decap)
    }

    #[tokio::test(start_paused = true)]
    async fn a_forged_source_is_dropped_and_counted_and_the_rest_passes_in_order() {
        let stats = StatsHandle::detached();
        let (mut svc, mut handle) =
            mock::spawn_layer::<PacketBatch, (), _>(layer(Check::Source, None, &stats));
        let good1 = v4(ME, OTHER);
        let forged = v4(OTHER, ME);
        let good2 = v4(ME, Ipv4Addr::new(8, 8, 8, 8));
        tokio_test::assert_ready_ok!(svc.poll_ready());
        let fut = svc.call(vec![good1.clone(), forged, good2.clone()].into());
        assert_request_eq!(handle, PacketBatch::from(vec![good1, good2])).send_response(());
        fut.await.expect("a drop is not an error");
        let c = stats.global_counters();
        assert_eq!(c.dropped(Direction::Decap, DropReason::Spoofed), 1);
        assert_eq!(c.dropped_total(DropReason::Malformed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn destination_check_drops_packets_for_other_addresses() {
        let stats = StatsHandle::detached();
        let (mut svc, mut handle) =
            mock::spawn_layer::<PacketBatch, (), _>(layer(Check::Destination, None, &stats));
        let mine = v4(OTHER, ME);
        tokio_test::assert_ready_ok!(svc.poll_ready());
        let fut = svc.call(vec![v4(OTHER, OTHER), mine.clone(), v4(ME, OTHER)].into());
        assert_request_eq!(handle, PacketBatch::from(vec![mine])).send_response(());
        fut.await.expect("ok");
        assert_eq!(
            stats
                .global_counters()
                .dropped(Direction::Decap, DropReason::Spoofed),
            2
        );
    }

    #[tokio::test(start_paused = true)]
    async fn ipv6_is_dropped_as_ipv6_without_an_ipv6_address() {
        let stats = StatsHandle::detached();
        let (mut svc, mut handle) =
            mock::spawn_layer::<PacketBatch, (), _>(layer(Check::Source, None, &stats));
        tokio_test::assert_ready_ok!(svc.poll_ready());
        let fut = svc.call(vec![v6("fd00::2", "fd00::3")].into());
        assert_request_eq!(handle, PacketBatch::new()).send_response(());
        fut.await.expect("ok");
        let c = stats.global_counters();
        assert_eq!(c.dropped(Direction::Decap, DropReason::Ipv6), 1);
        assert_eq!(c.dropped_total(DropReason::Spoofed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn ipv6_is_checked_when_the_session_has_an_ipv6_address() {
        let stats = StatsHandle::detached();
        let mine: Ipv6Addr = "fd00::2".parse().expect("v6");
        let (mut svc, mut handle) =
            mock::spawn_layer::<PacketBatch, (), _>(layer(Check::Source, Some(mine), &stats));
        let good = v6("fd00::2", "fd00::3");
        tokio_test::assert_ready_ok!(svc.poll_ready());
        let fut = svc.call(vec![v6("fd00::9", "fd00::3"), good.clone()].into());
        assert_request_eq!(handle, PacketBatch::from(vec![good])).send_response(());
        fut.await.expect("ok");
        let c = stats.global_counters();
        assert_eq!(c.dropped_total(DropReason::Spoofed), 1);
        assert_eq!(c.dropped_total(DropReason::Ipv6), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn garbage_is_dropped_as_malformed() {
        let stats = StatsHandle::detached();
        let (mut svc, mut handle) =
            mock::spawn_layer::<PacketBatch, (), _>(layer(Check::Source, None, &stats));
        tokio_test::assert_ready_ok!(svc.poll_ready());
        let fut = svc.call(
            vec![
                Bytes::new(),
                Bytes::from_static(&[0x45, 0, 0]),
                Bytes::from_static(&[0x01, 0, 20, 1, 2]),
            ]
            .into(),
        );
        assert_request_eq!(handle, PacketBatch::new()).send_response(());
        fut.await.expect("ok");
        assert_eq!(
            stats.global_counters().dropped_total(DropReason::Malformed),
            3
        );
    }

    #[tokio::test(start_paused = true)]
    async fn backpressure_from_the_inner_service_is_passed_on() {
        let stats = StatsHandle::detached();
        let (mut svc, mut handle) =
            mock::spawn_layer::<PacketBatch, (), _>(layer(Check::Source, None, &stats));
        handle.allow(0);
        tokio_test::assert_pending!(svc.poll_ready());
        handle.allow(1);
        tokio_test::assert_ready_ok!(svc.poll_ready());
    }

    #[tokio::test(start_paused = true)]
    async fn an_inner_error_is_passed_through() {
        let stats = StatsHandle::detached();
        let (mut svc, mut handle) =
            mock::spawn_layer::<PacketBatch, (), _>(layer(Check::Source, None, &stats));
        tokio_test::assert_ready_ok!(svc.poll_ready());
        let fut = svc.call(vec![v4(ME, OTHER)].into());
        let (_, send) = handle.next_request().await.expect("request");
        send.send_error(crate::MiddlewareError::Closed("test"));
        assert!(fut.await.is_err());
    }
}
