//! End-to-end recovery-point cuts on a source (issue "Recovery points, consistency groups,
//! failover"): a source and a target `ferry run` on loopback; `ferry recovery-point create`
//! prints the new point's id, the point is listed and turns usable once the target
//! acknowledged its marker; the timer cuts points on its own; a failing freeze hook refuses an
//! app-consistent point with the hook's status and stderr.

#[macro_use]
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

/// `recovery-point list --json`, or the command's stderr when it fails (a target answers an
/// error until the group's first point reached it).
fn try_list(appliance: &Appliance, group: &str) -> Result<serde_json::Value, String> {
    let mut args = vec![
        "recovery-point".to_string(),
        "list".to_string(),
        "--group".to_string(),
        group.to_string(),
        "--json".to_string(),
    ];
    args.extend(socket_args(appliance));
    let output = run_ferry(&args);
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    serde_json::from_slice(&output.stdout).map_err(|error| error.to_string())
}

/// `recovery-point create` on `appliance`; asserts success and returns the printed id.
fn create_point(appliance: &Appliance, group: &str) -> u64 {
    let mut create = vec![
        "recovery-point".to_string(),
        "create".to_string(),
        "--group".to_string(),
        group.to_string(),
    ];
    create.extend(socket_args(appliance));
    let output = run_ferry(&create);
    assert!(
        output.status.success(),
        "recovery-point create on {}: {}",
        appliance.name,
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("create printed {stdout:?}, not just an id"))
}

fn list(appliance: &Appliance, group: &str) -> serde_json::Value {
    try_list(appliance, group).unwrap_or_else(|error| panic!("recovery-point list: {error}"))
}

on_both_backends!(
    create_prints_an_id_the_point_replicates_and_hooks_are_enforced,
    points_age_out_of_retention_and_the_newest_stays_usable,
    a_group_across_two_sources_is_complete_at_the_target,
);

/// A source appliance site-a protecting disk web-1/os (`DISK_BYTES`, the first `random_bytes`
/// seeded random) in group "app", with `groups` as its `[[source.group]]` tables, shipping to a
/// target site-b on `backend`; both started and the disk protected. Returns (source, target,
/// the disk's export socket).
fn start_one_source(
    root: &std::path::Path,
    backend: &Backend,
    groups: &str,
    random_bytes: u64,
) -> (Appliance, Appliance, std::path::PathBuf) {
    let mut source = Appliance::new(root, "site-a");
    let mut target = Appliance::new(root, "site-b");
    let port = free_udp_port();
    let disk = root.join("web-1-os.raw");
    make_disk(&disk, DISK_BYTES, random_bytes, 3);
    let export = source.root.join("web-1-os.sock");
    target.write_config(&format!(
        "[target]\nlisten = \"127.0.0.1:{port}\"\nstorage_dir = \"{}\"\npeers = [{{ name = \"site-a\", fingerprint = \"{}\" }}]\n{}",
        target.root.join("storage").display(),
        source.fingerprint(),
        backend.target_keys(),
    ));
    source.write_config(&format!(
        r#"[source]
journal_size = "64MiB"
target = "127.0.0.1:{port}"
target_fingerprint = "{fingerprint}"

{groups}
[[source.machine]]
name = "web-1"
group = "app"
disks = [{{ name = "os", path = "{disk}", export = "{export}" }}]
"#,
        fingerprint = target.fingerprint(),
        disk = disk.display(),
        export = export.display(),
    ));
    target.start();
    source.start();
    wait_for("the disk to be protected", || {
        let status = source.try_status()?;
        (status["disks"][0]["state"] == "protected").then_some(())
    });
    (source, target, export)
}

fn create_prints_an_id_the_point_replicates_and_hooks_are_enforced(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let thawed = dir.path().join("thawed");
    let groups = format!(
        r#"[[source.group]]
name = "app"
recovery_point_interval = "2s"

[[source.group]]
name = "frozen"
recovery_point_interval = "1s"
freeze_hook = "echo database refuses to freeze >&2; exit 4"
thaw_hook = "touch {}"
"#,
        thawed.display()
    );
    let (mut source, mut target, export) = start_one_source(dir.path(), &backend, &groups, 1 << 20);

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

/// The timer cuts a point every second; points older than the group's 3 s retention leave the
/// target's catalog (pruned every 5 s) with the before-images only they needed, the newest
/// usable point stays, and a test failover to it reads the data written before it.
fn points_age_out_of_retention_and_the_newest_stays_usable(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let groups =
        "[[source.group]]\nname = \"app\"\nrecovery_point_interval = \"1s\"\nretention = \"3s\"\n";
    let (mut source, mut target, export) = start_one_source(dir.path(), &backend, groups, 0);
    qemu_io(&export, "web-1/os", &["write -P 0x11 0 1m".to_string()]);
    let first = wait_for("a usable point at the target", || {
        let points = try_list(&target, "app").ok()?;
        points["points"]
            .as_array()?
            .iter()
            .find(|point| point["usable"] == true)?["id"]
            .as_u64()
    });
    // Overwrite: the before-images of 0x11 belong to the points before this write.
    qemu_io(&export, "web-1/os", &["write -P 0x22 0 1m".to_string()]);
    let retained = wait_for("the first point to age out of retention", || {
        let points = try_list(&target, "app").ok()?;
        let ids: Vec<u64> = points["points"]
            .as_array()?
            .iter()
            .filter_map(|point| point["id"].as_u64())
            .collect();
        (!ids.contains(&first) && !ids.is_empty()).then_some(points)
    });
    let points = retained["points"].as_array().unwrap();
    assert!(
        points
            .iter()
            .all(|point| point["id"].as_u64().unwrap() > first),
        "a point older than the pruned one survived: {retained}"
    );
    assert!(
        points.iter().any(|point| point["usable"] == true),
        "no usable point left: {retained}"
    );
    // The pruner logs once it has also freed the before-images, after the catalog changed.
    wait_for("the prune to be logged", || {
        target
            .log()
            .contains("recovery points pruned")
            .then_some(())
    });

    // Every point cut after the overwrite holds 0x22; the newest usable one is never pruned.
    let after = create_point(&source, "app");
    wait_for("a usable point at or after the overwrite's", || {
        let points = try_list(&target, "app").ok()?;
        points["points"]
            .as_array()?
            .iter()
            .any(|point| {
                point["usable"] == true && point["id"].as_u64().is_some_and(|id| id >= after)
            })
            .then_some(())
    });
    let output = ferry(&[
        "failover",
        "--group",
        "app",
        "--point",
        "latest",
        "--test",
        "--json",
        "--socket",
        target.socket().to_str().unwrap(),
    ]);
    assert!(
        output.status.success(),
        "test failover ({}): {}\n{}",
        backend.name(),
        String::from_utf8_lossy(&output.stderr),
        target.log()
    );
    let answer: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let socket = std::path::PathBuf::from(answer["exports"][0]["socket"].as_str().unwrap());
    qemu_io(
        &socket,
        "web-1/os",
        &[
            "read -P 0x22 0 1m".to_string(),
            "read -P 0 1m 1m".to_string(),
        ],
    );
    let output = ferry(&[
        "failover",
        "cleanup",
        "--group",
        "app",
        "--socket",
        target.socket().to_str().unwrap(),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
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
    let TwoSourceGroup {
        mut a,
        mut b,
        exports,
        ..
    } = two_source_group(dir.path(), DISK_BYTES, 0, "1s", None);
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
    // site-b is configured but never started.
    let TwoSourceGroup { mut a, exports, .. } =
        two_source_group(dir.path(), DISK_BYTES, 0, "1h", None);
    let (export, export_name) = exports[0].clone();
    a.start();
    let mut create = vec![
        "recovery-point".to_string(),
        "create".to_string(),
        "--group".to_string(),
        "app".to_string(),
    ];
    create.extend(socket_args(&a));
    let output = run_ferry(&create);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("barrier") && stderr.contains("site-b"),
        "{stderr}"
    );
    // The gate is open again: a write completes, and the failed cut left no point behind.
    qemu_io(&export, &export_name, &["write -P 7 0 4k".to_string()]);
    assert!(list(&a, "app")["points"].as_array().unwrap().is_empty());
    a.stop();
}

/// Two source appliances of one group shipping to one target: once both disks are protected,
/// a point created on the coordinator is complete and usable in the target's catalog (the
/// markers' `members` are the names the target knows its peers by).
fn a_group_across_two_sources_is_complete_at_the_target(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let TwoSourceGroup {
        mut a,
        mut b,
        target,
        exports,
    } = two_source_group(dir.path(), DISK_BYTES, 1 << 20, "1h", Some(&backend));
    let mut target = target.unwrap();
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
    let id = create_point(&a, "app");
    wait_for("the point to be complete and usable at the target", || {
        let listed = try_list(&target, "app").ok()?;
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
