//! The suite against in-process servers over a real TLS/WebSocket listener on
//! 127.0.0.1: the real hub passes every check; the purpose-built faulty
//! servers each fail exactly the checks of the statement they break.

mod support;

use std::collections::BTreeSet;

use sallyport_conformance::suite::{Filter, Report, Transport, Verdict};
use support::mini::{Faults, MiniServer};
use support::{run_suite, run_suite_over, target, token2_rate_limit, RealServer};

/// Checks that are skipped against the real hub over WebSocket, and why:
/// framed messages belong to the other transports, and exhausting the pool
/// is a test of its own.
const EXPECTED_SKIPS: [&str; 2] = ["transport.bad_framing", "handshake.pool_exhausted"];

/// The mini servers limit no rate, so the suite is not told of one either;
/// and they do not agree to segmentation offload.
const MINI_SKIPS: [&str; 5] = [
    "transport.bad_framing",
    "handshake.pool_exhausted",
    "policy.rate_limit",
    "offload.bad_envelopes",
    "offload.routed",
];

/// Sessions for the concurrency check against the mini servers: the point
/// there is the fault, not the load.
const MINI_SESSIONS: usize = 20;

fn failed(r: &Report) -> BTreeSet<String> {
    r.failed_ids().into_iter().collect()
}

fn skipped(r: &Report) -> BTreeSet<String> {
    r.outcomes
        .iter()
        .filter(|o| matches!(o.result, Err(Verdict::Skip(_))))
        .map(|o| o.id.to_string())
        .collect()
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

fn assert_only_expected_skips(r: &Report) {
    assert_eq!(skipped(r), set(&MINI_SKIPS), "skipped checks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_hub_passes_every_check() {
    let server = RealServer::start("10.100.0.0/16").await;
    let mut t = target(&server.url, &server.certs, 200);
    t.rate_limit = Some(token2_rate_limit());
    let report = run_suite(t, &Filter::all()).await;
    assert_eq!(report.failed(), 0, "failed: {:?}", report.failed_ids());
    assert_eq!(skipped(&report), set(&EXPECTED_SKIPS), "skipped checks");
    // errors.binary_too_large sent one message over the limit: counted.
    let too_large = server
        .hub
        .limits()
        .frame_too_large
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(too_large >= 1, "limit_frame_too_large_total is {too_large}");
}

/// The checks of the framed transports and of compression, over HTTP/2 and
/// raw TLS (the netns test runs the whole suite over them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_hub_passes_the_framing_and_compression_checks_over_h2_and_tls() {
    let server = RealServer::start("10.100.0.0/16").await;
    let report = run_suite_over(
        target(&server.url, &server.certs, 20),
        &[Transport::H2, Transport::Tls],
        &Filter::parse("transport.bad_framing,compression,routing.client_to_client"),
    )
    .await;
    assert_eq!(report.summary(), "14 passed, 0 failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_hub_answers_pool_exhausted_when_no_address_is_free() {
    let server = RealServer::start("10.100.0.0/28").await;
    let mut t = target(&server.url, &server.certs, 2);
    t.exhaust_pool = true;
    t.exhaust_limit = 64;
    let report = run_suite(t, &Filter::parse("handshake.pool_exhausted")).await;
    assert_eq!(report.summary(), "1 passed, 0 failed");
}

async fn mini(faults: Faults) -> Report {
    let server = MiniServer::start("10.77.0.0/22", faults).await;
    run_suite(
        target(&server.url, &server.certs, MINI_SESSIONS),
        &Filter::all(),
    )
    .await
}

async fn assert_fails_exactly(faults: Faults, expected: &[&str]) {
    let report = mini(faults).await;
    assert_eq!(failed(&report), set(expected), "{faults:?}");
    assert_only_expected_skips(&report);
}

/// As [`assert_fails_exactly`], among the compression and routing checks
/// only: a fault in the handling of lz4 frames cannot touch the others,
/// which never negotiate compression (and a third of a full run is quicker).
async fn assert_fails_exactly_among_packet_checks(faults: Faults, expected: &[&str]) {
    let server = MiniServer::start("10.77.0.0/22", faults).await;
    let report = run_suite(
        target(&server.url, &server.certs, MINI_SESSIONS),
        &Filter::parse("compression,routing"),
    )
    .await;
    assert_eq!(failed(&report), set(expected), "{faults:?}");
    assert_eq!(skipped(&report), set(&[]), "skipped checks");
    assert_eq!(report.outcomes.len(), 14, "compression and routing checks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mini_server_without_faults_passes_every_check() {
    let report = mini(Faults::default()).await;
    assert_eq!(report.failed(), 0, "failed: {:?}", report.failed_ids());
    assert_only_expected_skips(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_does_not_check_the_source_fails_forged_source() {
    let faults = Faults {
        no_source_check: true,
        ..Faults::default()
    };
    // Nor of a packet that came compressed ([C5], [P1]).
    assert_fails_exactly(faults, &["routing.forged_source", "compression.lz4_policy"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_hands_out_its_own_address_fails_the_address_checks() {
    let faults = Faults {
        hands_out_server_ip: true,
        ..Faults::default()
    };
    // The first session gets server_ip; later a reconnect asking for it (held
    // for the same token) gets it back.
    assert_fails_exactly(
        faults,
        &["handshake.auth_response", "address.reconnect_reserved"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_ping_fails_the_ping_checks() {
    let faults = Faults {
        never_pongs: true,
        ..Faults::default()
    };
    // handshake.unknown_fields proves the ping with an unknown field was
    // understood by its pong.
    assert_fails_exactly(faults, &["keepalive.ping_pong", "handshake.unknown_fields"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_auth_timeout_fails_auth_timeout() {
    let faults = Faults {
        no_auth_timeout: true,
        ..Faults::default()
    };
    assert_fails_exactly(faults, &["handshake.auth_timeout"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_floods_unknown_destinations_fails_unknown_destination() {
    let faults = Faults {
        floods_unknown_destination: true,
        ..Faults::default()
    };
    assert_fails_exactly(faults, &["routing.unknown_destination"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_does_not_hold_addresses_fails_the_hold_checks() {
    let faults = Faults {
        no_address_hold: true,
        ..Faults::default()
    };
    let report = mini(faults).await;
    let failed = failed(&report);
    let must = set(&["address.held_after_close", "address.held_for_other_token"]);
    // A client_id coming back finds its old address only while no other
    // check's session has taken it since: without a hold that is a race
    // against the checks running alongside, so it may fail too.
    let may = set(&["address.identity_lease"]);
    assert!(
        must.is_subset(&failed) && failed.difference(&must).all(|f| may.contains(f)),
        "{faults:?}: failed {failed:?}"
    );
    assert_only_expected_skips(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_blocks_on_a_slow_client_fails_slow_receiver() {
    let faults = Faults {
        blocking_queue: true,
        ..Faults::default()
    };
    assert_fails_exactly(faults, &["routing.slow_receiver"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_closes_on_unknown_types_fails_unknown_type() {
    let faults = Faults {
        closes_on_unknown_type: true,
        ..Faults::default()
    };
    assert_fails_exactly(faults, &["errors.unknown_type"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_calling_an_unknown_first_type_invalid_fails_wrong_first_message() {
    let faults = Faults {
        unknown_first_is_invalid: true,
        ..Faults::default()
    };
    assert_fails_exactly(faults, &["handshake.wrong_first_message"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_keepalive_fails_the_keepalive_checks() {
    let faults = Faults {
        no_keepalive: true,
        ..Faults::default()
    };
    assert_fails_exactly(
        faults,
        &[
            "keepalive.server_pings",
            "keepalive.answered_stays_open",
            "keepalive.silence_closes",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_answers_unoffered_compression_fails_the_negotiation_checks() {
    let faults = Faults {
        answers_unoffered_compression: true,
        ..Faults::default()
    };
    assert_fails_exactly_among_packet_checks(
        faults,
        &["compression.negotiation", "compression.not_negotiated"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_forwards_lz4_frames_fails_the_delivery_checks() {
    let faults = Faults {
        forwards_lz4_frames: true,
        ..Faults::default()
    };
    // A client without compression receives another's frame as it came.
    assert_fails_exactly_among_packet_checks(
        faults,
        &["compression.not_negotiated", "compression.lz4_delivered"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_ignores_stated_lengths_fails_bad_frames_dropped() {
    let faults = Faults {
        lax_lz4_lengths: true,
        ..Faults::default()
    };
    assert_fails_exactly_among_packet_checks(faults, &["compression.bad_frames_dropped"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_checks_sources_before_decompressing_fails_lz4_policy() {
    let faults = Faults {
        spoof_check_before_decompress: true,
        ..Faults::default()
    };
    assert_fails_exactly_among_packet_checks(faults, &["compression.lz4_policy"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_a_rate_limit_fails_rate_limit() {
    // Told that TOKEN2 is limited, the suite finds that it is not.
    let server = MiniServer::start("10.77.0.0/22", Faults::default()).await;
    let mut t = target(&server.url, &server.certs, MINI_SESSIONS);
    t.rate_limit = Some(token2_rate_limit());
    let report = run_suite(t, &Filter::parse("policy.rate_limit")).await;
    assert_eq!(failed(&report), set(&["policy.rate_limit"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_lenient_framing_fails_bad_framing() {
    let server = MiniServer::start_lenient_framing("10.77.0.0/22").await;
    let report = run_suite_over(
        target(&server.url, &server.certs, MINI_SESSIONS),
        &[Transport::Tls],
        &Filter::parse("transport,routing.client_to_client"),
    )
    .await;
    assert_eq!(failed(&report), set(&["transport.bad_framing"]));
    // The 404 check belongs to WebSocket.
    assert_eq!(skipped(&report), set(&["transport.not_found"]));
}
