//! End-to-end replication (issue "Ship and apply"): a source and a target `ferry run` on
//! loopback; qemu-io writes through the source's NBD export while initial replication runs;
//! `ferry verify --all` and `cmp` of source disk and replica agree — also after `kill -9` of
//! either side mid-stream, after a journal overflow while the target is down, and never with a
//! wrongly pinned target.

#[macro_use]
mod support;

use std::path::{Path, PathBuf};

use support::*;

const DISK_BYTES: u64 = 64 << 20;

struct Pair {
    dir: tempfile::TempDir,
    source: Appliance,
    target: Appliance,
    disk: PathBuf,
    export: PathBuf,
    /// Last: the appliances stop before the cluster does.
    backend: Backend,
}

impl Pair {
    /// Writes both configs, the target storing replicas on `backend`; the source pins
    /// `target_fingerprint` (the real one unless given).
    fn new(backend: Backend, journal_size: &str, target_fingerprint: Option<&str>) -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("web-1-os.raw");
        make_disk(&disk, DISK_BYTES, 40 << 20, 7);
        Pair::with_disk(dir, disk, backend, journal_size, target_fingerprint)
    }

    /// As [`Pair::new`], the source protecting `disk` (which the source may create at start).
    fn with_disk(
        dir: tempfile::TempDir,
        disk: PathBuf,
        backend: Backend,
        journal_size: &str,
        target_fingerprint: Option<&str>,
    ) -> Pair {
        let source = Appliance::new(dir.path(), "site-a");
        let target = Appliance::new(dir.path(), "site-b");
        let port = free_udp_port();
        let export = source.root.join("web-1-os.sock");
        let source_fingerprint = source.fingerprint();
        let real_target_fingerprint = target.fingerprint();
        target.write_config(&format!(
            r#"[target]
listen = "127.0.0.1:{port}"
storage_dir = "{storage}"
peers = [{{ name = "site-a", fingerprint = "{source_fingerprint}" }}]
{backend_keys}
[target.mapping]
resource_group = "rg-dr"
networks = {{ prod = "dr-prod" }}
availability_sets = {{ web = "web-dr" }}
test_network = "dr-test"

[[target.machine]]
name = "web-1"
resource_group = "rg-web-dr"
"#,
            storage = target.root.join("storage").display(),
            backend_keys = backend.target_keys(),
        ));
        source.write_config(&format!(
            r#"[source]
journal_size = "{journal_size}"
target = "127.0.0.1:{port}"
target_fingerprint = "{fingerprint}"

[[source.group]]
name = "app"

[[source.machine]]
name = "web-1"
group = "app"
resource_group = "rg-prod"
availability_set = "web"
nics = [{{ network = "prod", subnet = "front", ip = "10.0.0.5" }}]
disks = [{{ name = "os", path = "{disk}", export = "{export}" }}]
"#,
            fingerprint = target_fingerprint.unwrap_or(&real_target_fingerprint),
            disk = disk.display(),
            export = export.display(),
        ));
        Pair {
            dir,
            source,
            target,
            disk,
            export,
            backend,
        }
    }

    fn write(&self, commands: &[String]) {
        qemu_io(&self.export, "web-1/os", commands);
    }

    /// The bytes of the replica of web-1/os as a file: the replica file itself, or an
    /// `rbd export` of its image.
    fn replica_bytes(&self) -> PathBuf {
        let location = self.target.replica_location("web-1", "os");
        self.backend
            .replica_file(&location, &self.dir.path().join("replica-export.raw"))
    }

    /// The replica file of web-1/os under the (possibly stopped) target's storage dir.
    fn replica_path_on_disk(&self) -> PathBuf {
        let replicas = raw_files(&self.target.root.join("storage"));
        assert_eq!(replicas.len(), 1, "{replicas:?}");
        replicas.into_iter().next().unwrap()
    }

    /// Waits until the disk is protected and the target acknowledged everything journaled.
    fn wait_caught_up(&self) {
        let start = std::time::Instant::now();
        wait_for("the source to be protected and caught up", || {
            if start.elapsed() > DEADLINE - std::time::Duration::from_secs(2) {
                eprintln!(
                    "source status: {:?}\nsource log:\n{}\ntarget log:\n{}",
                    self.source.try_status(),
                    self.source.log(),
                    self.target.log()
                );
            }
            let status = self.source.try_status()?;
            let disk = status["disks"].as_array()?.first()?.clone();
            let caught_up = disk["state"] == "protected"
                && disk["acked_sequence"].as_u64()? >= disk["last_sequence"].as_u64()?;
            caught_up.then_some(())
        });
    }

    /// `ferry verify --all` says identical, and so does cmp of the source disk with the
    /// replica's bytes (read from the file, or exported from the RBD image).
    fn assert_identical(&self) {
        self.wait_caught_up();
        // A verify on a link whose peer just died (the source notices only at the QUIC idle
        // timeout) starts over once the link is back.
        let output = ferry(&[
            "verify",
            "--all",
            "--socket",
            self.source.socket().to_str().unwrap(),
        ]);
        assert!(
            output.status.success(),
            "verify: {}{}\nsource log: {}\ntarget log: {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.source.log(),
            self.target.log()
        );
        assert!(
            same_bytes(&self.disk, &self.replica_bytes()),
            "cmp found a difference ({})",
            self.backend.name()
        );
    }
}

/// The target stored web-1's source settings and the settings derived through
/// `[target.mapping]` and its `[[target.machine]]` override beside the replica.
fn assert_mapped_settings(pair: &Pair) {
    let path = pair.target.root.join("storage/site-a/web-1/settings.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("read {}: {error}", path.display()));
    let settings: serde_json::Value = serde_json::from_str(&text).unwrap();
    let (source, target) = (&settings["source"], &settings["target"]);
    assert_eq!(source["name"], "web-1", "{text}");
    assert_eq!(source["resource_group"], "rg-prod", "{text}");
    assert_eq!(source["availability_set"], "web", "{text}");
    assert_eq!(source["nics"][0]["network"], "prod", "{text}");
    assert_eq!(target["name"], "web-1", "{text}");
    // The per-machine override wins over `[target.mapping] resource_group`.
    assert_eq!(target["resource_group"], "rg-web-dr", "{text}");
    assert_eq!(target["availability_set"], "web-dr", "{text}");
    assert_eq!(target["nics"][0]["network"], "dr-prod", "{text}");
    assert_eq!(target["nics"][0]["subnet"], "front", "{text}");
    assert_eq!(target["nics"][0]["ip"], "10.0.0.5", "{text}");
    assert_eq!(target["test_network"], "dr-test", "{text}");
}

fn pattern_writes(round: u64) -> Vec<String> {
    (0..16u64)
        .map(|index| {
            let offset = (index * 3 + round * 5) % 60 * (1 << 20) + index * 4096;
            format!("write -P {} {offset} 64k", (round * 16 + index) % 250 + 1)
        })
        .collect()
}

on_both_backends!(
    writes_during_initial_replication_reach_an_identical_replica,
    target_killed_mid_stream_restarts_and_converges,
);

fn writes_during_initial_replication_reach_an_identical_replica(backend: Backend) {
    let mut pair = Pair::new(backend, "64MiB", None);
    pair.target.start();
    pair.source.start();
    pair.write(&pattern_writes(0));
    pair.write(&["write -z 8m 1m".to_string(), "discard 12m 1m".to_string()]);
    pair.assert_identical();
    pair.write(&pattern_writes(1));
    pair.assert_identical();
    assert_mapped_settings(&pair);
}

#[test]
fn source_killed_mid_stream_restarts_and_converges() {
    let mut pair = Pair::new(Backend::files(), "64MiB", None);
    pair.target.start();
    pair.source.start();
    pair.write(&pattern_writes(0));
    pair.source.kill();
    pair.source.start();
    pair.write(&pattern_writes(1));
    pair.assert_identical();
}

/// On RBD the killed target held its image's exclusive lock; the restarted one breaks that
/// dead client's lock when it opens the image (and says so) instead of waiting ~30 s for the
/// OSDs to time the dead client's watch out.
fn target_killed_mid_stream_restarts_and_converges(backend: Backend) {
    let mut pair = Pair::new(backend, "64MiB", None);
    pair.target.start();
    pair.source.start();
    pair.write(&pattern_writes(0));
    if let Some(cluster) = pair.backend.cluster() {
        let location = pair.target.replica_location("web-1", "os");
        let image = location.strip_prefix("rbd:").unwrap().to_string();
        wait_for("the target to hold its image's exclusive lock", || {
            let output = cluster.rbd(&["lock", "ls", &image, "--format", "json"]);
            let locks: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
            (!locks.as_array()?.is_empty()).then_some(())
        });
    }
    pair.target.kill();
    pair.write(&pattern_writes(1));
    pair.target.start();
    pair.write(&pattern_writes(2));
    pair.assert_identical();
    if pair.backend.cluster().is_some() {
        let log = pair.target.log();
        assert!(
            log.contains("broke the exclusive lock of another client"),
            "the restarted target did not break the dead one's lock:\n{log}"
        );
    }
}

/// A verify running when the target dies is not refused: the source notices the lost link
/// only at the QUIC idle timeout, then runs the verify again from the start on the next
/// connection, and the operator's `ferry verify` answers once the target is back.
#[test]
fn a_verify_cut_short_by_the_targets_loss_starts_over_once_it_is_back() {
    let mut pair = Pair::new(Backend::files(), "64MiB", None);
    pair.target.start();
    pair.source.start();
    pair.write(&pattern_writes(0));
    pair.wait_caught_up();
    pair.target.kill();
    let verify = std::process::Command::new(FERRY)
        .args(["verify", "--all", "--timeout", "2m", "--socket"])
        .arg(pair.source.socket())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the source to notice the lost link", || {
        let status = pair.source.try_status()?;
        (status["link"]["connected"] == false).then_some(())
    });
    pair.target.start();
    let output = verify.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "verify: {}{}\nsource log: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        pair.source.log()
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("web-1/os: identical"), "{stdout}");
    assert!(
        pair.source
            .log()
            .contains("the link was lost during verify: it starts again"),
        "the verify was not cut short by the lost link: {}",
        pair.source.log()
    );
}

/// Losing the cluster mid-stream: with the only OSD stopped, and then the only monitor too,
/// writes through the source's export still complete (capture never waits for the target); the
/// target receives the records but cannot make them durable, so neither its applied sequence
/// nor the source's acknowledged one moves, and the source journal holds the backlog. Once the
/// monitor and the OSD are back, replication catches up in order: the last of two writes to one
/// block wins, and verify and the exported image say identical.
#[test]
fn the_cluster_stopped_mid_stream_stalls_acknowledgements_until_it_is_back() {
    let mut pair = Pair::new(Backend::rbd(), "64MiB", None);
    pair.target.start();
    pair.source.start();
    pair.assert_identical();
    // One live write, acknowledged: the baseline sequence (a disk's status sequences follow
    // its live writes; the initial sync's records do not move them).
    pair.write(&["write -P 0x70 44m 64k".to_string()]);
    let acked = wait_for("the live write to be acknowledged", || {
        let disk = pair.source.try_status()?["disks"][0].clone();
        let (last, acked) = (
            disk["last_sequence"].as_u64()?,
            disk["acked_sequence"].as_u64()?,
        );
        (last > 0 && acked >= last).then_some(acked)
    });
    let applied_before = wait_for("the target's status to show the baseline applied", || {
        let applied = pair.target.try_status()?["replicas"][0]["applied_sequence"].as_u64()?;
        (applied >= acked).then_some(applied)
    });
    let sent_before = pair.source.status()["link"]["sent_bytes"].as_u64().unwrap();

    pair.backend.cluster_mut().unwrap().stop_osd();
    let mut writes = pattern_writes(3);
    writes.push("write -P 0x71 40m 64k".to_string());
    pair.write(&writes);
    let mut journaled = acked + writes.len() as u64;
    wait_for("the writes to be journaled", || {
        let last = pair.source.try_status()?["disks"][0]["last_sequence"].as_u64()?;
        (last >= journaled).then_some(())
    });
    // The records reach the target: what holds them back is the cluster, not the link.
    wait_for("the source to ship the writes", || {
        let sent = pair.source.try_status()?["link"]["sent_bytes"].as_u64()?;
        (sent >= sent_before + (1 << 20)).then_some(())
    });
    assert_stalled(
        &pair,
        acked,
        applied_before,
        std::time::Duration::from_secs(4),
    );

    // The monitor goes too: still nothing is acknowledged.
    pair.backend.cluster_mut().unwrap().stop_mon();
    pair.write(&["write -P 0x72 40m 64k".to_string()]);
    journaled += 1;
    wait_for("the last write to be journaled", || {
        let last = pair.source.try_status()?["disks"][0]["last_sequence"].as_u64()?;
        (last >= journaled).then_some(())
    });
    assert_stalled(
        &pair,
        acked,
        applied_before,
        std::time::Duration::from_secs(2),
    );

    let last = pair.source.status()["disks"][0]["last_sequence"]
        .as_u64()
        .unwrap();
    pair.backend.cluster_mut().unwrap().start_mon();
    pair.backend.cluster_mut().unwrap().start_osd();
    let mut acked_seen = acked;
    wait_for(
        "the source to be acknowledged through its last write",
        || {
            let disk = pair.source.try_status()?["disks"][0].clone();
            let now = disk["acked_sequence"].as_u64()?;
            assert!(
                now >= acked_seen,
                "the acknowledged sequence went back: {now} < {acked_seen}"
            );
            acked_seen = now;
            (now >= last).then_some(())
        },
    );
    pair.assert_identical();
    let replica = std::fs::read(pair.replica_bytes()).unwrap();
    assert!(replica[40 << 20..(40 << 20) + (64 << 10)]
        .iter()
        .all(|&byte| byte == 0x72));
}

/// A bounded observation window of at least `window` and 5 samples: the source's acknowledged
/// sequence stays `acked`, the target's applied sequence stays `applied`, the disk stays
/// protected with its backlog in the journal, and both appliances keep answering status (a
/// replica write stalled on the cluster blocks neither control socket).
fn assert_stalled(pair: &Pair, acked: u64, applied: u64, window: std::time::Duration) {
    let start = std::time::Instant::now();
    let mut samples = 0;
    while start.elapsed() < window || samples < 5 {
        let disk = pair.source.status()["disks"][0].clone();
        assert_eq!(
            disk["acked_sequence"].as_u64().unwrap(),
            acked,
            "acknowledged while the cluster is down: {disk}\ntarget log:\n{}",
            pair.target.log()
        );
        assert_eq!(disk["state"], "protected", "{disk}");
        assert!(disk["journal_used_bytes"].as_u64().unwrap() > 0, "{disk}");
        let target = pair.target.status();
        assert_eq!(
            target["replicas"][0]["applied_sequence"].as_u64().unwrap(),
            applied,
            "applied while the cluster is down: {target}"
        );
        samples += 1;
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn journal_overflow_while_the_target_is_down_resyncs() {
    let mut pair = Pair::new(Backend::files(), "8MiB", None);
    pair.target.start();
    pair.source.start();
    pair.assert_identical();
    pair.target.stop();
    // 16 x 1 MiB writes overflow an 8 MiB journal.
    let writes: Vec<String> = (0..16u64)
        .map(|index| format!("write -P {} {} 1m", index + 10, (index * 3) << 20))
        .collect();
    pair.write(&writes);
    wait_for("the disk to drop to its bitmap", || {
        let status = pair.source.try_status()?;
        (status["disks"][0]["state"] == "resync-needed").then_some(())
    });
    pair.target.start();
    pair.assert_identical();
}

/// A disk write refused after its change was journaled — here ENOSPC: the source disk is a
/// sparse image on a full filesystem (a small tmpfs in the source's own mount namespace) — gets
/// the client an error (the write was answered once journaled, write-behind: the FLUSH after it
/// fails), while the journaled change still ships. The disk goes `resync-needed`
/// with the extent in its bitmap, and the resync makes the replica equal the source disk's
/// bytes, not the refused ones: verify then finds nothing to repair.
#[test]
fn a_disk_write_refused_after_journaling_is_resynced() {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small-fs");
    std::fs::create_dir(&small).unwrap();
    let disk = small.join("web-1-os.raw");
    let mut pair = Pair::with_disk(dir, disk.clone(), Backend::files(), "64MiB", None);
    pair.target.start();
    // A private mount namespace (as root, or as root of a new user namespace) with a 4 MiB
    // tmpfs over `small`, holding a sparse 64 MiB disk.
    let script = format!(
        "mount -t tmpfs -o size=4m tmpfs '{small}' && truncate -s {DISK_BYTES} '{disk}' && exec \"$@\"",
        small = small.display(),
        disk = disk.display()
    );
    let root = is_root();
    let mut wrapper = vec!["unshare", "--mount", "--propagation", "private"];
    if !root {
        wrapper.push("--map-root-user");
    }
    wrapper.extend(["sh", "-c", &script, "sh"]);
    pair.source.start_under(&wrapper);
    // The disk as the source process sees it, through its mount namespace.
    pair.disk = PathBuf::from(format!(
        "/proc/{}/root{}",
        pair.source.pid(),
        disk.display()
    ));
    pair.write(&["write -P 0x11 0 1m".to_string()]);
    pair.assert_identical();
    // 1 MiB is used of 4: a 6 MiB write fills the filesystem part-way and fails.
    let output = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x22 8m 6m", "-c", "flush"])
        .arg(format!(
            "nbd+unix:///web-1/os?socket={}",
            pair.export.display()
        ))
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(said.contains("failed"), "the write did not fail: {said}");
    let log = pair.source.log();
    assert!(
        log.contains("the disk refused a journaled change"),
        "no refusal logged: {log}"
    );
    // The resync that follows leaves nothing for verify to repair, and the replica equals
    // the disk (part of the refused write, then zeros), not the refused 6 MiB of 0x22.
    // The disk went resync-needed before the client got its error (verify waits for the
    // resync it needs); the round that follows is the only resync of this test.
    wait_for("the resync after the refusal", || {
        pair.source.log().contains("resync done").then_some(())
    });
    pair.assert_identical();
    let replica = read_range(&pair.replica_bytes(), 8 << 20, 6 << 20);
    assert!(
        replica.iter().any(|&byte| byte != 0x22),
        "the replica holds the whole refused write"
    );
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| output.stdout.trim_ascii() == b"0")
}

/// A change journaled (and, with write-behind, answered) just before the source process died,
/// whose disk write never completed: the journal still holds it (its release waits for the
/// disk write), so the restart resyncs its extent, and the replica ends equal to the source
/// disk, not to the lost change.
#[test]
fn a_journaled_change_that_never_reached_the_disk_is_resynced_after_a_crash() {
    let mut pair = Pair::new(Backend::files(), "64MiB", None);
    pair.target.start();
    pair.source.start();
    pair.assert_identical();
    // Keep the change in the journal: nothing can be acknowledged while the target is down.
    pair.target.stop();
    pair.write(&["write -P 0x5a 2m 64k".to_string()]);
    pair.source.kill();
    // Undo the change on the disk (as if the process died before its disk write completed):
    // the replica still holds what the disk held before.
    let before = read_range(&pair.replica_path_on_disk(), 2 << 20, 64 << 10);
    write_range(&pair.disk, 2 << 20, &before);
    pair.source.start();
    pair.target.start();
    pair.assert_identical();
    assert_eq!(
        read_range(&pair.disk, 2 << 20, 64 << 10),
        before,
        "the disk changed"
    );
    let log = pair.source.log();
    assert!(log.contains("process died"), "{log}");
}

/// The host went down under the source (another boot id in its running marker): writes may
/// be on the disk whose journal records died with the page cache, so every extent is
/// hash-compared with the replica and what differs is sent.
#[test]
fn after_the_host_went_down_every_extent_is_compared_with_the_replica() {
    let mut pair = Pair::new(Backend::files(), "64MiB", None);
    pair.target.start();
    pair.source.start();
    pair.assert_identical();
    pair.source.stop();
    let marker = pair.source.state_dir().join("running");
    assert!(!marker.exists(), "a clean stop left its running marker");
    // A write that reached the disk while its journal record was lost with the host.
    write_range(&pair.disk, 20 << 20, &[0xc3; 4096]);
    std::fs::write(&marker, "boot_id=an-earlier-boot\npid=1\n").unwrap();
    pair.source.start();
    pair.assert_identical();
    let log = pair.source.log();
    assert!(log.contains("host went down"), "{log}");
}

/// Records ship before they reach the journal's device (under the persisted sequence floor),
/// so a host that goes down can take with it journal records the target already holds — here
/// all of them: the journal is gone. The restart gives up every number up to the floor instead
/// of numbering new writes from where the surviving journal ends (which the target would refuse
/// as behind it), resyncs every extent, and replication goes on.
#[test]
fn after_the_host_lost_the_journal_the_log_restarts_past_the_sequence_floor() {
    let mut pair = Pair::new(Backend::files(), "64MiB", None);
    pair.target.start();
    pair.source.start();
    pair.write(&pattern_writes(0));
    pair.assert_identical();
    // The status shows the floor in force: ahead of everything journaled, as persisted.
    let status = pair.source.try_status().unwrap();
    let floor = status["link"]["sequence_floor"].as_u64().unwrap();
    let last = status["disks"][0]["last_sequence"].as_u64().unwrap();
    assert!(floor > last, "floor {floor}, last sequence {last}");
    pair.source.stop();
    let state = pair.source.state_dir();
    let floor_text = std::fs::read_to_string(state.join("sequence-floor")).unwrap();
    assert_eq!(floor_text.trim(), format!("floor={floor}"));
    std::fs::remove_dir_all(state.join("journal")).unwrap();
    write_range(&pair.disk, 24 << 20, &[0x3c; 8192]);
    std::fs::write(state.join("running"), "boot_id=an-earlier-boot\npid=1\n").unwrap();
    pair.source.start();
    pair.assert_identical();
    pair.write(&["write -P 0x61 30m 64k".to_string()]);
    pair.assert_identical();
    let log = pair.source.log();
    assert!(
        log.contains("restarts past the sequence floor"),
        "no restart logged: {log}"
    );
    assert!(
        !log.contains("TargetAhead") && !log.contains("ahead"),
        "{log}"
    );
}

/// A full hash scan after 1% of the 4 KiB blocks changed behind Ferry's back (the source down,
/// the blocks written straight into its disk file, its "initial replication finished" marker
/// removed, so it compares every extent with the replica) sends about the changed bytes — the
/// differing blocks — not the extents holding them. Counted by the source's link byte counter
/// (`ferry status`), which starts at zero with the restarted process.
#[test]
fn a_full_hash_scan_sends_about_the_changed_bytes() {
    let mut pair = Pair::new(Backend::files(), "16MiB", None);
    pair.target.start();
    pair.source.start();
    pair.assert_identical();
    pair.source.stop();
    let blocks = DISK_BYTES / 4096;
    let changed: Vec<u64> = (0..blocks / 100).map(|index| index * 99 + 7).collect();
    for block in &changed {
        write_range(&pair.disk, block * 4096, &[0xa5; 4096]);
    }
    std::fs::remove_file(pair.source.state_dir().join("sync/web-1__os.synced")).unwrap();
    pair.source.start();
    pair.wait_caught_up();
    let status = pair.source.status();
    let sent = status["link"]["sent_bytes"].as_u64().unwrap();
    let changed_bytes = changed.len() as u64 * 4096;
    eprintln!("full hash scan: {sent} bytes sent for {changed_bytes} changed");
    assert!(
        sent >= changed_bytes && sent * 10 <= changed_bytes * 12,
        "a full hash scan sent {sent} bytes for {changed_bytes} changed (aim: at most 1.2x)\nsource log:\n{}",
        pair.source.log()
    );
    pair.assert_identical();
}

#[test]
fn a_wrongly_pinned_target_is_refused_and_receives_nothing() {
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let mut pair = Pair::new(Backend::files(), "64MiB", Some(&wrong));
    pair.target.start();
    pair.source.start();
    pair.write(&pattern_writes(0));
    let log = wait_for("the source to log the refusal", || {
        let log = pair.source.log();
        log.contains("fingerprint").then_some(log)
    });
    assert!(
        log.contains(&wrong[..20]) || log.contains("mismatch"),
        "{log}"
    );
    let status = pair.target.status();
    assert!(
        status["replicas"]
            .as_array()
            .is_none_or(|replicas| replicas.is_empty()),
        "the target received something: {status}"
    );
    let storage = pair.target.root.join("storage");
    let replicas = raw_files(&storage);
    assert!(
        replicas.is_empty(),
        "the target created replicas: {replicas:?}"
    );
}

fn read_range(path: &Path, offset: u64, length: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut bytes = vec![0u8; length];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut bytes, offset)
        .unwrap();
    bytes
}

fn write_range(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(bytes, offset).unwrap();
    file.sync_all().unwrap();
}

/// Every `.raw` file under `dir`.
fn raw_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(raw_files(&path));
        } else if path.extension().is_some_and(|extension| extension == "raw") {
            found.push(path);
        }
    }
    found
}
