//! End-to-end recovery-point cuts on a source (issue "Recovery points, consistency groups,
//! failover"): a source and a target `ferry run` on loopback; `ferry recovery-point create`
//! prints the new point's id, the point is listed and turns usable once the target
//! acknowledged its marker; the timer cuts points on its own; a failing freeze hook refuses an
//! app-consistent point with the hook's status and stderr.

mod support;

use std::process::Output;

use support::*;

const DISK_BYTES: u64 = 16 << 20;

fn socket_args(appliance: &Appliance) -> [String; 2] {
    [
        "--socket".to_string(),
        appliance.socket().display().to_string(),
    ]
}

fn run_ferry(args: &[String]) -> Output {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ferry(&args)
}

fn list(appliance: &Appliance, group: &str) -> serde_json::Value {
    let mut args = vec![
        "recovery-point".to_string(),
        "list".to_string(),
        "--group".to_string(),
        group.to_string(),
        "--json".to_string(),
    ];
    args.extend(socket_args(appliance));
    let output = run_ferry(&args);
    assert!(
        output.status.success(),
        "recovery-point list: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn create_prints_an_id_the_point_replicates_and_hooks_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let mut source = Appliance::new(dir.path(), "site-a");
    let mut target = Appliance::new(dir.path(), "site-b");
    let port = free_udp_port();
    let disk = dir.path().join("web-1-os.raw");
    make_disk(&disk, DISK_BYTES, 1 << 20, 3);
    let export = source.root.join("web-1-os.sock");
    let thawed = dir.path().join("thawed");
    target.write_config(&format!(
        "[target]\nlisten = \"127.0.0.1:{port}\"\nstorage_dir = \"{}\"\npeers = [{{ name = \"site-a\", fingerprint = \"{}\" }}]\n",
        target.root.join("storage").display(),
        source.fingerprint(),
    ));
    source.write_config(&format!(
        r#"[source]
journal_size = "64MiB"
target = "127.0.0.1:{port}"
target_fingerprint = "{fingerprint}"

[[source.group]]
name = "app"
recovery_point_interval = "2s"

[[source.group]]
name = "frozen"
recovery_point_interval = "1s"
freeze_hook = "echo database refuses to freeze >&2; exit 4"
thaw_hook = "touch {thawed}"

[[source.machine]]
name = "web-1"
group = "app"
disks = [{{ name = "os", path = "{disk}", export = "{export}" }}]
"#,
        fingerprint = target.fingerprint(),
        thawed = thawed.display(),
        disk = disk.display(),
        export = export.display(),
    ));
    target.start();
    source.start();
    wait_for("the disk to be protected", || {
        let status = source.try_status()?;
        (status["disks"][0]["state"] == "protected").then_some(())
    });

    qemu_io(&export, "web-1/os", &["write -P 0x5a 0 64k".to_string()]);
    let mut create = vec![
        "recovery-point".to_string(),
        "create".to_string(),
        "--group".to_string(),
        "app".to_string(),
    ];
    create.extend(socket_args(&source));
    let output = run_ferry(&create);
    assert!(
        output.status.success(),
        "recovery-point create: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        source.log()
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    let id: u64 = stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("create printed {stdout:?}, not just an id"));

    // Listed at once; usable once the target acknowledged the marker.
    let point_of = |points: &serde_json::Value| {
        points["points"]
            .as_array()
            .unwrap()
            .iter()
            .find(|point| point["id"] == id)
            .cloned()
    };
    assert!(point_of(&list(&source, "app")).is_some());
    wait_for("the point's marker to be acknowledged", || {
        let point = point_of(&list(&source, "app"))?;
        (point["usable"] == true).then_some(())
    });
    assert_eq!(
        point_of(&list(&source, "app")).unwrap()["consistency"],
        "crash"
    );
    // The 2 s timer cuts points on its own.
    wait_for("a timer point after the created one", || {
        let points = list(&source, "app");
        points["points"]
            .as_array()?
            .iter()
            .any(|point| point["id"].as_u64() > Some(id))
            .then_some(())
    });
    let status = source.status();
    let group = status["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|group| group["name"] == "app")
        .unwrap()
        .clone();
    assert!(group["recovery_points"]
        .as_array()
        .unwrap()
        .iter()
        .any(|point| point["id"] == id));
    assert!(group["latest_point_age_seconds"].as_f64().unwrap() >= 0.0);

    // The "frozen" group's timer runs every second but has no disks here: nothing to cut; an
    // app-consistent point there fails in the freeze hook, and the thaw hook still runs.
    let mut app = vec![
        "recovery-point".to_string(),
        "create".to_string(),
        "--group".to_string(),
        "frozen".to_string(),
        "--app-consistent".to_string(),
    ];
    app.extend(socket_args(&source));
    let output = run_ferry(&app);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("freeze_hook")
            && stderr.contains("exit status: 4")
            && stderr.contains("database refuses to freeze"),
        "{stderr}"
    );
    assert!(output.stdout.is_empty());
    assert!(thawed.exists());
    assert!(list(&source, "frozen")["points"]
        .as_array()
        .unwrap()
        .is_empty());

    // Unknown group: exit 1 and a message naming it.
    let mut unknown = vec![
        "recovery-point".to_string(),
        "create".to_string(),
        "--group".to_string(),
        "nope".to_string(),
    ];
    unknown.extend(socket_args(&source));
    let output = run_ferry(&unknown);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("\"nope\""));

    source.stop();
    target.stop();
}

/// Writes and markers of one source's journal (read after the appliance stopped).
struct JournalView {
    /// offset → sequence of the (single) write at that offset.
    writes: std::collections::BTreeMap<u64, u64>,
    /// point id → marker sequence.
    markers: std::collections::BTreeMap<u64, u64>,
}

fn read_journal(appliance: &Appliance) -> JournalView {
    use ferry_appliance::capture::SharedJournal;
    use ferry_appliance::core::record::RecordKind;
    use ferry_appliance::core::recovery::PointMarker;
    let (journal, _) =
        SharedJournal::open_mmap(&appliance.state_dir().join("journal"), 64 << 20).unwrap();
    let guard = journal.lock();
    let mut view = JournalView {
        writes: Default::default(),
        markers: Default::default(),
    };
    for record in guard.iter_from(guard.first_seq()) {
        let record = record.unwrap();
        match record.kind {
            RecordKind::Write => {
                assert!(
                    view.writes.insert(record.offset, record.seq).is_none(),
                    "each offset is written once"
                );
            }
            RecordKind::Marker => {
                let marker = PointMarker::decode(record.payload).unwrap();
                assert_eq!(marker.group, "app");
                assert_eq!(marker.members, vec!["site-a", "site-b"]);
                view.markers.insert(marker.point_id, record.seq);
            }
            _ => {}
        }
    }
    view
}

/// The issue's dependent-write test: disk A on appliance site-a, disk B on site-b, one group
/// cut through the barrier while the workload writes block i on A, waits for the
/// acknowledgement, then writes block i on B. No point may hold B's write i without A's.
#[test]
fn dependent_writes_across_two_source_appliances_never_split_a_point() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Appliance::new(dir.path(), "site-a");
    let mut b = Appliance::new(dir.path(), "site-b");
    let (port_a, port_b) = (free_udp_port(), free_udp_port());
    let (fingerprint_a, fingerprint_b) = (a.fingerprint(), b.fingerprint());
    let mut exports = Vec::new();
    for (appliance, machine, own_port, other, other_port, other_fingerprint) in [
        (&a, "db-1", port_a, "site-b", port_b, &fingerprint_b),
        (&b, "app-1", port_b, "site-a", port_a, &fingerprint_a),
    ] {
        let disk = appliance.root.join("data.raw");
        make_disk(&disk, DISK_BYTES, 0, 1);
        let export = appliance.root.join("data.sock");
        // No target: nothing is shipped or released, so the journals keep every record.
        appliance.write_config(&format!(
            r#"[source]
journal_size = "64MiB"
target = "127.0.0.1:9"

[[source.group]]
name = "app"
recovery_point_interval = "1s"
barrier_listen = "127.0.0.1:{own_port}"
members = [{{ name = "{other}", address = "127.0.0.1:{other_port}", fingerprint = "{other_fingerprint}" }}]

[[source.machine]]
name = "{machine}"
group = "app"
disks = [{{ name = "data", path = "{disk}", export = "{export}" }}]
"#,
            disk = disk.display(),
            export = export.display(),
        ));
        exports.push((export, format!("{machine}/data")));
    }
    b.start();
    a.start();

    // Only the coordinator (site-a, the smallest name) cuts.
    let mut on_b = vec![
        "recovery-point".to_string(),
        "create".to_string(),
        "--group".to_string(),
        "app".to_string(),
    ];
    on_b.extend(socket_args(&b));
    let output = run_ferry(&on_b);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("coordinator \"site-a\""));

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cutting = {
        let stop = stop.clone();
        let mut create = vec![
            "recovery-point".to_string(),
            "create".to_string(),
            "--group".to_string(),
            "app".to_string(),
        ];
        create.extend(socket_args(&a));
        std::thread::spawn(move || {
            let mut created = Vec::new();
            for _ in 0..500 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let output = run_ferry(&create);
                if output.status.success() {
                    created.push(String::from_utf8(output.stdout).unwrap().trim().to_string());
                } else {
                    eprintln!("create failed: {}", String::from_utf8_lossy(&output.stderr));
                }
            }
            created
        })
    };
    const BLOCKS: u64 = 40;
    for block in 0..BLOCKS {
        let command = format!("write -P {} {} 4k", block % 250 + 1, block * 4096);
        qemu_io(&exports[0].0, &exports[0].1, std::slice::from_ref(&command));
        qemu_io(&exports[1].0, &exports[1].1, &[command]);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let created = cutting.join().unwrap();
    assert!(
        created.len() >= 3,
        "cuts created during the workload: {created:?}"
    );
    let listed = list(&a, "app");
    assert!(listed["points"].as_array().unwrap().len() >= created.len());
    a.stop();
    b.stop();

    // What the cuts cost: how long each appliance's gate held new writes (from the logs).
    for appliance in [&a, &b] {
        let mut held: Vec<u64> = appliance
            .log()
            .lines()
            .filter_map(|line| line.split("gate_held_us=").nth(1))
            .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
            .collect();
        held.sort_unstable();
        if let (Some(max), Some(median)) = (held.last(), held.get(held.len() / 2)) {
            eprintln!(
                "{}: gate held new writes for a median of {median} us, at most {max} us, over {} cuts",
                appliance.name,
                held.len()
            );
        }
    }
    let (journal_a, journal_b) = (read_journal(&a), read_journal(&b));
    assert_eq!(journal_a.writes.len() as u64, BLOCKS);
    assert_eq!(journal_b.writes.len() as u64, BLOCKS);
    let mut checked = 0;
    let mut splitting = 0;
    for (point, &marker_b) in &journal_b.markers {
        let Some(&marker_a) = journal_a.markers.get(point) else {
            continue;
        };
        checked += 1;
        let (before_a, before_b) = (
            journal_a
                .writes
                .values()
                .filter(|&&seq| seq < marker_a)
                .count(),
            journal_b
                .writes
                .values()
                .filter(|&&seq| seq < marker_b)
                .count(),
        );
        if before_b > 0 && before_b < BLOCKS as usize {
            splitting += 1;
        }
        for (offset, &seq_b) in &journal_b.writes {
            if seq_b < marker_b {
                let seq_a = journal_a.writes[offset];
                assert!(
                    seq_a < marker_a,
                    "point {point} holds B's write at {offset} (seq {seq_b} < marker {marker_b}) but not A's (seq {seq_a} >= marker {marker_a}); A before: {before_a}, B before: {before_b}"
                );
            }
        }
    }
    for id in &created {
        let id: u64 = id.parse().unwrap();
        assert!(
            journal_a.markers.contains_key(&id) && journal_b.markers.contains_key(&id),
            "created point {id} has both markers"
        );
    }
    eprintln!(
        "{} points created, {checked} on both appliances, {splitting} inside the workload",
        created.len()
    );
    assert!(checked >= 3, "points on both appliances: {checked}");
    assert!(
        splitting >= 1,
        "at least one point falls inside the workload"
    );
}

/// A member that is down: the coordinator's cut fails within the barrier timeout, names the
/// member, and its gate opens again, so writes go on.
#[test]
fn a_missing_member_fails_the_point_without_stalling_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Appliance::new(dir.path(), "site-a");
    let b = Appliance::new(dir.path(), "site-b");
    let disk = a.root.join("data.raw");
    make_disk(&disk, DISK_BYTES, 0, 1);
    let export = a.root.join("data.sock");
    a.write_config(&format!(
        r#"[source]
journal_size = "64MiB"
target = "127.0.0.1:9"

[[source.group]]
name = "app"
recovery_point_interval = "1h"
barrier_listen = "127.0.0.1:{own_port}"
members = [{{ name = "site-b", address = "127.0.0.1:{other_port}", fingerprint = "{fingerprint}" }}]

[[source.machine]]
name = "db-1"
group = "app"
disks = [{{ name = "data", path = "{disk}", export = "{export}" }}]
"#,
        own_port = free_udp_port(),
        other_port = free_udp_port(),
        fingerprint = b.fingerprint(),
        disk = disk.display(),
        export = export.display(),
    ));
    a.start();
    let mut create = vec![
        "recovery-point".to_string(),
        "create".to_string(),
        "--group".to_string(),
        "app".to_string(),
    ];
    create.extend(socket_args(&a));
    let started = std::time::Instant::now();
    let output = run_ferry(&create);
    let elapsed = started.elapsed();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("barrier") && stderr.contains("site-b"),
        "{stderr}"
    );
    assert!(elapsed < std::time::Duration::from_secs(10), "{elapsed:?}");
    qemu_io(&export, "db-1/data", &["write -P 7 0 4k".to_string()]);
    assert!(list(&a, "app")["points"].as_array().unwrap().is_empty());
    a.stop();
}

/// Two source appliances of one group shipping to one target: once both disks are protected,
/// a point created on the coordinator is complete and usable in the target's catalog (the
/// markers' `members` are the names the target knows its peers by).
#[test]
fn a_group_across_two_sources_is_complete_at_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Appliance::new(dir.path(), "site-a");
    let mut b = Appliance::new(dir.path(), "site-b");
    let mut target = Appliance::new(dir.path(), "site-dr");
    let (port_a, port_b, port_target) = (free_udp_port(), free_udp_port(), free_udp_port());
    let (fingerprint_a, fingerprint_b) = (a.fingerprint(), b.fingerprint());
    let fingerprint_target = target.fingerprint();
    target.write_config(&format!(
        "[target]\nlisten = \"127.0.0.1:{port_target}\"\nstorage_dir = \"{}\"\npeers = [{{ name = \"site-a\", fingerprint = \"{fingerprint_a}\" }}, {{ name = \"site-b\", fingerprint = \"{fingerprint_b}\" }}]\n",
        target.root.join("storage").display(),
    ));
    let mut exports = Vec::new();
    for (appliance, machine, own_port, other, other_port, other_fingerprint) in [
        (&a, "db-1", port_a, "site-b", port_b, &fingerprint_b),
        (&b, "app-1", port_b, "site-a", port_a, &fingerprint_a),
    ] {
        let disk = appliance.root.join("data.raw");
        make_disk(&disk, DISK_BYTES, 1 << 20, 5);
        let export = appliance.root.join("data.sock");
        appliance.write_config(&format!(
            r#"[source]
journal_size = "64MiB"
target = "127.0.0.1:{port_target}"
target_fingerprint = "{fingerprint_target}"

[[source.group]]
name = "app"
recovery_point_interval = "1h"
barrier_listen = "127.0.0.1:{own_port}"
members = [{{ name = "{other}", address = "127.0.0.1:{other_port}", fingerprint = "{other_fingerprint}" }}]

[[source.machine]]
name = "{machine}"
group = "app"
disks = [{{ name = "data", path = "{disk}", export = "{export}" }}]
"#,
            disk = disk.display(),
            export = export.display(),
        ));
        exports.push((export, format!("{machine}/data")));
    }
    target.start();
    b.start();
    a.start();
    for appliance in [&a, &b] {
        wait_for("the disk to be protected", || {
            let status = appliance.try_status()?;
            (status["disks"][0]["state"] == "protected").then_some(())
        });
    }
    qemu_io(
        &exports[0].0,
        &exports[0].1,
        &["write -P 1 0 4k".to_string()],
    );
    qemu_io(
        &exports[1].0,
        &exports[1].1,
        &["write -P 2 0 4k".to_string()],
    );
    let mut create = vec![
        "recovery-point".to_string(),
        "create".to_string(),
        "--group".to_string(),
        "app".to_string(),
    ];
    create.extend(socket_args(&a));
    let output = run_ferry(&create);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let id: u64 = String::from_utf8(output.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_for("the point to be complete and usable at the target", || {
        let mut args = vec![
            "recovery-point".to_string(),
            "list".to_string(),
            "--group".to_string(),
            "app".to_string(),
            "--json".to_string(),
        ];
        args.extend(socket_args(&target));
        let output = run_ferry(&args);
        if !output.status.success() {
            return None;
        }
        let listed: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
        let point = listed["points"]
            .as_array()?
            .iter()
            .find(|point| point["id"] == id)?
            .clone();
        (point["usable"] == true).then_some(())
    });
    // The member logged the point it cut, too.
    wait_for("the member to list the point as replicated", || {
        let listed = list(&b, "app");
        let point = listed["points"]
            .as_array()?
            .iter()
            .find(|point| point["id"] == id)?
            .clone();
        (point["usable"] == true).then_some(())
    });
    a.stop();
    b.stop();
    target.stop();
}
