//! Sallyport's conformance suite and shared test helpers.
//!
//! [`suite`] checks any server against docs/PROTOCOL.md over each transport;
//! the `sallyport-conformance` binary runs it. [`lab`] builds a
//! network-namespace lab (a server namespace and client namespaces on a veth
//! underlay in 198.18.0.0/15) and runs the real binaries in it; the end-to-end
//! tests, the demo and the benchmarks use it. [`certs`] makes throwaway
//! certificates. [`impair`] delays and drops packets in a lab's router
//! namespace (the `sallyport-impair` binary), where `tc netem` is missing.
//! [`load`] is the load generator behind `sallyport-load`.
//!
//! This crate talks to the product only over the network and the command line
//! (the suite speaks the protocol with the core's messages and the transports'
//! dialers): it must not depend on the server's or client's internals.

pub mod baselines;
pub mod bench;
pub mod certs;
pub mod impair;
pub mod lab;
pub mod load;
pub mod procstat;
pub mod suite;
