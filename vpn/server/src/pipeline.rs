//! The server's per-session packet pipeline: the order of the layers, in one
//! place ([`NewPipeline::new_session`]).
//!
//! Built once per session when it is established (linkerd's `NewService`
//! pattern): the assigned address, the rate and the stats handle are bound
//! then, so the packet path does no lookups. Layers the config switches off
//! are left out with `option_layer`.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::task::{Context, Poll};

use sallyport_core::PacketBatch;
use sallyport_middleware::{
    AntiSpoofLayer, Check, CompressLayer, DecompressLayer, Direction, DropReason, MiddlewareError,
    Passthrough, Rate, RateLimitLayer, StatsHandle, StatsLayer,
};
use tokio_util::sync::PollSender;
use tower::{Service, ServiceBuilder};

use crate::hub::Hub;

/// What every session's pipeline shares: the switches from the config.
#[derive(Debug, Clone)]
pub struct NewPipeline {
    /// `[pipeline] anti_spoof`.
    pub anti_spoof: bool,
    /// `[pipeline] stats`.
    pub stats: bool,
    /// `[compression] threshold_bytes`.
    pub compression_threshold: usize,
    /// Largest packet after decompression.
    pub mtu: u16,
}

/// What is bound into one session's pipeline.
#[derive(Debug, Clone)]
pub struct SessionTarget {
    /// The session's assigned address.
    pub addr: Ipv4Addr,
    /// Its rate limit, each direction; `None`: unlimited.
    pub rate: Option<Rate>,
    /// Whether lz4 was negotiated.
    pub compression: bool,
    /// Global and session counters.
    pub stats: StatsHandle,
}

impl NewPipeline {
    /// Builds the two stacks of a session.
    ///
    /// Decap (from the client, outermost first): stats on wire bytes,
    /// decompress, anti-spoof by source, rate limit on tunnel bytes, then the
    /// hub's router. Encap (towards the client): rate limit on tunnel bytes,
    /// compress, stats on wire bytes, then back to the session writer.
    pub fn new_session(
        &self,
        t: &SessionTarget,
        router: HubRouter,
    ) -> (
        impl Service<PacketBatch, Response = (), Error = MiddlewareError, Future: Send> + Send,
        impl Service<PacketBatch, Response = PacketBatch, Error = MiddlewareError, Future: Send> + Send,
    ) {
        let stats = &t.stats;
        let decap = ServiceBuilder::new()
            .option_layer(
                self.stats
                    .then(|| StatsLayer::new(stats.clone(), Direction::Decap)),
            )
            .option_layer(
                t.compression
                    .then(|| DecompressLayer::new(usize::from(self.mtu), stats.clone())),
            )
            .option_layer(self.anti_spoof.then(|| {
                AntiSpoofLayer::new(Check::Source, t.addr, None, stats.clone(), Direction::Decap)
            }))
            .option_layer(
                t.rate
                    .map(|r| RateLimitLayer::new(r, stats.clone(), Direction::Decap)),
            )
            .service(router);
        let encap = ServiceBuilder::new()
            .option_layer(
                t.rate
                    .map(|r| RateLimitLayer::new(r, stats.clone(), Direction::Encap)),
            )
            .option_layer(
                t.compression
                    .then(|| CompressLayer::new(self.compression_threshold, stats.clone())),
            )
            .option_layer(
                self.stats
                    .then(|| StatsLayer::new(stats.clone(), Direction::Encap)),
            )
            .service(Passthrough);
        (decap, encap)
    }
}

/// The innermost decap service: routes through the hub. Ready when the TUN
/// writer's queue has room, so a slow TUN slows the session's reader (and
/// the client's TCP) rather than losing packets.
pub struct HubRouter {
    hub: Arc<Hub>,
    to_tun: PollSender<PacketBatch>,
}

impl HubRouter {
    /// A router into `hub`.
    pub fn new(hub: Arc<Hub>) -> Self {
        let to_tun = PollSender::new(hub.tun_sender());
        Self { hub, to_tun }
    }
}

impl Service<PacketBatch> for HubRouter {
    type Response = ();
    type Error = MiddlewareError;
    type Future = std::future::Ready<Result<(), MiddlewareError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.to_tun
            .poll_reserve(cx)
            .map_err(|_| MiddlewareError::Closed("the TUN writer"))
    }

    fn call(&mut self, mut batch: PacketBatch) -> Self::Future {
        let to_tun = self.hub.route_from_client(&mut batch);
        let to_tun = self.hub.write_to_tun(to_tun);
        if to_tun.is_empty() {
            self.to_tun.abort_send();
        } else {
            let n = to_tun.len() as u64;
            self.hub.tun_queued();
            if self.to_tun.send_item(to_tun).is_err() {
                self.hub.tun_written();
                self.hub
                    .stats()
                    .record_drops(Direction::Decap, DropReason::TunUnavailable, n);
            }
        }
        std::future::ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use bytes::Bytes;
    use sallyport_core::ip::build_ipv4;
    use tokio::sync::mpsc;
    use tower::ServiceExt;

    use crate::pool::IpPool;

    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
    const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 2);

    fn hub(capacity: usize) -> (Arc<Hub>, mpsc::Receiver<PacketBatch>) {
        let subnet = "10.100.0.0/24".parse().expect("net");
        let (tx, rx) = mpsc::channel(capacity);
        let pool = IpPool::new(subnet, SERVER, Duration::from_secs(1));
        (Arc::new(Hub::new(pool, subnet, SERVER, tx)), rx)
    }

    fn to_server() -> PacketBatch {
        vec![Bytes::from(build_ipv4(CLIENT, SERVER, 1, b"x"))].into()
    }

    #[tokio::test(start_paused = true)]
    async fn the_router_is_ready_only_while_the_tun_queue_has_room() {
        let (hub, mut tun) = hub(1);
        let mut router = HubRouter::new(hub);
        router
            .ready()
            .await
            .expect("room")
            .call(to_server())
            .await
            .expect("routed");
        let mut ready = std::pin::pin!(async { router.ready().await.map(|_| ()) });
        assert!(
            futures::poll!(ready.as_mut()).is_pending(),
            "a full TUN queue holds the reader back"
        );
        assert_eq!(tun.recv().await.expect("batch").len(), 1);
        ready.await.expect("room again");
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_with_nothing_for_the_tun_gives_its_slot_back() {
        let (hub, mut tun) = hub(1);
        let mut router = HubRouter::new(hub.clone());
        let nobody: PacketBatch = vec![Bytes::from(build_ipv4(
            CLIENT,
            Ipv4Addr::new(10, 100, 0, 9),
            1,
            b"x",
        ))]
        .into();
        for _ in 0..3 {
            router
                .ready()
                .await
                .expect("room")
                .call(nobody.clone())
                .await
                .expect("ok");
        }
        assert_eq!(
            hub.stats().dropped(Direction::Decap, DropReason::NoRoute),
            3
        );
        assert!(tun.try_recv().is_err(), "nothing was sent to the TUN");
        drop(tun);
        let err = router.ready().await.map(|_| ()).expect_err("closed");
        assert!(matches!(err, MiddlewareError::Closed(_)), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn switched_off_layers_are_left_out() {
        let (hub, _tun) = hub(4);
        let stats = StatsHandle::detached();
        let new = NewPipeline {
            anti_spoof: false,
            stats: false,
            compression_threshold: 128,
            mtu: 1420,
        };
        let target = SessionTarget {
            addr: CLIENT,
            rate: None,
            compression: false,
            stats: stats.clone(),
        };
        let (mut decap, mut encap) = new.new_session(&target, HubRouter::new(hub));
        // A forged source passes (anti-spoof off), nothing is counted (stats off).
        let forged: PacketBatch = vec![Bytes::from(build_ipv4(
            Ipv4Addr::new(10, 100, 0, 99),
            SERVER,
            1,
            b"x",
        ))]
        .into();
        decap
            .ready()
            .await
            .expect("ready")
            .call(forged)
            .await
            .expect("ok");
        let out = encap
            .ready()
            .await
            .expect("ready")
            .call(to_server())
            .await
            .expect("ok");
        assert_eq!(out, to_server());
        let c = stats.global_counters();
        assert_eq!(c.dropped_total(DropReason::Spoofed), 0);
        assert_eq!(c.packets(Direction::Decap) + c.packets(Direction::Encap), 0);
    }
}
