//! The packet pipeline's cost per packet: one packet's whole way through the
//! middleware, the sender's encap stack (anti-spoof, compress, stats) and the
//! receiver's decap stack (stats, decompress, anti-spoof, rate limit), into a
//! null sink. All layers on (compressible and incompressible payloads), all
//! on but lz4 (compression not negotiated, the default), and all layers off,
//! at batch sizes 1 and 32.
//!
//! `cargo bench -p sallyport-middleware` prints criterion's figures and then
//! a table of ns/packet and packets/s measured in the same run.

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::num::NonZeroU64;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput};
use sallyport_core::ip::build_ipv4;
use sallyport_core::PacketBatch;
use sallyport_middleware::{
    AntiSpoofLayer, Check, CompressLayer, DecompressLayer, Direction, MiddlewareError, NullSink,
    Passthrough, Rate, RateLimitLayer, StatsHandle, StatsLayer,
};
use tower::{Service, ServiceBuilder};

const SRC: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 2);
const DST: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 3);
const PACKET: usize = 1400;

#[derive(Clone, Copy)]
enum Payload {
    Compressible,
    Incompressible,
}

fn packet(kind: Payload, seed: u32) -> Bytes {
    let body = PACKET - 20;
    let payload: Vec<u8> = match kind {
        Payload::Compressible => b"GET /index.html HTTP/1.1\r\nHost: example\r\n"
            .iter()
            .copied()
            .cycle()
            .take(body)
            .collect(),
        Payload::Incompressible => {
            let mut x = 0x9e37_79b9u32 ^ seed;
            (0..body)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect()
        }
    };
    Bytes::from(build_ipv4(SRC, DST, 17, &payload))
}

type Pipe = Box<dyn FnMut(PacketBatch) -> usize>;

/// Both stacks, with every layer on or every layer left out (`option_layer`
/// with `None`, as the binaries do when the config switches a layer off);
/// `lz4` adds the compression pair.
fn pipeline(on: bool, lz4: bool) -> Pipe {
    let lz4 = on && lz4;
    let stats = StatsHandle::detached();
    let fast = Rate::new(
        NonZeroU64::new(1 << 40).expect("nonzero"),
        NonZeroU64::new(1 << 40).expect("nonzero"),
    );
    let mut encap = ServiceBuilder::new()
        .option_layer(on.then(|| {
            AntiSpoofLayer::new(Check::Source, SRC, None, stats.clone(), Direction::Encap)
        }))
        .option_layer(lz4.then(|| CompressLayer::new(128, stats.clone())))
        .option_layer(on.then(|| StatsLayer::new(stats.clone(), Direction::Encap)))
        .service(Passthrough);
    let mut decap = ServiceBuilder::new()
        .option_layer(on.then(|| StatsLayer::new(stats.clone(), Direction::Decap)))
        .option_layer(lz4.then(|| DecompressLayer::new(1500, stats.clone())))
        .option_layer(on.then(|| {
            AntiSpoofLayer::new(Check::Source, SRC, None, stats.clone(), Direction::Decap)
        }))
        .option_layer(on.then(|| RateLimitLayer::new(fast, stats.clone(), Direction::Decap)))
        .service(NullSink::default());
    Box::new(move |batch| {
        let n = batch.len();
        let wire = run(&mut encap, batch).expect("encap");
        run(&mut decap, wire).expect("decap");
        n
    })
}

/// Drives a service whose futures are always ready, without a runtime.
fn run<S>(svc: &mut S, batch: PacketBatch) -> Result<S::Response, MiddlewareError>
where
    S: Service<PacketBatch, Error = MiddlewareError>,
    S::Future: Unpin,
{
    let mut cx = Context::from_waker(Waker::noop());
    match svc.poll_ready(&mut cx) {
        Poll::Ready(r) => r?,
        Poll::Pending => panic!("the pipeline is always ready here"),
    }
    let mut fut = svc.call(batch);
    match std::pin::Pin::new(&mut fut).poll(&mut cx) {
        Poll::Ready(r) => r,
        Poll::Pending => panic!("the pipeline completes synchronously"),
    }
}

use std::future::Future;

const CASES: [(&str, bool, bool, Payload); 4] = [
    ("all on, compressible", true, true, Payload::Compressible),
    (
        "all on, incompressible",
        true,
        true,
        Payload::Incompressible,
    ),
    ("all on but lz4", true, false, Payload::Incompressible),
    ("all off", false, false, Payload::Incompressible),
];

fn batch(kind: Payload, n: usize) -> PacketBatch {
    (0..n).map(|i| packet(kind, i as u32)).collect()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("pipeline");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    for n in [1usize, 32] {
        for (name, on, lz4, kind) in CASES {
            let input = batch(kind, n);
            let mut pipe = pipeline(on, lz4);
            g.throughput(Throughput::Elements(n as u64));
            g.bench_with_input(BenchmarkId::new(name, n), &input, |b, input| {
                b.iter_batched(
                    || input.clone(),
                    |bt| black_box(pipe(bt)),
                    BatchSize::SmallInput,
                )
            });
        }
    }
    g.finish();
}

/// ns/packet and packets/s for each case, measured in this run.
fn table() {
    println!();
    println!(
        "{:<26} {:>5} {:>11} {:>14}",
        "pipeline", "batch", "ns/packet", "packets/s"
    );
    for n in [1usize, 32] {
        for (name, on, lz4, kind) in CASES {
            let input = batch(kind, n);
            let mut pipe = pipeline(on, lz4);
            // Warm up, then measure for a fixed wall time.
            for _ in 0..1000 {
                pipe(input.clone());
            }
            let (mut packets, start) = (0usize, Instant::now());
            while start.elapsed() < Duration::from_millis(500) {
                for _ in 0..64 {
                    packets += pipe(black_box(input.clone()));
                }
            }
            let ns = start.elapsed().as_nanos() as f64 / packets as f64;
            println!("{:<26} {:>5} {:>11.1} {:>14.0}", name, n, ns, 1e9 / ns);
        }
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
    table();
}
