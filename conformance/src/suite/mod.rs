//! The conformance suite: named checks of docs/PROTOCOL.md, run against any
//! server over each transport.
//!
//! The suite speaks the protocol directly (no TUN) with packets it builds
//! itself. Every [`Check`] names the statements of docs/PROTOCOL.md it checks
//! (`[H1]`, `[A4]`, ...). A check passes, fails with a reason, or is skipped
//! with a reason when it needs something the run does not have (a second
//! token, a longer wait); a skipped check is never counted as passed.
//!
//! What the suite assumes of the server (see `sallyport-conformance --help`):
//! a pool large enough for a few hundred sessions (each closed session holds
//! its address for the lease grace period, so a `/24` is exhausted by two
//! runs), an `--auth-timeout` and `--max-frame` that match its configuration,
//! and no other client holding the top addresses of the subnet.

mod checks;
mod http;
pub mod junit;
mod lz4;
mod offload;
mod raw;
mod session;

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use sallyport_transports::tls::ClientTrust;
use sallyport_transports::Dial;

pub use checks::{CHECKS, NOT_CHECKED};

/// A transport the suite can test a server over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// WebSocket over TLS (`wss://`), or over cleartext (`ws://`) behind a proxy.
    Wss,
    /// HTTP/2 streams (gRPC-shaped).
    H2,
    /// Raw TLS with length-prefixed frames.
    Tls,
}

impl Transport {
    /// Every transport of the protocol, in the order `all` runs them.
    pub const ALL: [Transport; 3] = [Transport::Wss, Transport::H2, Transport::Tls];

    /// The name used on the command line and in reports.
    pub fn as_str(&self) -> &'static str {
        match self {
            Transport::Wss => "wss",
            Transport::H2 => "h2",
            Transport::Tls => "tls",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How long the suite waits for things. Every wait in every check derives
/// from these, so that a slow link can be accommodated and a fast one tested
/// quickly.
#[derive(Debug, Clone)]
pub struct Timeouts {
    /// How long an expected answer (an `auth_response`, a `pong`, a packet, a
    /// close) may take.
    pub reply: Duration,
    /// How long to watch before concluding that something did *not* arrive.
    pub quiet: Duration,
    /// The server's `limits.auth_timeout`.
    pub auth_timeout: Duration,
    /// Slack added to the server's own timers before calling them late.
    pub margin: Duration,
    /// Time given to the server to clean up a session the suite closed, before
    /// the suite relies on the address being held.
    pub settle: Duration,
    /// The longest a single check may wait on the server's timers (auth
    /// timeout, keepalive); checks that would wait longer are skipped.
    pub max_wait: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            reply: Duration::from_secs(2),
            quiet: Duration::from_millis(300),
            auth_timeout: Duration::from_secs(10),
            margin: Duration::from_secs(2),
            settle: Duration::from_millis(200),
            max_wait: Duration::from_secs(30),
        }
    }
}

/// The server under test and how to reach it.
#[derive(Debug, Clone)]
pub struct Target {
    /// The tunnel URL, e.g. `wss://vpn.example.com:443/tunnel`.
    pub url: String,
    /// A token the server accepts.
    pub token: String,
    /// A second accepted token (another identity); checks that need two are
    /// skipped without it.
    pub token2: Option<String>,
    /// How to verify the server's certificate.
    pub trust: ClientTrust,
    /// Waits and bounds.
    pub timeouts: Timeouts,
    /// The server's `limits.max_frame_size`.
    pub max_frame: usize,
    /// Sessions opened at once by the concurrency check.
    pub sessions: usize,
    /// Run the check that exhausts the address pool (it leaves every address
    /// held for the lease grace period, so it is off by default).
    pub exhaust_pool: bool,
    /// The most sessions the pool-exhaustion check opens before giving up.
    pub exhaust_limit: usize,
    /// The server's rate limit for one token, for the check of [P3]; the
    /// check is skipped without it.
    pub rate_limit: Option<RateLimit>,
}

/// A rate limit the server applies ([P3]): what `--rate-limit-bps`,
/// `--rate-limit-burst` and `--rate-limit-token` say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    /// Sustained bytes per second, each direction.
    pub bytes_per_sec: u64,
    /// The bucket's size in bytes.
    pub burst_bytes: u64,
    /// The token whose sessions are limited; `None`: the target's token.
    pub token: Option<String>,
}

impl RateLimit {
    /// The burst the project's server uses when none is configured: a tenth
    /// of a second's worth, at least 64 KiB.
    pub fn default_burst(bytes_per_sec: u64) -> u64 {
        (bytes_per_sec / 10).max(64 * 1024)
    }
}

impl Target {
    /// A target with default bounds.
    pub fn new(url: impl Into<String>, token: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            token: token.into(),
            token2: None,
            trust: ClientTrust::default(),
            timeouts: Timeouts::default(),
            max_frame: sallyport_core::offload::MAX_ENVELOPE,
            sessions: 200,
            exhaust_pool: false,
            exhaust_limit: 1024,
            rate_limit: None,
        }
    }
}

/// Why the suite cannot talk to the server over a transport.
#[derive(Debug, thiserror::Error)]
pub enum SuiteError {
    /// This build has no client for the transport.
    #[error("transport {0} is not supported by this build of sallyport-conformance")]
    Unsupported(Transport),
    /// The dialer could not be built (bad URL, unreadable CA file, ...).
    #[error("cannot dial {transport}: {source}")]
    Dialer {
        /// The transport.
        transport: Transport,
        /// Cause.
        #[source]
        source: sallyport_transports::TransportError,
    },
}

/// The largest message the suite accepts from a server.
const OWN_MAX_FRAME: usize = 1 << 20;

/// Builds the client for `transport`. The one place that knows which
/// transports this build speaks.
pub fn dialer(target: &Target, transport: Transport) -> Result<Arc<dyn Dial>, SuiteError> {
    use sallyport_transports::TransportKind;
    let connect_timeout = target.timeouts.reply.max(Duration::from_secs(5));
    let kind = match transport {
        Transport::Wss => TransportKind::WebSocket,
        Transport::H2 => TransportKind::Http2,
        Transport::Tls => TransportKind::RawTls,
    };
    let settings = sallyport_transports::dial::ClientSettings {
        url: target.url.clone(),
        trust: target.trust.clone(),
        proxy: None,
        sni: None,
        host_header: None,
        max_frame: OWN_MAX_FRAME,
        timeout: connect_timeout,
    };
    sallyport_transports::dial::dialer(kind, &settings)
        .map(Arc::from)
        .map_err(|source| SuiteError::Dialer { transport, source })
}

/// The transports `all` stands for: those this build can dial.
pub fn supported_transports(target: &Target) -> Vec<Transport> {
    Transport::ALL
        .into_iter()
        .filter(|t| !matches!(dialer(target, *t), Err(SuiteError::Unsupported(_))))
        .collect()
}

/// Why a check did not pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The server does not do what the statement says.
    Fail(String),
    /// The check could not be run; never counted as passed.
    Skip(String),
}

/// What a check returns.
pub type CheckResult = Result<(), Verdict>;

/// Shorthand for a failure.
pub(crate) fn fail(msg: impl Into<String>) -> Verdict {
    Verdict::Fail(msg.into())
}

/// Shorthand for a skip.
pub(crate) fn skip(msg: impl Into<String>) -> Verdict {
    Verdict::Skip(msg.into())
}

/// What every check gets: the target and a dialer for one transport.
#[derive(Clone)]
pub struct Ctx {
    target: Arc<Target>,
    dialer: Arc<dyn Dial>,
    transport: Transport,
}

impl Ctx {
    /// The target.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The bounds.
    pub fn t(&self) -> &Timeouts {
        &self.target.timeouts
    }

    /// The transport under test.
    pub fn transport(&self) -> Transport {
        self.transport
    }
}

/// One named check.
pub struct Check {
    /// Stable name, `area.what`, e.g. `handshake.auth_response`.
    pub id: &'static str,
    /// The docs/PROTOCOL.md statements it checks, e.g. `["H1"]`.
    pub spec: &'static [&'static str],
    /// One sentence: what a conforming server does.
    pub description: &'static str,
    /// The check itself.
    pub run: fn(Ctx) -> BoxFuture<'static, CheckResult>,
    /// Whether it only waits on the server's timers with sessions of its
    /// own, so that it can run alongside the other checks.
    pub alongside: bool,
}

impl Check {
    /// `[H1]` or `[A3,A4]`.
    pub fn spec_label(&self) -> String {
        format!("[{}]", self.spec.join(","))
    }
}

impl fmt::Debug for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Check")
            .field("id", &self.id)
            .field("spec", &self.spec)
            .finish()
    }
}

/// Which checks to run: `--only` patterns, comma separated. A pattern selects
/// the check of that id (`routing.forged_source`), every check of an area
/// (`routing`), the checks of a statement (`H1` or `[H1]`), or, with `*`
/// wildcards, the ids it matches as a glob (`*token*`).
#[derive(Debug, Clone, Default)]
pub struct Filter {
    patterns: Vec<String>,
}

impl Filter {
    /// All checks.
    pub fn all() -> Self {
        Self::default()
    }

    /// From a comma-separated list of patterns.
    pub fn parse(s: &str) -> Self {
        Self {
            patterns: s
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(String::from)
                .collect(),
        }
    }

    /// Whether `check` is selected.
    pub fn matches(&self, check: &Check) -> bool {
        self.patterns.is_empty()
            || self.patterns.iter().any(|p| {
                let bare = p.trim_start_matches('[').trim_end_matches(']');
                if p.contains('*') {
                    glob(p, check.id)
                } else {
                    check.id == p
                        || check.id.split('.').next() == Some(p.as_str())
                        || check.spec.iter().any(|s| s.eq_ignore_ascii_case(bare))
                }
            })
    }
}

/// `*` matches any run of characters; everything else literally.
fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let (first, rest) = match parts.split_first() {
        Some(x) => x,
        None => return text.is_empty(),
    };
    let Some(mut remaining) = text.strip_prefix(first) else {
        return false;
    };
    let Some((last, middle)) = rest.split_last() else {
        return remaining.is_empty();
    };
    for part in middle {
        match remaining.find(part) {
            Some(i) => remaining = &remaining[i + part.len()..],
            None => return false,
        }
    }
    remaining.ends_with(last)
}

/// The result of one check over one transport.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The transport it ran over.
    pub transport: Transport,
    /// The check's id.
    pub id: &'static str,
    /// The statements it checks, `[H1]`.
    pub spec: String,
    /// Pass, or why not.
    pub result: CheckResult,
    /// How long it took.
    pub elapsed: Duration,
    /// Whether the report names the transport (several were run).
    pub show_transport: bool,
}

impl Outcome {
    /// `wss/handshake.auth_response` when several transports ran, else the id.
    pub fn name(&self) -> String {
        if self.show_transport {
            format!("{}/{}", self.transport, self.id)
        } else {
            self.id.to_string()
        }
    }

    /// The report line: `ok    id [H1]`, `FAIL  id [H1]: reason`,
    /// `skip  id [H1]: reason`.
    pub fn line(&self) -> String {
        let (status, reason) = match &self.result {
            Ok(()) => ("ok", None),
            Err(Verdict::Fail(r)) => ("FAIL", Some(r)),
            Err(Verdict::Skip(r)) => ("skip", Some(r)),
        };
        let mut s = format!("{status:<6}{} {}", self.name(), self.spec);
        if let Some(r) = reason {
            s.push_str(": ");
            // One line per check, whatever the reason contains.
            s.push_str(&r.replace(['\n', '\r'], " "));
        }
        s
    }
}

/// All outcomes of a run.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// In the order run.
    pub outcomes: Vec<Outcome>,
    /// Wall time of the whole run.
    pub elapsed: Duration,
}

impl Report {
    /// Checks that passed.
    pub fn passed(&self) -> usize {
        self.outcomes.iter().filter(|o| o.result.is_ok()).count()
    }

    /// Checks that failed.
    pub fn failed(&self) -> usize {
        self.outcomes
            .iter()
            .filter(|o| matches!(o.result, Err(Verdict::Fail(_))))
            .count()
    }

    /// Checks that were skipped.
    pub fn skipped(&self) -> usize {
        self.outcomes
            .iter()
            .filter(|o| matches!(o.result, Err(Verdict::Skip(_))))
            .count()
    }

    /// `N passed, M failed` and `, K skipped` when any were.
    pub fn summary(&self) -> String {
        let mut s = format!("{} passed, {} failed", self.passed(), self.failed());
        if self.skipped() > 0 {
            s.push_str(&format!(", {} skipped", self.skipped()));
        }
        s
    }

    /// Ids (with the transport prefix when shown) of the checks that failed.
    pub fn failed_ids(&self) -> Vec<String> {
        self.outcomes
            .iter()
            .filter(|o| matches!(o.result, Err(Verdict::Fail(_))))
            .map(Outcome::name)
            .collect()
    }
}

/// The longest a single check may run before it is failed as hung.
fn check_deadline(t: &Timeouts) -> Duration {
    t.max_wait + t.reply * 10 + Duration::from_secs(30)
}

/// Runs one check and times it.
async fn run_one(
    check: &'static Check,
    target: Arc<Target>,
    dialer: Result<Arc<dyn Dial>, String>,
    transport: Transport,
    show_transport: bool,
) -> Outcome {
    let t0 = Instant::now();
    let result = match dialer {
        Err(e) => Err(fail(e)),
        Ok(dialer) => {
            let limit = check_deadline(&target.timeouts);
            let cx = Ctx {
                target,
                dialer,
                transport,
            };
            // A check runs in its own task so that a panic in it is a
            // failure of that check, not the end of the run.
            let task = tokio::spawn(tokio::time::timeout(limit, (check.run)(cx)));
            match task.await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Err(fail(format!("check did not finish within {limit:?}"))),
                Err(e) => Err(fail(format!("check crashed: {e}"))),
            }
        }
    };
    Outcome {
        transport,
        id: check.id,
        spec: check.spec_label(),
        result,
        elapsed: t0.elapsed(),
        show_transport,
    }
}

/// Runs the selected checks over each of `transports`, one transport after
/// the other, calling `each` with every outcome in the order of [`CHECKS`].
///
/// Checks run one at a time, except those that only wait on the server's
/// timers ([`Check::alongside`]: the auth timeout and keepalive): they start
/// in their turn and go on alongside the checks after them. Their sessions
/// only wait (the checks before them, the address checks among them, run
/// undisturbed), and a run takes seconds less per transport.
pub async fn run(
    target: Target,
    transports: &[Transport],
    filter: &Filter,
    mut each: impl FnMut(&Outcome),
) -> Report {
    let started = Instant::now();
    let target = Arc::new(target);
    let show_transport = transports.len() > 1;
    let mut report = Report::default();
    for &transport in transports {
        let dialer = dialer(&target, transport).map_err(|e| e.to_string());
        let selected: Vec<&'static Check> = CHECKS.iter().filter(|c| filter.matches(c)).collect();
        let mut slots: Vec<Option<Outcome>> = selected.iter().map(|_| None).collect();
        let mut background = Vec::new();
        let mut next = 0;
        let mut emit = |slots: &mut Vec<Option<Outcome>>, report: &mut Report| {
            while let Some(Some(o)) = slots.get_mut(next).map(Option::take) {
                each(&o);
                report.outcomes.push(o);
                next += 1;
            }
        };
        for (i, check) in selected.iter().enumerate() {
            let task = run_one(
                check,
                target.clone(),
                dialer.clone(),
                transport,
                show_transport,
            );
            if check.alongside {
                background.push((i, tokio::spawn(task)));
            } else {
                slots[i] = Some(task.await);
            }
            let mut k = 0;
            while k < background.len() {
                if background[k].1.is_finished() || i + 1 == selected.len() {
                    let (j, task) = background.swap_remove(k);
                    slots[j] = Some(joined(task.await, selected[j], transport, show_transport));
                } else {
                    k += 1;
                }
            }
            emit(&mut slots, &mut report);
        }
    }
    report.elapsed = started.elapsed();
    report
}

/// The outcome of a check that ran alongside, also when its task failed.
fn joined(
    r: Result<Outcome, tokio::task::JoinError>,
    check: &'static Check,
    transport: Transport,
    show_transport: bool,
) -> Outcome {
    r.unwrap_or_else(|e| Outcome {
        transport,
        id: check.id,
        spec: check.spec_label(),
        result: Err(fail(format!("check crashed: {e}"))),
        elapsed: Duration::ZERO,
        show_transport,
    })
}

/// Where `--junit` writes.
pub fn write_junit(report: &Report, path: &Path) -> std::io::Result<()> {
    std::fs::write(path, junit::render(report))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(id: &'static str, spec: &'static [&'static str]) -> Check {
        Check {
            id,
            spec,
            description: "",
            run: |_| Box::pin(async { Ok(()) }),
            alongside: false,
        }
    }

    #[test]
    fn filter_matches_substring_statement_id_and_glob() {
        let c = check("handshake.bad_token", &["H2"]);
        assert!(Filter::all().matches(&c));
        assert!(Filter::parse("handshake").matches(&c));
        assert!(Filter::parse("handshake.bad_token").matches(&c));
        assert!(!Filter::parse("bad_token").matches(&c));
        assert!(!Filter::parse("hand").matches(&c));
        assert!(!Filter::parse("handshake").matches(&check("errors.auth_after_handshake", &["E2"])));
        assert!(Filter::parse("H2").matches(&c));
        assert!(Filter::parse("[h2]").matches(&c));
        assert!(Filter::parse("routing,handshake.*").matches(&c));
        assert!(Filter::parse("*token").matches(&c));
        assert!(!Filter::parse("routing").matches(&c));
        assert!(!Filter::parse("H1").matches(&c));
        assert!(!Filter::parse("*.auth").matches(&c));
    }

    #[test]
    fn glob_handles_edges() {
        assert!(glob("*", ""));
        assert!(glob("a*b*c", "abc"));
        assert!(glob("a*b*c", "aXbYc"));
        assert!(!glob("a*b*c", "aXbY"));
        assert!(glob("exact", "exact"));
        assert!(!glob("exact", "exactly"));
    }

    fn outcome(result: CheckResult, show_transport: bool) -> Outcome {
        Outcome {
            transport: Transport::Wss,
            id: "handshake.auth_response",
            spec: "[H1]".into(),
            result,
            elapsed: Duration::ZERO,
            show_transport,
        }
    }

    #[test]
    fn lines_have_the_documented_shape() {
        assert_eq!(
            outcome(Ok(()), false).line(),
            "ok    handshake.auth_response [H1]"
        );
        assert_eq!(
            outcome(Err(fail("no\nreply")), false).line(),
            "FAIL  handshake.auth_response [H1]: no reply"
        );
        assert_eq!(
            outcome(Err(skip("needs --token2")), true).line(),
            "skip  wss/handshake.auth_response [H1]: needs --token2"
        );
    }

    #[test]
    fn summary_mentions_skips_only_when_there_are_some() {
        let mut r = Report::default();
        r.outcomes.push(outcome(Ok(()), false));
        r.outcomes.push(outcome(Err(fail("x")), false));
        assert_eq!(r.summary(), "1 passed, 1 failed");
        r.outcomes.push(outcome(Err(skip("y")), false));
        assert_eq!(r.summary(), "1 passed, 1 failed, 1 skipped");
        assert_eq!(r.failed_ids(), vec!["handshake.auth_response".to_string()]);
    }

    #[test]
    fn every_transport_has_a_dialer() {
        let t = Target::new("wss://127.0.0.1:1/tunnel", "x");
        assert_eq!(supported_transports(&t), Transport::ALL.to_vec());
    }

    #[test]
    fn check_ids_are_unique_and_name_statements() {
        let mut ids: Vec<_> = CHECKS.iter().map(|c| c.id).collect();
        ids.sort_unstable();
        let n = ids.len();
        ids.dedup();
        assert_eq!(ids.len(), n, "duplicate check ids");
        for c in CHECKS.iter() {
            assert!(!c.spec.is_empty(), "{} names no statement", c.id);
            assert!(!c.description.is_empty(), "{} has no description", c.id);
        }
    }

    /// Every statement id in docs/PROTOCOL.md is checked by some check or
    /// listed, with the reason, in NOT_CHECKED; and no check names an id the
    /// document does not have.
    #[test]
    fn every_protocol_statement_is_covered() {
        let doc = include_str!("../../../docs/PROTOCOL.md");
        let mut ids = Vec::new();
        let mut rest = doc;
        while let Some(i) = rest.find("**[") {
            rest = &rest[i + 3..];
            if let Some(j) = rest.find("]**") {
                ids.push(rest[..j].to_string());
                rest = &rest[j..];
            }
        }
        assert!(ids.len() > 20, "found ids: {ids:?}");
        for id in &ids {
            let checked = CHECKS.iter().any(|c| c.spec.contains(&id.as_str()));
            let excused = NOT_CHECKED.iter().any(|(n, _)| n == id);
            assert!(checked || excused, "[{id}] is neither checked nor excused");
        }
        for c in CHECKS.iter() {
            for s in c.spec {
                assert!(
                    s.starts_with('§') || ids.iter().any(|i| i == s),
                    "{} names [{s}], which docs/PROTOCOL.md does not have",
                    c.id
                );
            }
        }
    }
}
