//! `ferry demo --headless`: two appliances in one process on loopback, a qemu-io workload
//! through the NBD exports, and a summary whose verify says the replicas are identical and whose
//! target catalog lists at least one usable recovery point per group.

use std::process::{Command, Stdio};

#[test]
fn headless_demo_replicates_and_verifies_identical() {
    let dir = tempfile::tempdir().unwrap();
    let demo_dir = dir.path().join("demo");
    let output = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "demo",
            "--headless",
            "--duration",
            "5s",
            "--disk-size",
            "32MiB",
            "--dir",
            demo_dir.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run ferry demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let log = std::fs::read_to_string(demo_dir.join("ferry.log")).unwrap_or_default();
    assert!(
        output.status.success(),
        "ferry demo failed ({}): {stdout}\n{}\nlog:\n{log}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let verify_line = stdout
        .lines()
        .find(|line| line.trim_start().starts_with("verify:"))
        .unwrap_or_else(|| panic!("no verify line in the summary: {stdout}"));
    assert!(verify_line.contains("identical"), "{stdout}");
    assert!(stdout.contains("RPO lag:"), "{stdout}");
    // "recovery points:  web 2 (2 usable), db 2 (2 usable) in the target's catalog"
    let points_line = stdout
        .lines()
        .find(|line| line.trim_start().starts_with("recovery points:"))
        .unwrap_or_else(|| panic!("no recovery points line in the summary: {stdout}"));
    for group in ["web", "db"] {
        let usable: u64 = points_line
            .split(&format!("{group} "))
            .nth(1)
            .and_then(|rest| rest.split('(').nth(1))
            .and_then(|rest| rest.split(' ').next())
            .and_then(|count| count.parse().ok())
            .unwrap_or_else(|| panic!("no usable count for {group}: {points_line}"));
        assert!(
            usable >= 1,
            "group {group} has no usable point: {points_line}"
        );
    }
    assert!(stdout.contains("web-1/os: protected"), "{stdout}");
    assert!(stdout.contains("db-1/data: protected"), "{stdout}");
}
