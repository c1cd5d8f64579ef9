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

#[test]
fn identity_with_config_uses_the_configured_state_dir() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().display();
    let config_path = dir.path().join("target.toml");
    std::fs::write(
        &config_path,
        format!(
            "[appliance]\nname = \"site-b\"\nstate_dir = \"{root}/state\"\n\n\
             [target]\nlisten = \"127.0.0.1:4433\"\nstorage_dir = \"{root}/replicas\"\n"
        ),
    )
    .unwrap();
    let by_config = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["identity", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    assert!(
        by_config.status.success(),
        "{}",
        String::from_utf8_lossy(&by_config.stderr)
    );
    let fingerprint = String::from_utf8(by_config.stdout).unwrap();
    assert!(fingerprint.starts_with("sha256:"), "{fingerprint}");
    assert!(dir.path().join("state/keys/identity.key").exists());
    // The same key pair as seen through the state dir directly.
    let by_state_dir = ferry_identity(&dir.path().join("state"));
    assert_eq!(String::from_utf8(by_state_dir.stdout).unwrap(), fingerprint);

    std::fs::write(&config_path, "[appliance]\nname = 3\n").unwrap();
    let broken = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["identity", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    assert!(!broken.status.success());
    let message = String::from_utf8_lossy(&broken.stderr);
    assert!(message.contains("appliance.name"), "{message}");
}
