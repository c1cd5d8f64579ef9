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
