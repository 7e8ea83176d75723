//! Innermost services for stacks whose output is written by a pump.
//!
//! A pump (the session writer, the client's TUN and tunnel loops) owns the
//! I/O; the stack in front of it is pure. [`Passthrough`] hands the processed
//! batch back to the pump. [`NullSink`] discards it, for benchmarks.

use std::future::{ready, Ready};
use std::task::{Context, Poll};

use sallyport_core::PacketBatch;
use tower_service::Service;

use crate::MiddlewareError;

/// Returns the batch as the response: the caller writes it out.
#[derive(Debug, Clone, Copy, Default)]
pub struct Passthrough;

impl Service<PacketBatch> for Passthrough {
    type Response = PacketBatch;
    type Error = MiddlewareError;
    type Future = Ready<Result<PacketBatch, MiddlewareError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, batch: PacketBatch) -> Self::Future {
        ready(Ok(batch))
    }
}

/// Discards every batch, counting packets, for benchmarks.
#[derive(Debug, Clone, Copy, Default)]
pub struct NullSink {
    /// Packets received so far.
    pub packets: u64,
}

impl Service<PacketBatch> for NullSink {
    type Response = ();
    type Error = MiddlewareError;
    type Future = Ready<Result<(), MiddlewareError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, batch: PacketBatch) -> Self::Future {
        self.packets += batch.len() as u64;
        ready(Ok(()))
    }
}
