//! Unit tests for what the load generator counts and how it reports it.

use super::*;

const S: Duration = Duration::from_secs(1);

/// A window of 10 s starting 2 s after `base`, given up on 1 s after it ends.
fn window(base: Instant) -> Window {
    Window {
        from: base + 2 * S,
        end: base + 12 * S,
        give_up: base + 13 * S,
    }
}

/// What a call should count as.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    NotMeasured,
    Success,
    Error(&'static str),
}

#[test]
fn every_call_started_in_the_window_counts_wherever_it_ends() {
    use Expect::*;
    let base = Instant::now();
    let w = window(base);
    let failed = || Outcome::Failed("connection".into());
    // (started ms, ended ms, outcome, expected)
    let cases = [
        // Warm-up calls are not measured, even when they end inside the window.
        (1_000, 3_000, Outcome::Ok, NotMeasured),
        (1_000, 3_000, failed(), NotMeasured),
        // Inside the window.
        (3_000, 3_001, Outcome::Ok, Success),
        (3_000, 4_000, failed(), Error("connection")),
        // Started inside, ended after the window: still measured (this was the bug).
        (11_000, 12_500, Outcome::Ok, Success),
        (11_000, 12_500, failed(), Error("connection")),
        (4_000, 13_000, Outcome::Unfinished, Error(UNFINISHED)),
        // The window is half-open: a call starting at its end is not measured.
        (12_000, 12_001, failed(), NotMeasured),
    ];
    for (i, (t0, t1, outcome, expect)) in cases.into_iter().enumerate() {
        let mut r = TaskResult::new();
        let t0 = base + Duration::from_millis(t0);
        let t1 = base + Duration::from_millis(t1);
        let success = r.record(&w, t0, t1, outcome);
        assert_eq!(success, expect == Success, "case {i}");
        assert_eq!(r.hist.len(), u64::from(expect == Success), "case {i}");
        let errors = match expect {
            Error(kind) => {
                assert_eq!(r.errors.get(kind), Some(&1), "case {i}: {:?}", r.errors);
                1
            }
            _ => 0,
        };
        assert_eq!(r.errors.values().sum::<u64>(), errors, "case {i}");
        assert_eq!(r.error_hist.len(), errors, "case {i}");
    }
}

#[test]
fn a_stall_shows_in_the_error_latency() {
    let base = Instant::now();
    let w = window(base);
    let mut total = TaskResult::new();
    for (t0, t1, outcome) in [
        (3, 3, Outcome::Ok),
        (4, 13, Outcome::Unfinished),
        (5, 5, Outcome::Failed("timeout".into())),
    ] {
        let mut r = TaskResult::new();
        r.record(&w, base + t0 * S, base + t1 * S + S / 1000, outcome);
        total.add(r);
    }
    assert_eq!(total.hist.len(), 1);
    assert_eq!(total.error_hist.len(), 2);
    // The unfinished call ran 9 s before it was given up on.
    assert!(
        total.error_hist.max() >= 9_000_000,
        "{}",
        total.error_hist.max()
    );
    assert!(total.hist.max() < 9_000_000, "{}", total.hist.max());
}

fn report(errors: &[(&str, u64)]) -> Report {
    let errors_by_kind: BTreeMap<String, u64> =
        errors.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    Report {
        rps: 0.0,
        p50_us: 0,
        p90_us: 0,
        p99_us: 0,
        p999_us: 0,
        max_us: 0,
        requests: 0,
        errors: errors_by_kind.values().sum(),
        errors_by_kind,
        error_p50_us: 1_000_250,
        error_max_us: 1_999_000,
        connections: 4,
        in_flight: 1,
        size: 64,
        op: "echo".into(),
        duration_s: 3.0,
        new_connection_per_request: false,
        threads: 1,
    }
}

#[test]
fn both_outputs_show_the_errors() {
    let r = report(&[(UNFINISHED, 4), ("connection", 2)]);
    let t = table(&r);
    for needle in [
        "errors                  6",
        "unfinished           4",
        "connection           2",
        "error max      1999000 us",
    ] {
        assert!(t.contains(needle), "{needle:?} in\n{t}");
    }
    let json: serde_json::Value = serde_json::to_value(&r).unwrap();
    assert_eq!(json["errors"], 6);
    assert_eq!(json["errors_by_kind"][UNFINISHED], 4);
    assert_eq!(json["error_max_us"], 1_999_000);
    // Without errors the table has no error latencies to show.
    assert!(!table(&report(&[])).contains("error max"));
}
