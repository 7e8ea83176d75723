//! Sallyport's I/O-free core.
//!
//! What every other crate agrees on: a [`Frame`] (what crosses a transport), a
//! [`PacketBatch`] (the unit of work on the packet path), read-only IP header
//! views ([`ip`]) and the JSON control messages of the wire protocol ([`message`]).
//!
//! This crate must not depend on sockets, TLS, TUN devices or an async runtime:
//! everything here is plain data and pure functions, testable without I/O.

pub mod batch;
pub mod frame;
pub mod ip;
pub mod message;
pub mod offload;

pub use batch::{PacketBatch, MAX_BATCH};
pub use frame::Frame;
