//! Smoke test of `ferry bench`: runs a small subset at its smallest size (FERRY_BENCH_TINY=1:
//! an 8 MiB initial replication between two appliances, 16 MiB over each transport link, a short
//! journal run, the failover check) and checks only that it ends, prints well-formed JSON with the keys issue 7 names, and writes
//! the RESULTS.md section and the plot. It never judges a speed.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The smoke run takes a few seconds; this bounds a hang.
const DEADLINE: Duration = Duration::from_secs(120);

#[test]
fn bench_quick_json_is_well_formed() {
    let work = tempfile::tempdir().expect("tempdir");
    let out = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "bench",
            "1",
            "transport",
            "6",
            "7",
            "--quick",
            "--json",
            "--out",
        ])
        .arg(out.path())
        .arg("--dir")
        .arg(work.path())
        .env("FERRY_BENCH_TINY", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ferry bench");
    let start = Instant::now();
    while child.try_wait().expect("waitpid").is_none() {
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let output = child.wait_with_output().expect("output");
            panic!(
                "ferry bench did not end within {DEADLINE:?}; stderr: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "ferry bench failed: {stderr}");
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "ferry bench printed malformed JSON ({error}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    });

    let machine = json["machine"].as_object().expect("a machine object");
    for key in ["cores", "memory_bytes", "disk", "kernel"] {
        assert!(
            machine.contains_key(key),
            "machine lacks {key}: {machine:?}"
        );
    }
    assert!(machine["cores"].as_u64().is_some_and(|cores| cores >= 1));

    let scenarios = json["scenarios"].as_array().expect("a scenarios array");
    assert!(!scenarios.is_empty());
    for entry in scenarios {
        let entry = entry.as_object().expect("each scenario entry is an object");
        for key in [
            "name",
            "value",
            "unit",
            "baseline",
            "baseline_value",
            "ratio",
            "aim",
        ] {
            assert!(entry.contains_key(key), "entry lacks {key}: {entry:?}");
        }
        assert!(entry["name"].as_str().is_some_and(|name| !name.is_empty()));
    }
    // Transport and journal measured something (a number, whatever its size), each beside a
    // baseline, with the ratio the two give.
    for number in [5, 6] {
        let measured: Vec<_> = scenarios
            .iter()
            .filter(|entry| entry["scenario"] == number)
            .collect();
        assert!(!measured.is_empty(), "no entry of scenario {number}");
        for entry in measured {
            let value = entry["value"].as_f64().expect("a value");
            let baseline = entry["baseline_value"].as_f64().expect("a baseline value");
            let ratio = entry["ratio"].as_f64().expect("a ratio");
            assert!(value > 0.0 && baseline > 0.0, "{entry}");
            assert!(
                (ratio - value / baseline).abs() <= 1e-9 * ratio.max(1.0),
                "{entry}"
            );
        }
    }

    // Scenario 1 started real appliances and timed an initial replication (8 MiB at this size).
    let initial: Vec<_> = scenarios
        .iter()
        .filter(|entry| entry["scenario"] == 1)
        .collect();
    assert!(!initial.is_empty(), "no entry of scenario 1");
    for entry in initial {
        assert!(entry["value"].as_f64().is_some(), "{entry}");
    }

    let results = std::fs::read_to_string(out.path().join("RESULTS.md")).expect("RESULTS.md");
    assert!(results.contains("<!-- BEGIN ferry bench"), "{results}");
    assert!(results.contains("| cores | "), "{results}");
    let plot = std::fs::read_to_string(out.path().join("results.svg")).expect("results.svg");
    assert!(plot.starts_with("<svg"), "{plot}");
}
