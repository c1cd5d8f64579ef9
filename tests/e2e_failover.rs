//! End-to-end failover (issue "Recovery points, consistency groups, failover"): a source and a
//! target `ferry run` on loopback. Pattern A, point P1, pattern B, point P2; test failovers to
//! P1 and to P2 read A and B through the failover export (qemu-io `read -P`) and in the
//! materialised image (`cmp`), while the source keeps writing and replicating; a planned
//! failover loses nothing; reprotect and failback bring the writes made during the failover back
//! to the source; an unplanned failover with the source gone survives a target restart.
//! On RBD each failover also makes an RBD clone of the replica at the point (the image a
//! hypervisor boots from, served by the export too): `rbd export` of it is the point while the
//! replica keeps replicating, and cleanup or failback leaves no clone and no snapshot.

#[macro_use]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::*;

const DISK_BYTES: u64 = 16 << 20;
const EXPORT: &str = "web-1/os";

fn run_ferry(args: &[String]) -> Output {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ferry(&args)
}

/// `ferry ARGS --socket <appliance's socket>`; asserts success and returns stdout.
fn ferry_ok(appliance: &Appliance, args: &[&str]) -> String {
    let output = ferry_on(appliance, args);
    assert!(
        output.status.success(),
        "ferry {args:?}: {}\n--- {} log ---\n{}",
        String::from_utf8_lossy(&output.stderr),
        appliance.name,
        appliance.log()
    );
    String::from_utf8(output.stdout).unwrap()
}

fn ferry_on(appliance: &Appliance, args: &[&str]) -> Output {
    let mut all: Vec<String> = args.iter().map(|arg| arg.to_string()).collect();
    all.push("--socket".into());
    all.push(appliance.socket().display().to_string());
    run_ferry(&all)
}

struct Site {
    _dir: tempfile::TempDir,
    root: PathBuf,
    source: Appliance,
    target: Appliance,
    disk: PathBuf,
    export: PathBuf,
    /// Last: the appliances stop before the cluster does.
    _backend: Backend,
}

/// A source protecting one disk of machine web-1 (group "app") and a target on `backend`
/// mapping its network; both started and the disk protected.
fn site(backend: Backend) -> Site {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let mut source = Appliance::new(&root, "site-a");
    let mut target = Appliance::new(&root, "site-b");
    let port = free_udp_port();
    let disk = root.join("web-1-os.raw");
    make_disk(&disk, DISK_BYTES, 0, 1);
    let export = source.root.join("web-1-os.sock");
    target.write_config(&format!(
        r#"[target]
listen = "127.0.0.1:{port}"
storage_dir = "{storage}"
peers = [{{ name = "site-a", fingerprint = "{fingerprint}" }}]
{backend_keys}
[target.mapping]
resource_group = "rg-dr"
networks = {{ prod = "dr-prod" }}
test_network = "dr-test"
"#,
        storage = target.root.join("storage").display(),
        fingerprint = source.fingerprint(),
        backend_keys = backend.target_keys(),
    ));
    source.write_config(&format!(
        r#"[source]
journal_size = "64MiB"
target = "127.0.0.1:{port}"
target_fingerprint = "{fingerprint}"

[[source.group]]
name = "app"
recovery_point_interval = "1h"

[[source.machine]]
name = "web-1"
group = "app"
availability_set = "web"
nics = [{{ network = "prod", subnet = "front", ip = "10.0.0.4" }}]
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
    Site {
        _dir: dir,
        root,
        source,
        target,
        disk,
        export,
        _backend: backend,
    }
}

/// Cuts a point on the source and waits until the target lists it usable; returns its id.
fn cut_point(site: &Site) -> u64 {
    let stdout = ferry_ok(
        &site.source,
        &["recovery-point", "create", "--group", "app"],
    );
    let id: u64 = stdout.trim().parse().expect("create prints an id");
    wait_for(&format!("point {id} usable on the target"), || {
        let output = ferry_on(
            &site.target,
            &["recovery-point", "list", "--group", "app", "--json"],
        );
        if !output.status.success() {
            return None;
        }
        let points: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
        points["points"]
            .as_array()?
            .iter()
            .any(|point| point["id"] == id && point["usable"] == true)
            .then_some(())
    });
    id
}

/// `ferry failover ... --json` on the target; returns the answer.
fn failover(site: &Site, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["failover", "--group", "app", "--json"];
    args.extend_from_slice(extra);
    serde_json::from_str(&ferry_ok(&site.target, &args)).unwrap()
}

fn export_socket(answer: &serde_json::Value) -> PathBuf {
    let export = &answer["exports"][0];
    assert_eq!(export["export_name"], EXPORT);
    PathBuf::from(export["socket"].as_str().unwrap())
}

/// Waits until the appliance's status shows the group in `state` (status is sampled a few
/// times a second); returns the group.
fn wait_state(appliance: &Appliance, state: &str) -> serde_json::Value {
    wait_for(&format!("group app {state} on {}", appliance.name), || {
        let status = appliance.try_status()?;
        let group = status["groups"]
            .as_array()?
            .iter()
            .find(|group| group["name"] == "app")?
            .clone();
        (group["state"] == state).then_some(group)
    })
}

/// Runs qemu-io and returns whether every command succeeded.
fn qemu_io_succeeds(socket: &Path, commands: &[&str]) -> bool {
    qemu_io_with(socket, &[], commands)
}

fn qemu_io_with(socket: &Path, options: &[&str], commands: &[&str]) -> bool {
    let mut args: Vec<String> = options.iter().map(|option| option.to_string()).collect();
    args.extend([
        "-f".to_string(),
        "raw".to_string(),
        format!("nbd+unix:///{EXPORT}?socket={}", socket.display()),
    ]);
    for command in commands {
        args.push("-c".into());
        args.push(command.to_string());
    }
    let output = Command::new("qemu-io").args(&args).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    output.status.success()
        && !stdout.contains("failed")
        && !stdout.contains("Pattern verification")
}

fn io(socket: &Path, commands: &[&str]) {
    let commands: Vec<String> = commands.iter().map(|c| c.to_string()).collect();
    qemu_io(socket, EXPORT, &commands);
}

/// On RBD: the failover's clone named in the answer (`pool/image`), and its bytes must equal
/// `expected` now; the replica's failover snapshot exists. On files: no clone is named.
fn check_clone(site: &Site, answer: &serde_json::Value, expected: &Path) {
    let named = &answer["exports"][0]["rbd_image"];
    let Some(cluster) = site._backend.cluster() else {
        assert!(named.is_null(), "a clone on the files backend: {answer}");
        return;
    };
    let spec = named
        .as_str()
        .unwrap_or_else(|| panic!("no rbd_image in {answer}"));
    assert!(
        spec.starts_with("rbd/") && spec.ends_with("+failover+app"),
        "{spec}"
    );
    let images = rbd_lines(cluster, &["ls", "rbd"]);
    assert!(
        images.iter().any(|image| format!("rbd/{image}") == spec),
        "{images:?}"
    );
    let replica = spec
        .trim_start_matches("rbd/")
        .trim_end_matches("+failover+app");
    let snapshots = rbd_lines(cluster, &["snap", "ls", &format!("rbd/{replica}")]);
    assert!(
        snapshots
            .iter()
            .any(|line| line.contains(&format!("ferry-failover+app+{}", answer["point"]["id"]))),
        "{snapshots:?}"
    );
    let exported = site.root.join("clone-export.raw");
    let _ = std::fs::remove_file(&exported);
    let output = cluster.rbd(&["export", spec, exported.to_str().unwrap()]);
    assert!(output.status.success(), "rbd export {spec}: {output:?}");
    assert!(
        same_bytes(&exported, expected),
        "the clone {spec} differs from the point"
    );
}

/// Writes `length` bytes of `pattern` at `offset` into RBD image `image` of pool `rbd` with a
/// client of its own (as a hypervisor booted from the image would), flushed and closed.
fn write_into_image(
    cluster: &ferry_appliance::io::rbd::test_cluster::TestCluster,
    image: &str,
    offset: u64,
    pattern: u8,
    length: usize,
) {
    use ferry_appliance::io::disk::IoBuf;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let image = cluster.pool().unwrap().open_image(image).unwrap();
    runtime.block_on(async {
        let (result, _) = image
            .write_at(offset, IoBuf::from_slice(&vec![pattern; length]))
            .await;
        result.expect("write into the clone");
        image.flush().await.expect("flush the clone");
    });
}

/// On RBD: no failover clone and no failover snapshot is left in the pool.
fn check_no_clone(site: &Site) {
    let Some(cluster) = site._backend.cluster() else {
        return;
    };
    let images = rbd_lines(cluster, &["ls", "rbd"]);
    assert!(!images.is_empty());
    for image in &images {
        assert!(!image.contains("+failover+"), "clone left: {images:?}");
        let snapshots = rbd_lines(cluster, &["snap", "ls", &format!("rbd/{image}")]);
        assert!(
            snapshots
                .iter()
                .all(|line| !line.contains("ferry-failover")),
            "snapshot left on {image}: {snapshots:?}"
        );
    }
}

fn rbd_lines(
    cluster: &ferry_appliance::io::rbd::test_cluster::TestCluster,
    args: &[&str],
) -> Vec<String> {
    let output = cluster.rbd(args);
    assert!(output.status.success(), "rbd {args:?}: {output:?}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// The disk image expected at a point: `writes` of (pattern, offset, length) over zeros.
fn expected_image(path: &Path, writes: &[(u8, u64, u64)]) {
    let mut bytes = vec![0u8; DISK_BYTES as usize];
    for &(pattern, offset, length) in writes {
        bytes[offset as usize..(offset + length) as usize].fill(pattern);
    }
    std::fs::write(path, bytes).unwrap();
}

on_both_backends!(
    test_failovers_to_two_points_read_each_points_data_while_replication_continues,
    planned_failover_loses_nothing_and_failback_brings_the_failover_writes_home,
    unplanned_failover_without_the_source_survives_a_target_restart,
    dependent_writes_across_two_source_appliances_never_split_a_failed_over_point,
);

fn test_failovers_to_two_points_read_each_points_data_while_replication_continues(
    backend: Backend,
) {
    let mut site = site(backend);
    io(&site.export, &["write -P 0xa1 0 1M"]);
    let p1 = cut_point(&site);
    io(
        &site.export,
        &["write -P 0xb2 0 1M", "write -P 0xb2 4M 64k"],
    );
    let p2 = cut_point(&site);
    assert!(p2 > p1);

    // A test failover to P1, materialised.
    let out = site.root.join("out-p1");
    let answer = failover(
        &site,
        &[
            "--point",
            &p1.to_string(),
            "--test",
            "--materialize",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(answer["point"]["id"], p1);
    assert_eq!(answer["test"], true);
    let socket = export_socket(&answer);
    io(&socket, &["read -P 0xa1 0 1M", "read -P 0 4M 64k"]);
    let image = out.join("web-1").join("os.raw");
    assert_eq!(
        answer["exports"][0]["materialized_path"],
        image.display().to_string()
    );
    let expected = site.root.join("expected-p1.raw");
    expected_image(&expected, &[(0xa1, 0, 1 << 20)]);
    assert!(same_bytes(&image, &expected), "materialised P1 differs");
    // On RBD the clone is P1 too, though the replica holds P2's writes over it.
    check_clone(&site, &answer, &expected);

    // The machine definition: mapped settings, test network, the export as its disk.
    let definition: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("web-1").join("web-1.json")).unwrap())
            .unwrap();
    assert_eq!(definition["resource_group"], "rg-dr");
    assert_eq!(definition["nics"][0]["network"], "dr-test");
    assert_eq!(definition["nics"][0]["ip"], "10.0.0.4");
    assert_eq!(definition["recovery_point"]["id"], p1);
    assert_eq!(definition["disks"][0]["image"], image.display().to_string());
    if site._backend.cluster().is_some() {
        assert_eq!(
            format!(
                "rbd/{}",
                definition["disks"][0]["rbd"]["image"].as_str().unwrap()
            ),
            answer["exports"][0]["rbd_image"].as_str().unwrap()
        );
        assert_eq!(definition["disks"][0]["rbd"]["user"], "admin");
        assert!(definition["disks"][0]["rbd"]["monitors"][0]["host"]
            .as_str()
            .is_some_and(|host| host == "127.0.0.1"));
    }
    let xml = std::fs::read_to_string(out.join("web-1").join("web-1.xml")).unwrap();
    assert!(xml.contains("<name>web-1-test</name>"), "{xml}");
    assert!(xml.contains("<source network='dr-test'/>"), "{xml}");

    // Status on the target shows the test failover and its export.
    let group = wait_state(&site.target, "test-failover");
    assert_eq!(group["exports"][0]["socket"], socket.display().to_string());

    // Replication keeps going beside the test failover; the test copy does not move.
    io(&site.export, &["write -P 0xc3 8M 1M"]);
    // The test machine writes into its overlay, never into the replica or the source.
    io(&socket, &["write -P 0xdd 12M 64k", "read -P 0xdd 12M 64k"]);
    io(&socket, &["read -P 0 8M 1M"]);
    let verify = ferry_on(&site.source, &["verify", "--all"]);
    assert!(
        verify.status.success(),
        "verify during a test failover: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    io(&site.export, &["read -P 0 12M 64k"]);
    // On RBD the export serves the clone: the test machine's write is in it, the replication
    // write is not.
    let expected_written = site.root.join("expected-p1-written.raw");
    expected_image(
        &expected_written,
        &[(0xa1, 0, 1 << 20), (0xdd, 12 << 20, 64 << 10)],
    );
    check_clone(&site, &answer, &expected_written);

    // A second failover while the test runs is refused, naming the cleanup.
    let refused = ferry_on(&site.target, &["failover", "--group", "app"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("ferry failover cleanup --group app"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    ferry_ok(&site.target, &["failover", "cleanup", "--group", "app"]);
    wait_state(&site.target, "protected");
    assert!(
        !socket.exists(),
        "the export's socket is gone after cleanup"
    );
    check_no_clone(&site);
    // The materialised image is the operator's: cleanup leaves it.
    assert!(image.exists());

    // A test failover to P2 reads B, through the export and in the image.
    let out = site.root.join("out-p2");
    let answer = failover(
        &site,
        &[
            "--point",
            &p2.to_string(),
            "--test",
            "--materialize",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    let socket = export_socket(&answer);
    io(
        &socket,
        &[
            "read -P 0xb2 0 1M",
            "read -P 0xb2 4M 64k",
            "read -P 0 8M 1M",
        ],
    );
    let expected = site.root.join("expected-p2.raw");
    expected_image(&expected, &[(0xb2, 0, 1 << 20), (0xb2, 4 << 20, 64 << 10)]);
    assert!(same_bytes(&out.join("web-1").join("os.raw"), &expected));
    // Replication wrote 0xc3 at 8M after P2: not in P2's clone.
    check_clone(&site, &answer, &expected);
    // The failover record is all a restarted target needs to bring the test failover back and
    // to remove it (with its clone and snapshot on RBD).
    site.target.stop();
    site.target.start();
    wait_state(&site.target, "test-failover");
    io(&socket, &["read -P 0xb2 0 1M", "read -P 0 8M 1M"]);
    ferry_ok(&site.target, &["failover", "cleanup", "--group", "app"]);
    check_no_clone(&site);

    // Cleanup of a group with no test failover, an unknown point: clear errors.
    let nothing = ferry_on(&site.target, &["failover", "cleanup", "--group", "app"]);
    assert_eq!(nothing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&nothing.stderr).contains("no test failover"));
    let unknown = ferry_on(
        &site.target,
        &["failover", "--group", "app", "--point", "999999", "--test"],
    );
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("999999"));
}

fn planned_failover_loses_nothing_and_failback_brings_the_failover_writes_home(backend: Backend) {
    let mut site = site(backend);
    io(&site.export, &["write -P 0xa1 0 1M"]);
    cut_point(&site);
    // Written after the last point: a planned failover must still carry it.
    io(&site.export, &["write -P 0xc3 2M 256k"]);

    let answer = failover(&site, &["--planned"]);
    assert_eq!(answer["test"], false);
    let socket = export_socket(&answer);
    io(&socket, &["read -P 0xa1 0 1M", "read -P 0xc3 2M 256k"]);
    let expected_planned = site.root.join("expected-planned.raw");
    expected_image(
        &expected_planned,
        &[(0xa1, 0, 1 << 20), (0xc3, 2 << 20, 256 << 10)],
    );
    check_clone(&site, &answer, &expected_planned);
    wait_state(&site.target, "failed-over");
    // The source's export refuses writes now; reads still work.
    assert!(!qemu_io_succeeds(&site.export, &["write -P 0xee 0 4k"]));
    assert!(qemu_io_with(&site.export, &["-r"], &["read -P 0xa1 0 4k"]));
    // Impossible transitions are refused with the state.
    let refused = ferry_on(&site.target, &["failback", "--group", "app"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("reprotect it first"));
    let refused = ferry_on(&site.target, &["failover", "cleanup", "--group", "app"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("failed-over"));

    // Production runs at the target now.
    io(&socket, &["write -P 0xd4 6M 512k"]);
    ferry_ok(&site.target, &["reprotect", "--group", "app"]);
    wait_state(&site.target, "reprotecting");
    io(&socket, &["write -P 0xe5 10M 128k"]);
    // On RBD a machine booted straight from the clone writes past Ferry's export: reprotect's
    // rounds find that write through the clone's snapshots and diff.
    let mut writes = vec![
        (0xa1, 0, 1 << 20),
        (0xc3, 2 << 20, 256 << 10),
        (0xd4, 6 << 20, 512 << 10),
        (0xe5, 10 << 20, 128 << 10),
        (0x17, 14 << 20, 64 << 10),
    ];
    if let Some(cluster) = site._backend.cluster() {
        let spec = answer["exports"][0]["rbd_image"].as_str().unwrap();
        write_into_image(
            cluster,
            spec.trim_start_matches("rbd/"),
            12 << 20,
            0x6b,
            64 << 10,
        );
        writes.push((0x6b, 12 << 20, 64 << 10));
    }
    ferry_ok(&site.target, &["failback", "--group", "app"]);
    wait_state(&site.target, "protected");
    check_no_clone(&site);

    // The source holds every write made at the target, and takes writes again.
    io(
        &site.export,
        &[
            "read -P 0xa1 0 1M",
            "read -P 0xc3 2M 256k",
            "read -P 0xd4 6M 512k",
            "read -P 0xe5 10M 128k",
        ],
    );
    if site._backend.cluster().is_some() {
        io(&site.export, &["read -P 0x6b 12M 64k"]);
    }
    io(&site.export, &["write -P 0x17 14M 64k"]);
    // Failback leaves the source's disk resyncing its (stale) replica at the target; verify
    // once it is protected again.
    wait_for("the source disk to be protected after failback", || {
        let status = site.source.try_status()?;
        (status["disks"][0]["state"] == "protected").then_some(())
    });
    let verify = ferry_on(&site.source, &["verify", "--all"]);
    assert!(
        verify.status.success(),
        "verify after failback: {}\n{}",
        String::from_utf8_lossy(&verify.stderr),
        site.source.log()
    );
    site.source.stop();
    let expected = site.root.join("expected.raw");
    expected_image(&expected, &writes);
    assert!(same_bytes(&site.disk, &expected));
    site.target.stop();
}

fn unplanned_failover_without_the_source_survives_a_target_restart(backend: Backend) {
    let mut site = site(backend);
    io(&site.export, &["write -P 0xa1 0 1M"]);
    let p1 = cut_point(&site);
    site.source.kill();

    let answer = failover(&site, &["--point", "latest"]);
    assert_eq!(answer["point"]["id"], p1);
    let socket = export_socket(&answer);
    io(
        &socket,
        &["read -P 0xa1 0 1M", "write -P 0x5c 3M 64k", "flush"],
    );
    let definition = answer["definitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|path| path.as_str().unwrap().ends_with("web-1.json"))
        .cloned()
        .expect("a JSON definition");
    let definition: serde_json::Value =
        serde_json::from_slice(&std::fs::read(definition.as_str().unwrap()).unwrap()).unwrap();
    assert_eq!(definition["nics"][0]["network"], "dr-prod");
    assert_eq!(definition["test"], false);
    let expected = site.root.join("expected-unplanned.raw");
    expected_image(&expected, &[(0xa1, 0, 1 << 20), (0x5c, 3 << 20, 64 << 10)]);
    if site._backend.cluster().is_some() {
        let xml = answer["definitions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|path| path.as_str().unwrap().ends_with("web-1.xml"))
            .map(|path| std::fs::read_to_string(path.as_str().unwrap()).unwrap())
            .expect("an XML definition");
        let spec = answer["exports"][0]["rbd_image"].as_str().unwrap();
        assert!(
            xml.contains(&format!("<source protocol='rbd' name='{spec}'>")),
            "{xml}"
        );
        assert!(xml.contains("<host name='127.0.0.1' port="), "{xml}");
        assert!(xml.contains("<auth username='admin'>"), "{xml}");
    }
    check_clone(&site, &answer, &expected);

    // A restart of the target brings the failover back with the machine's writes.
    site.target.stop();
    site.target.start();
    wait_state(&site.target, "failed-over");
    io(&socket, &["read -P 0xa1 0 1M", "read -P 0x5c 3M 64k"]);
    check_clone(&site, &answer, &expected);
    site.target.stop();
}

/// The dependent-write test through failover: machine db-1 on source appliance site-a and
/// app-1 on site-b form group "app" (barrier between them), both replicating to one target. A
/// workload writes block i on db-1, waits for the acknowledgement, then writes block i on
/// app-1, while points are cut. Each point, failed over and materialised, may hold app-1's
/// block i only if it holds db-1's block i.
fn dependent_writes_across_two_source_appliances_never_split_a_failed_over_point(backend: Backend) {
    const BLOCKS: u64 = 24;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let TwoSourceGroup {
        mut a,
        mut b,
        target,
        exports,
    } = two_source_group(&root, DISK_BYTES, 0, "1h", Some(&backend));
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

    // Points are cut on the coordinator (site-a) while the dependent writes run.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cutter = {
        let stop = stop.clone();
        let socket = a.socket().display().to_string();
        std::thread::spawn(move || {
            let mut ids = Vec::new();
            // Bounded: at most 200 cuts, and the workload ends in seconds.
            for _ in 0..200 {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let output = ferry(&[
                    "recovery-point",
                    "create",
                    "--group",
                    "app",
                    "--socket",
                    &socket,
                ]);
                assert!(
                    output.status.success(),
                    "cut: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
                ids.push(
                    String::from_utf8(output.stdout)
                        .unwrap()
                        .trim()
                        .parse::<u64>()
                        .unwrap(),
                );
            }
            ids
        })
    };
    for block in 0..BLOCKS {
        let write = format!("write -P {} {} 4k", block + 1, block * 4096);
        // qemu-io returns once the write is acknowledged (its FUA-less write completed).
        qemu_io(&exports[0].0, &exports[0].1, std::slice::from_ref(&write));
        qemu_io(&exports[1].0, &exports[1].1, std::slice::from_ref(&write));
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut ids = cutter.join().unwrap();
    // And one point after everything, which must hold every block on both disks.
    let last = ferry_ok(&a, &["recovery-point", "create", "--group", "app"]);
    ids.push(last.trim().parse().unwrap());
    let last_id = *ids.last().unwrap();
    wait_for("the last point usable at the target", || {
        let output = ferry_on(
            &target,
            &["recovery-point", "list", "--group", "app", "--json"],
        );
        let points: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
        points["points"]
            .as_array()?
            .iter()
            .any(|point| point["id"] == last_id && point["usable"] == true)
            .then_some(())
    });
    assert!(ids.len() >= 3, "only {} points were cut", ids.len());

    // Check a bounded sample of the points (first, last and evenly spaced ones).
    let step = (ids.len() / 6).max(1);
    let mut checked: Vec<u64> = ids.iter().step_by(step).copied().collect();
    if checked.last() != Some(&last_id) {
        checked.push(last_id);
    }
    let mut blocks_seen = Vec::new();
    for id in checked {
        let out = root.join(format!("out-{id}"));
        let answer: serde_json::Value = serde_json::from_str(&ferry_ok(
            &target,
            &[
                "failover",
                "--group",
                "app",
                "--json",
                "--test",
                "--point",
                &id.to_string(),
                "--materialize",
                "--out",
                out.to_str().unwrap(),
            ],
        ))
        .unwrap();
        assert_eq!(answer["exports"].as_array().unwrap().len(), 2, "{answer}");
        let db = std::fs::read(out.join("db-1").join("data.raw")).unwrap();
        let app = std::fs::read(out.join("app-1").join("data.raw")).unwrap();
        let holds = |image: &[u8], block: u64| {
            let at = (block * 4096) as usize;
            image[at..at + 4096]
                .iter()
                .all(|&byte| byte == (block + 1) as u8)
        };
        let mut on_db = 0;
        for block in 0..BLOCKS {
            if holds(&app, block) {
                assert!(
                    holds(&db, block),
                    "point {id} holds app-1's block {block} without db-1's"
                );
            }
            on_db += u64::from(holds(&db, block));
        }
        blocks_seen.push(on_db);
        ferry_ok(&target, &["failover", "cleanup", "--group", "app"]);
    }
    // The last point holds everything: the check above had something to check.
    assert_eq!(*blocks_seen.last().unwrap(), BLOCKS);
    a.stop();
    b.stop();
    target.stop();
}
