//! Config tests: the issue's example as written, key paths in errors, sizes and durations,
//! cross-key validation and the target mapping.

use super::*;

/// Issue 3's example, verbatim (including the unpaired `sha256:...` placeholder).
const ISSUE_EXAMPLE: &str = r#"
[appliance]
name = "site-a"
state_dir = "/var/lib/ferry"            # journal, keys, bitmaps, catalog
control_socket = "/run/ferry/ferry.sock"

[source]                                # this appliance protects disks
journal_size = "1GiB"
target = "127.0.0.1:7400"               # the target appliance (next issue)
target_fingerprint = "sha256:..."       # pinned target certificate (next issue)

[[source.group]]
name = "app"
recovery_point_interval = "5m"
app_consistent_interval = "1h"
retention = "24h"

[[source.machine]]
name = "web-1"
group = "app"
availability_set = "web"
nics = [{ network = "prod", subnet = "front", ip = "10.0.0.4" }]
disks = [{ name = "os", path = "/srv/images/web-1-os.raw", export = "/run/ferry/web-1-os.sock" }]
"#;

const FINGERPRINT: &str = "sha256:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

fn error_of(text: &str) -> (String, String) {
    match Config::parse(text) {
        Ok(_) => panic!("config should have been rejected:\n{text}"),
        Err(error) => (error.key().to_string(), error.to_string()),
    }
}

/// A small valid source config; tests replace pieces of it.
fn source_config(extra_disk: &str) -> String {
    format!(
        r#"
[appliance]
name = "a"
state_dir = "/tmp/ferry-state"

[source]
journal_size = "64MiB"
target = "127.0.0.1:7400"

[[source.group]]
name = "g"

[[source.machine]]
name = "m"
group = "g"
disks = [
  {{ name = "d0", path = "/tmp/d0.raw", export = "/tmp/d0.sock" }},
  {extra_disk}
]
"#
    )
}

#[test]
fn issue_example_parses_as_written() {
    let config = Config::parse(ISSUE_EXAMPLE).unwrap();
    assert_eq!(config.appliance.name, "site-a");
    assert_eq!(config.appliance.state_dir, PathBuf::from("/var/lib/ferry"));
    assert_eq!(config.control_socket(), Path::new("/run/ferry/ferry.sock"));
    assert_eq!(config.appliance.metrics_listen, None);
    let source = config.source.as_ref().unwrap();
    assert_eq!(source.journal_size_bytes, 1 << 30);
    assert_eq!(source.target, "127.0.0.1:7400");
    assert_eq!(
        source.target_fingerprint, None,
        "the placeholder pins nothing"
    );
    assert_eq!(source.compression, Compression::None);
    let group = &source.group[0];
    assert_eq!(group.name, "app");
    assert_eq!(group.recovery_point_interval, Duration::from_secs(300));
    assert_eq!(
        group.app_consistent_interval,
        Some(Duration::from_secs(3600))
    );
    assert_eq!(group.retention, Duration::from_secs(24 * 3600));
    assert_eq!(group.rpo_threshold, RPO_THRESHOLD_DEFAULT);
    let machine = &source.machine[0];
    assert_eq!(machine.name, "web-1");
    assert_eq!(machine.availability_set.as_deref(), Some("web"));
    assert_eq!(
        machine.nics,
        vec![NicConfig {
            network: "prod".into(),
            subnet: "front".into(),
            ip: Some("10.0.0.4".parse().unwrap())
        }]
    );
    let disk = &machine.disks[0];
    assert_eq!(disk.name, "os");
    assert_eq!(disk.path, PathBuf::from("/srv/images/web-1-os.raw"));
    assert_eq!(
        disk.export.as_deref(),
        Some(Path::new("/run/ferry/web-1-os.sock"))
    );
    assert_eq!(disk.tcp, None);
    assert_eq!(disk.id, disk_id("web-1", "os"));
    assert!(config.target.is_none());
}

#[test]
fn full_source_and_target_config_parses() {
    let text = format!(
        r#"
[appliance]
name = "site-b"
state_dir = "/var/lib/ferry"
metrics_listen = "127.0.0.1:9400"

[source]
journal_size = 67108864
target = "[::1]:7400"
target_fingerprint = "{FINGERPRINT}"
bandwidth_limit = "100MiB/s"
compression = "zstd"

[[source.group]]
name = "db"
recovery_point_interval = "1s"
rpo_threshold = "10s"
freeze_hook = "fsfreeze -f /data"
thaw_hook = "fsfreeze -u /data"
compression = "lz4"

[[source.machine]]
name = "db-1"
group = "db"
resource_group = "rg-prod"
disks = [{{ name = "data", path = "data.raw", tcp = "127.0.0.1:10809" }}]

[target]
listen = "0.0.0.0:7400"
storage_dir = "/srv/replicas"
peers = [{{ name = "site-a", fingerprint = "{FINGERPRINT}" }}]

[target.mapping]
resource_group = "rg-dr"
networks = {{ prod = "dr-prod" }}
availability_sets = {{ web = "web-dr" }}
test_network = "dr-test"

[[target.machine]]
name = "web-1"
availability_set = "web-special"
networks = {{ prod = "dr-prod-2" }}
"#
    );
    let config = Config::parse(&text).unwrap();
    assert_eq!(
        config.control_socket(),
        Path::new("/var/lib/ferry/control.sock")
    );
    assert_eq!(
        config.appliance.metrics_listen,
        Some("127.0.0.1:9400".parse().unwrap())
    );
    let source = config.source.as_ref().unwrap();
    assert_eq!(source.journal_size_bytes, 64 << 20);
    assert_eq!(source.target_fingerprint.unwrap().to_string(), FINGERPRINT);
    assert_eq!(source.bandwidth_limit_bytes_per_s, Some(100 << 20));
    assert_eq!(source.compression, Compression::Zstd);
    assert_eq!(source.group[0].compression, Some(Compression::Lz4));
    assert_eq!(
        source.group[0].freeze_hook.as_deref(),
        Some("fsfreeze -f /data")
    );
    assert_eq!(
        source.machine[0].disks[0].tcp,
        Some("127.0.0.1:10809".parse().unwrap())
    );
    let target = config.target.as_ref().unwrap();
    assert_eq!(target.peers[0].fingerprint.to_string(), FINGERPRINT);
    assert_eq!(target.mapping.networks["prod"], "dr-prod");
}

#[test]
fn target_settings_follow_override_then_mapping_then_source() {
    let text = format!(
        r#"
[appliance]
name = "t"
state_dir = "/s"
[target]
listen = "127.0.0.1:7400"
storage_dir = "/r"
peers = [{{ name = "a", fingerprint = "{FINGERPRINT}" }}]
[target.mapping]
resource_group = "rg-dr"
networks = {{ prod = "dr-prod", back = "dr-back" }}
availability_sets = {{ web = "web-dr" }}
test_network = "dr-test"
[[target.machine]]
name = "web-2"
availability_set = "pinned"
networks = {{ prod = "dr-special" }}
test_network = "quarantine"
"#
    );
    let config = Config::parse(&text).unwrap();
    let target = config.target.as_ref().unwrap();
    let nic = |network: &str| NicConfig {
        network: network.into(),
        subnet: "s".into(),
        ip: None,
    };
    let source = MachineSettings {
        name: "web-1".into(),
        resource_group: Some("rg-prod".into()),
        availability_set: Some("web".into()),
        nics: vec![nic("prod"), nic("other")],
        test_network: None,
    };
    let mapped = target.target_settings(&source);
    assert_eq!(mapped.resource_group.as_deref(), Some("rg-dr"));
    assert_eq!(mapped.availability_set.as_deref(), Some("web-dr"));
    assert_eq!(mapped.nics, vec![nic("dr-prod"), nic("other")]);
    assert_eq!(mapped.test_network.as_deref(), Some("dr-test"));

    let overridden = target.target_settings(&MachineSettings {
        name: "web-2".into(),
        ..source
    });
    assert_eq!(overridden.availability_set.as_deref(), Some("pinned"));
    assert_eq!(overridden.nics, vec![nic("dr-special"), nic("other")]);
    assert_eq!(overridden.test_network.as_deref(), Some("quarantine"));
}

#[test]
fn missing_field_names_the_key_path() {
    let (key, message) = error_of(&source_config(
        r#"{ name = "d1", export = "/tmp/d1.sock" }"#,
    ));
    assert_eq!(key, "source.machine[0].disks[1].path");
    assert!(
        message.starts_with("source.machine[0].disks[1].path: missing field"),
        "{message}"
    );
}

#[test]
fn bad_size_names_the_key_and_the_value() {
    let text = source_config(r#"{ name = "d1", path = "/tmp/d1.raw", export = "/tmp/d1.sock" }"#)
        .replace(r#"journal_size = "64MiB""#, r#"journal_size = "12QB""#);
    let (key, message) = error_of(&text);
    assert_eq!(key, "source.journal_size");
    assert!(
        message.contains(r#"source.journal_size: "12QB" is not a size"#),
        "{message}"
    );
    assert!(message.contains("(line 7, column 16)"), "{message}");
}

#[test]
fn unknown_keys_are_rejected_with_their_path() {
    let text = source_config(r#"{ name = "d1", path = "/tmp/d1.raw", export = "/s", colour = 1 }"#);
    let (key, message) = error_of(&text);
    assert_eq!(key, "source.machine[0].disks[1].colour");
    assert!(message.contains("unknown key"), "{message}");

    let text = ISSUE_EXAMPLE.replace("[source]", "[source]\njournal_sise = \"1GiB\"");
    let (key, _) = error_of(&text);
    assert_eq!(key, "source.journal_sise");

    let text = format!("{ISSUE_EXAMPLE}\n[extra]\nx = 1\n");
    let (key, _) = error_of(&text);
    assert_eq!(key, "extra");
}

#[test]
fn bad_values_name_their_key() {
    let cases = [
        (
            r#"recovery_point_interval = "5 parsecs""#,
            "source.group[0].recovery_point_interval",
        ),
        (
            r#"recovery_point_interval = "500ms""#,
            "source.group[0].recovery_point_interval",
        ),
        (
            r#"recovery_point_interval = 30"#,
            "source.group[0].recovery_point_interval",
        ),
        (r#"retention = "1s""#, "source.group[0].retention"),
        (r#"rpo_threshold = "0s""#, "source.group[0].rpo_threshold"),
        (r#"freeze_hook = " ""#, "source.group[0].freeze_hook"),
        (r#"compression = "gzip""#, "source.group[0].compression"),
    ];
    for (line, expected_key) in cases {
        let text =
            source_config(r#"{ name = "d1", path = "/tmp/d1.raw", export = "/tmp/d1.sock" }"#)
                .replace("name = \"g\"\n", &format!("name = \"g\"\n{line}\n"));
        let (key, message) = error_of(&text);
        assert_eq!(key, expected_key, "{line}: {message}");
    }
    let base = source_config(r#"{ name = "d1", path = "/tmp/d1.raw", export = "/tmp/d1.sock" }"#);
    let replaced = [
        (
            r#"target = "127.0.0.1:7400""#,
            r#"target = "nowhere""#,
            "source.target",
        ),
        (
            r#"target = "127.0.0.1:7400""#,
            "target = \"127.0.0.1:7400\"\ntarget_fingerprint = \"sha256:abc\"",
            "source.target_fingerprint",
        ),
        (
            r#"journal_size = "64MiB""#,
            r#"journal_size = "1MiB""#,
            "source.journal_size",
        ),
        (
            r#"journal_size = "64MiB""#,
            r#"journal_size = -5"#,
            "source.journal_size",
        ),
        (r#"name = "a""#, r#"name = "../etc""#, "appliance.name"),
        (r#"name = "m""#, r#"name = """#, "source.machine[0].name"),
        (
            r#"group = "g""#,
            r#"group = "nope""#,
            "source.machine[0].group",
        ),
        (
            r#"export = "/tmp/d0.sock""#,
            r#"tcp = "localhost""#,
            "source.machine[0].disks[0].tcp",
        ),
    ];
    for (from, to, expected_key) in replaced {
        assert!(base.contains(from), "{from}");
        let (key, message) = error_of(&base.replacen(from, to, 1));
        assert_eq!(key, expected_key, "{to}: {message}");
    }
}

#[test]
fn duplicates_and_missing_exports_are_rejected() {
    let cases = [
        (
            r#"{ name = "d0", path = "/tmp/x.raw", export = "/tmp/x.sock" }"#,
            "source.machine[0].disks[1].name",
        ),
        (
            r#"{ name = "d1", path = "/tmp/d0.raw", export = "/tmp/x.sock" }"#,
            "source.machine[0].disks[1].path",
        ),
        (
            r#"{ name = "d1", path = "/tmp/d1.raw", export = "/tmp/d0.sock" }"#,
            "source.machine[0].disks[1].export",
        ),
        (
            r#"{ name = "d1", path = "/tmp/d1.raw" }"#,
            "source.machine[0].disks[1].export",
        ),
    ];
    for (disk, expected_key) in cases {
        let (key, message) = error_of(&source_config(disk));
        assert_eq!(key, expected_key, "{disk}: {message}");
    }
    let doubled_group = source_config(r#"{ name = "d1", path = "/d1", export = "/d1.sock" }"#)
        .replace(
            "[[source.group]]\nname = \"g\"\n",
            "[[source.group]]\nname = \"g\"\n[[source.group]]\nname = \"g\"\n",
        );
    assert_eq!(error_of(&doubled_group).0, "source.group[1].name");
    let tcp_twice = source_config(r#"{ name = "d1", path = "/d1", tcp = "127.0.0.1:9000" }"#)
        .replace(r#"export = "/tmp/d0.sock""#, r#"tcp = "127.0.0.1:9000""#);
    assert_eq!(error_of(&tcp_twice).0, "source.machine[0].disks[1].tcp");
}

#[test]
fn an_appliance_needs_a_role() {
    let (key, message) = error_of("[appliance]\nname = \"a\"\nstate_dir = \"/s\"\n");
    assert_eq!(key, "");
    assert!(message.contains("no [source] and no [target]"), "{message}");
    let (key, _) = error_of("");
    assert_eq!(key, "appliance");
}

#[test]
fn toml_syntax_errors_carry_a_line() {
    let (_, message) = error_of("[appliance\nname = \"a\"\n");
    assert!(message.contains("line 1"), "{message}");
}

#[test]
fn sizes_parse() {
    assert_eq!(parse_size("4096"), Ok(4096));
    assert_eq!(parse_size("512KiB"), Ok(512 << 10));
    assert_eq!(parse_size("64MiB"), Ok(64 << 20));
    assert_eq!(parse_size("64 mib"), Ok(64 << 20));
    assert_eq!(parse_size("1GiB"), Ok(1 << 30));
    assert_eq!(parse_size("2TiB"), Ok(2 << 40));
    assert_eq!(parse_size("10MB"), Ok(10_000_000));
    assert_eq!(parse_size("7B"), Ok(7));
    for bad in [
        "",
        "MiB",
        "1.5GiB",
        "-1",
        "12QB",
        "1 GiBs",
        "99999999999999TiB",
    ] {
        assert!(parse_size(bad).is_err(), "{bad:?} parsed");
    }
}

#[test]
fn durations_parse() {
    assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
    assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
    assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    for bad in ["", "5", "five minutes", "5x"] {
        assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
    }
}

#[test]
fn fingerprints_round_trip_and_reject_garbage() {
    let fingerprint: Fingerprint = FINGERPRINT.parse().unwrap();
    assert_eq!(fingerprint.to_string(), FINGERPRINT);
    assert_eq!(fingerprint.as_bytes()[1], 0x11);
    // One spelling only (lowercase), so configs compared with grep or diff agree.
    let upper = FINGERPRINT.to_uppercase().replace("SHA256:", "sha256:");
    assert!(upper.parse::<Fingerprint>().is_err());
    for bad in [
        "",
        "sha256:",
        "md5:00",
        &FINGERPRINT[..70],
        &format!("{FINGERPRINT}0"),
        FINGERPRINT_PLACEHOLDER,
    ] {
        assert!(bad.parse::<Fingerprint>().is_err(), "{bad:?} parsed");
    }
    let sign = format!("sha256:+{}", &FINGERPRINT[8..]);
    assert!(sign.parse::<Fingerprint>().is_err());
}

#[test]
fn disk_ids_are_stable_and_distinct() {
    // The value is part of the journal and wire format: changing the derivation breaks
    // existing journals and replicas, so it is pinned here.
    assert_eq!(disk_id("web-1", "os"), disk_id("web-1", "os"));
    assert_ne!(disk_id("web-1", "os"), disk_id("web-1", "data"));
    assert_ne!(disk_id("web-1", "os"), disk_id("web-2", "os"));
    assert_ne!(disk_id("a", "b/c"), 0);
    let expected = (twox_hash::XxHash3_64::oneshot(b"web-1/os") as u32).max(1);
    assert_eq!(disk_id("web-1", "os"), expected);
    // Reordering disks in the file does not change their ids.
    let first = Config::parse(&source_config(
        r#"{ name = "d1", path = "/d1", export = "/d1.sock" }"#,
    ))
    .unwrap();
    let swapped = source_config(r#"{ name = "d1", path = "/d1", export = "/d1.sock" }"#);
    let swapped = swapped.replacen(
        r#"{ name = "d0", path = "/tmp/d0.raw", export = "/tmp/d0.sock" },
  { name = "d1", path = "/d1", export = "/d1.sock" }"#,
        r#"{ name = "d1", path = "/d1", export = "/d1.sock" },
  { name = "d0", path = "/tmp/d0.raw", export = "/tmp/d0.sock" }"#,
        1,
    );
    let second = Config::parse(&swapped).unwrap();
    let ids = |config: &Config| {
        let mut ids: Vec<(String, u32)> = config.source.as_ref().unwrap().machine[0]
            .disks
            .iter()
            .map(|disk| (disk.name.clone(), disk.id))
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(
        second.source.as_ref().unwrap().machine[0].disks[0].name,
        "d1"
    );
    assert_eq!(ids(&first), ids(&second));
}

#[test]
fn load_resolves_relative_paths_against_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ferry.toml");
    let text = source_config(r#"{ name = "d1", path = "images/d1.raw", export = "d1.sock" }"#)
        .replace("/tmp/ferry-state", "state");
    std::fs::write(&path, text).unwrap();
    let config = Config::load(&path).unwrap();
    assert_eq!(config.appliance.state_dir, dir.path().join("state"));
    assert_eq!(
        config.control_socket(),
        dir.path().join("state/control.sock")
    );
    let disk = &config.source.as_ref().unwrap().machine[0].disks[1];
    assert_eq!(disk.path, dir.path().join("images/d1.raw"));
    assert_eq!(
        disk.export.as_deref(),
        Some(dir.path().join("d1.sock").as_path())
    );

    std::fs::write(&path, "[appliance]\nname = 5\n").unwrap();
    let error = Config::load(&path).unwrap_err();
    let message = error.to_string();
    assert!(
        message.starts_with(&format!("config {}: appliance.name:", path.display())),
        "{message}"
    );

    let missing = Config::load(&dir.path().join("absent.toml")).unwrap_err();
    assert!(missing.to_string().contains("cannot read"), "{missing}");
}

/// A two-appliance group as appliance "b" sees it, with `group_extra` added to the group.
fn member_config(group_extra: &str) -> String {
    format!(
        r#"
[appliance]
name = "b"
state_dir = "/tmp/ferry-state"

[source]
journal_size = "64MiB"
target = "127.0.0.1:7400"

[[source.group]]
name = "g"
{group_extra}

[[source.machine]]
name = "m"
group = "g"
disks = [{{ name = "d0", path = "/tmp/d0.raw", export = "/tmp/d0.sock" }}]
"#
    )
}

#[test]
fn group_members_default_their_barrier_address_and_coordinator() {
    let config = Config::parse(&member_config(&format!(
        r#"members = [{{ name = "a", address = "198.51.100.1:20004", fingerprint = "{FINGERPRINT}" }}]"#
    )))
    .unwrap();
    let group = &config.source.unwrap().group[0];
    assert_eq!(group.members[0].name, "a");
    assert_eq!(group.barrier_listen, Some("0.0.0.0:20004".parse().unwrap()));
    assert_eq!(group.coordinator.as_deref(), Some("a"), "smallest name");
    assert_eq!(group.member_names("b"), vec!["a", "b"]);

    let config = Config::parse(&member_config(&format!(
        "coordinator = \"b\"\nbarrier_listen = \"127.0.0.1:1234\"\nmembers = [{{ name = \"a\", address = \"h:1\", fingerprint = \"{FINGERPRINT}\" }}]"
    )))
    .unwrap();
    let group = &config.source.unwrap().group[0];
    assert_eq!(group.coordinator.as_deref(), Some("b"));
    assert_eq!(
        group.barrier_listen,
        Some("127.0.0.1:1234".parse().unwrap())
    );

    // Without members: no barrier, this appliance coordinates.
    let config = Config::parse(&member_config("")).unwrap();
    let group = &config.source.unwrap().group[0];
    assert!(group.members.is_empty() && group.barrier_listen.is_none());
}

#[test]
fn bad_group_members_name_their_key() {
    let member = |name: &str, address: &str| {
        format!(r#"{{ name = "{name}", address = "{address}", fingerprint = "{FINGERPRINT}" }}"#)
    };
    let cases = [
        (
            format!("members = [{}]", member("b", "h:1")),
            "source.group[0].members[0].name",
            "this appliance",
        ),
        (
            format!("members = [{}, {}]", member("a", "h:1"), member("a", "h:2")),
            "source.group[0].members[1].name",
            "duplicate member",
        ),
        (
            format!("members = [{}]", member("a", "nowhere")),
            "source.group[0].members[0].address",
            "host:port",
        ),
        (
            format!("coordinator = \"c\"\nmembers = [{}]", member("a", "h:1")),
            "source.group[0].coordinator",
            "neither",
        ),
        (
            "coordinator = \"a\"".to_string(),
            "source.group[0].coordinator",
            "no members",
        ),
        (
            "barrier_listen = \"127.0.0.1:1\"".to_string(),
            "source.group[0].barrier_listen",
            "no members",
        ),
        (
            r#"members = [{ name = "a", address = "h:1", fingerprint = "sha256:zz" }]"#.to_string(),
            "source.group[0].members[0].fingerprint",
            "",
        ),
    ];
    for (extra, key, reason) in cases {
        let (error_key, message) = error_of(&member_config(&extra));
        assert_eq!(error_key, key, "{extra}: {message}");
        assert!(message.contains(reason), "{extra}: {message}");
    }
}

#[test]
fn rbd_target_storage_parses_with_defaults_and_bad_keys_are_named() {
    let target = |body: &str| {
        format!(
            "[appliance]\nname = \"t\"\nstate_dir = \"/s\"\n[target]\nlisten = \"127.0.0.1:7400\"\nstorage_dir = \"/r\"\n{body}"
        )
    };
    let config = Config::parse(&target("")).unwrap();
    assert_eq!(config.target.unwrap().storage, StorageKind::File);

    let config = Config::parse(&target(
        "storage = \"rbd\"\n[target.rbd]\npool = \"replicas\"\nkeyring = \"/etc/ceph/ceph.client.ferry.keyring\"\nclient = \"ferry\"\n",
    ))
    .unwrap();
    let target_config = config.target.unwrap();
    assert_eq!(target_config.storage, StorageKind::Rbd);
    let rbd = target_config.rbd.unwrap();
    assert_eq!(rbd.pool, "replicas");
    assert_eq!(rbd.conf, Path::new("/etc/ceph/ceph.conf"));
    assert_eq!(
        rbd.keyring.as_deref(),
        Some(Path::new("/etc/ceph/ceph.client.ferry.keyring"))
    );
    assert_eq!(rbd.client, "ferry");
    assert_eq!(rbd.image_prefix, "ferry.");
    assert_eq!(rbd.libvirt_secret_usage, None);
    let config = Config::parse(&target(
        "storage = \"rbd\"\n[target.rbd]\npool = \"replicas\"\nlibvirt_secret_usage = \"ceph ferry\"\n",
    ))
    .unwrap();
    assert_eq!(
        config
            .target
            .unwrap()
            .rbd
            .unwrap()
            .libvirt_secret_usage
            .as_deref(),
        Some("ceph ferry")
    );

    let cases: [(&str, &str, &str); 7] = [
        ("storage = \"rbd\"\n", "target.rbd", "[target.rbd]"),
        (
            "[target.rbd]\npool = \"p\"\n",
            "target.rbd",
            "target.storage is \"file\"",
        ),
        ("storage = \"ceph\"\n", "target.storage", "unknown variant"),
        (
            "storage = \"rbd\"\n[target.rbd]\nconf = \"/c\"\n",
            "target.rbd",
            "pool",
        ),
        (
            "storage = \"rbd\"\n[target.rbd]\npool = \"\"\n",
            "target.rbd.pool",
            "must not be empty",
        ),
        (
            "storage = \"rbd\"\n[target.rbd]\npool = \"p\"\nclient = \"client.ferry\"\n",
            "target.rbd.client",
            "without `client.`",
        ),
        (
            "storage = \"rbd\"\n[target.rbd]\npool = \"p\"\nimage_prefix = \"a/b\"\n",
            "target.rbd.image_prefix",
            "letters",
        ),
    ];
    for (body, key, reason) in cases {
        let (error_key, message) = error_of(&target(body));
        assert!(
            error_key.starts_with(key),
            "{body}: key {error_key:?}: {message}"
        );
        assert!(message.contains(reason), "{body}: {message}");
    }
}

#[test]
fn write_behind_defaults_takes_a_size_and_has_a_limit() {
    let disk = r#"{ name = "d1", path = "/tmp/d1.raw", export = "/tmp/d1.sock" }"#;
    let source = Config::parse(&source_config(disk)).unwrap().source.unwrap();
    assert_eq!(source.write_behind_bytes, 32 << 20);
    let with = |value: &str| {
        source_config(disk).replace(
            r#"journal_size = "64MiB""#,
            &format!("journal_size = \"64MiB\"\nwrite_behind = {value}"),
        )
    };
    let source = Config::parse(&with(r#""0""#)).unwrap().source.unwrap();
    assert_eq!(source.write_behind_bytes, 0);
    let source = Config::parse(&with(r#""8MiB""#)).unwrap().source.unwrap();
    assert_eq!(source.write_behind_bytes, 8 << 20);
    let (key, message) = error_of(&with(r#""2GiB""#));
    assert_eq!(key, "source.write_behind");
    assert!(message.contains("above the maximum"), "{message}");
    let (key, _) = error_of(&with(r#""lots""#));
    assert_eq!(key, "source.write_behind");
}
