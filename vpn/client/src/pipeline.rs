//! The client's packet pipeline: the order of the layers, in one place
//! ([`new_session`]).
//!
//! Built for each session once the server has assigned an address and
//! answered the compression offer. Layers the config switches off are left
//! out with `option_layer`. Both stacks end in [`Passthrough`]: the pumps in
//! `lib.rs` write the result to the tunnel (encap) or the TUN (decap).

use std::net::Ipv4Addr;

use sallyport_core::PacketBatch;
use sallyport_middleware::{
    AntiSpoofLayer, Check, CompressLayer, DecompressLayer, Direction, MiddlewareError, Passthrough,
    StatsHandle, StatsLayer,
};
use tower::{Service, ServiceBuilder};

use crate::config::PipelineSection;

/// What is bound into one session's pipeline.
#[derive(Debug, Clone)]
pub struct SessionTarget {
    /// The assigned address.
    pub addr: Ipv4Addr,
    /// The session's MTU (decompression never produces more).
    pub mtu: u16,
    /// Whether the server accepted lz4.
    pub compression: bool,
    /// Where to count.
    pub stats: StatsHandle,
}

/// A session's stack, from its inside to its outside or back.
pub trait PacketStack:
    Service<PacketBatch, Response = PacketBatch, Error = MiddlewareError, Future: Send> + Send
{
}

impl<S> PacketStack for S where
    S: Service<PacketBatch, Response = PacketBatch, Error = MiddlewareError, Future: Send> + Send
{
}

/// Builds the two stacks of a session.
///
/// Encap (from the TUN, outermost first): anti-spoof by source, compress,
/// stats on wire bytes. Decap (from the server): stats on wire bytes,
/// decompress, anti-spoof by destination.
pub fn new_session(
    cfg: &PipelineSection,
    t: &SessionTarget,
) -> (impl PacketStack, impl PacketStack) {
    let stats = &t.stats;
    let encap = ServiceBuilder::new()
        .option_layer(cfg.anti_spoof.then(|| {
            AntiSpoofLayer::new(Check::Source, t.addr, None, stats.clone(), Direction::Encap)
        }))
        .option_layer(
            t.compression
                .then(|| CompressLayer::new(cfg.compression_threshold_bytes, stats.clone())),
        )
        .option_layer(
            cfg.stats
                .then(|| StatsLayer::new(stats.clone(), Direction::Encap)),
        )
        .service(Passthrough);
    let decap = ServiceBuilder::new()
        .option_layer(
            cfg.stats
                .then(|| StatsLayer::new(stats.clone(), Direction::Decap)),
        )
        .option_layer(
            t.compression
                .then(|| DecompressLayer::new(usize::from(t.mtu), stats.clone())),
        )
        .option_layer(cfg.anti_spoof.then(|| {
            AntiSpoofLayer::new(
                Check::Destination,
                t.addr,
                None,
                stats.clone(),
                Direction::Decap,
            )
        }))
        .service(Passthrough);
    (encap, decap)
}
