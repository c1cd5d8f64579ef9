//! `ferry identity`: creates the key pair on first use, prints the same `sha256:` fingerprint
//! every time after, and fails with a clear message on a key file others can read.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn ferry_identity(state_dir: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("identity")
        .arg("--state-dir")
        .arg(state_dir)
        .output()
        .expect("running ferry")
}

#[test]
fn identity_creates_once_and_prints_a_stable_fingerprint() {
    let state_dir = tempfile::tempdir().unwrap();
    let first = ferry_identity(state_dir.path());
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let fingerprint = String::from_utf8(first.stdout).unwrap().trim().to_owned();
    let parsed: ferry_appliance::io::transport::Fingerprint = fingerprint.parse().unwrap();
    assert_eq!(parsed.to_string(), fingerprint);

    let key_path = state_dir.path().join("keys/identity.key");
    let mode = std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let certificate = std::fs::read_to_string(state_dir.path().join("keys/identity.crt")).unwrap();
    assert!(certificate.starts_with("-----BEGIN CERTIFICATE-----"));

    let second = ferry_identity(state_dir.path());
    assert!(second.status.success());
    assert_eq!(
        String::from_utf8(second.stdout).unwrap().trim(),
        fingerprint
    );

    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let refused = ferry_identity(state_dir.path());
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("chmod 600"), "{message}");
}
