//! Sallyport's packet pipeline as `tower` layers.
//!
//! Each module exports a `FooLayer` (configuration, `Clone`) and a `Foo<S>`
//! service over [`PacketBatch`]es, in the style of tower-http:
//!
//! - [`anti_spoof`]: drops packets whose source (or destination) is not the
//!   session's assigned address;
//! - [`compress`]: lz4 compression of single packets and its bounded inverse;
//! - [`rate_limit`]: a token bucket on bytes per second, policing (drops);
//! - [`stats`]: packet, byte, drop and compression counters as atomics.
//!
//! The synchronous work happens in `call`, and the inner service's future is
//! passed through (`type Future = S::Future`): nothing is boxed per call.
//!
//! A policy drop is not an error: the packet is removed from the batch and
//! counted by [`DropReason`], and the rest of the batch goes on. The batch may
//! become empty; inner services must treat an empty batch as nothing to do.
//! An `Err` from a service ends the session.
//!
//! This crate knows nothing of sockets, TLS, TUN devices or transports, and
//! must not depend on them. It reads tokio's clock (so that tests can pause
//! time) and nothing else of tokio.

pub mod anti_spoof;
pub mod compress;
pub mod rate_limit;
pub mod sink;
pub mod stats;

pub use anti_spoof::{AntiSpoof, AntiSpoofLayer, Check};
pub use compress::{Compress, CompressLayer, Decompress, DecompressLayer};
pub use rate_limit::{Rate, RateLimit, RateLimitLayer};
pub use sink::{NullSink, Passthrough};
pub use stats::{Counters, Direction, DropReason, Stats, StatsHandle, StatsLayer};

pub use sallyport_core::PacketBatch;

/// Why a pipeline could not go on: the session that owns it ends.
#[derive(Debug, thiserror::Error)]
pub enum MiddlewareError {
    /// What the pipeline delivers into is gone (e.g. the TUN writer stopped).
    #[error("{0} is closed")]
    Closed(&'static str),
}
