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
        if to_tun.is_empty() {
            self.to_tun.abort_send();
        } else {
            let n = to_tun.len() as u64;
            if self.to_tun.send_item(to_tun).is_err() {
                self.hub
                    .stats()
                    .record_drops(Direction::Decap, DropReason::TunUnavailable, n);
            }
        }
        std::future::ready(Ok(()))
    }
}
