//! A JUnit XML report, for CI systems that show test results. Written by
//! hand: one `testsuite` per transport, one `testcase` per check.

use std::fmt::Write;

use super::{Report, Transport, Verdict};

/// The report as JUnit XML.
pub fn render(report: &Report) -> String {
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        x,
        "<testsuites name=\"sallyport-conformance\" tests=\"{}\" failures=\"{}\" skipped=\"{}\" time=\"{:.3}\">",
        report.outcomes.len(),
        report.failed(),
        report.skipped(),
        report.elapsed.as_secs_f64()
    );
    let mut transports: Vec<Transport> = Vec::new();
    for o in &report.outcomes {
        if !transports.contains(&o.transport) {
            transports.push(o.transport);
        }
    }
    for t in transports {
        let cases: Vec<_> = report
            .outcomes
            .iter()
            .filter(|o| o.transport == t)
            .collect();
        let failures = cases
            .iter()
            .filter(|o| matches!(o.result, Err(Verdict::Fail(_))))
            .count();
        let skipped = cases
            .iter()
            .filter(|o| matches!(o.result, Err(Verdict::Skip(_))))
            .count();
        let time: f64 = cases.iter().map(|o| o.elapsed.as_secs_f64()).sum();
        let _ = writeln!(
            x,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" skipped=\"{skipped}\" time=\"{time:.3}\">",
            escape(t.as_str()),
            cases.len(),
        );
        for o in cases {
            let area = o.id.split('.').next().unwrap_or(o.id);
            let _ = write!(
                x,
                "    <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\"",
                escape(&format!("{t}.{area}")),
                escape(&format!("{} {}", o.id, o.spec)),
                o.elapsed.as_secs_f64()
            );
            match &o.result {
                Ok(()) => x.push_str("/>\n"),
                Err(Verdict::Fail(r)) => {
                    let _ = writeln!(
                        x,
                        ">\n      <failure message=\"{}\"/>\n    </testcase>",
                        escape(r)
                    );
                }
                Err(Verdict::Skip(r)) => {
                    let _ = writeln!(
                        x,
                        ">\n      <skipped message=\"{}\"/>\n    </testcase>",
                        escape(r)
                    );
                }
            }
        }
        x.push_str("  </testsuite>\n");
    }
    x.push_str("</testsuites>\n");
    x
}

/// Escapes text for an XML attribute. Characters XML 1.0 cannot carry at all
/// (most C0 controls) become `?`.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            '\t' => out.push_str("&#9;"),
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suite::{Outcome, Report};
    use std::time::Duration;

    #[test]
    fn special_characters_are_escaped() {
        assert_eq!(
            escape("a<b>&\"c'\n\u{1}"),
            "a&lt;b&gt;&amp;&quot;c&apos;&#10;?"
        );
    }

    #[test]
    fn the_report_has_one_case_per_outcome_with_failures_and_skips() {
        let mk = |id, result| Outcome {
            transport: Transport::Wss,
            id,
            spec: "[H1]".into(),
            result,
            elapsed: Duration::from_millis(5),
            show_transport: false,
        };
        let report = Report {
            outcomes: vec![
                mk("handshake.auth_response", Ok(())),
                mk(
                    "handshake.bad_token",
                    Err(Verdict::Fail("said <yes> & \"ok\"".into())),
                ),
                mk("address.x", Err(Verdict::Skip("needs --token2".into()))),
            ],
            elapsed: Duration::from_secs(1),
        };
        let x = render(&report);
        assert!(x.starts_with("<?xml"), "{x}");
        assert!(
            x.contains("tests=\"3\" failures=\"1\" skipped=\"1\""),
            "{x}"
        );
        assert_eq!(x.matches("<testcase ").count(), 3, "{x}");
        assert!(
            x.contains("<failure message=\"said &lt;yes&gt; &amp; &quot;ok&quot;\"/>"),
            "{x}"
        );
        assert!(x.contains("<skipped message=\"needs --token2\"/>"), "{x}");
        assert!(x.contains("classname=\"wss.handshake\""), "{x}");
        assert_eq!(x.matches("<testsuite ").count(), 1);
        assert!(x.trim_end().ends_with("</testsuites>"));
    }
}
