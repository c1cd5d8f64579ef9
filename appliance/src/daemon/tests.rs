//! In-process tests of a running daemon's control socket: the client against the server, bad
//! and oversized requests, timeouts, refusal to replace what is not a socket, clean shutdown.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::*;
use crate::control::{DiskSelector, Response};

fn write_config(dir: &Path) -> Config {
    std::fs::File::create(dir.join("d.raw"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let text = format!(
        r#"
[appliance]
name = "t"
state_dir = "{root}/state"
control_socket = "{root}/run/control.sock"
[source]
journal_size = "8MiB"
target = "127.0.0.1:9"
[[source.group]]
name = "g"
[[source.machine]]
name = "m"
group = "g"
disks = [{{ name = "d", path = "{root}/d.raw", export = "{root}/run/m-d.sock" }}]
"#,
        root = dir.display()
    );
    Config::parse(&text).unwrap()
}

/// Runs blocking client code off the runtime's worker threads.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work).await.unwrap()
}

#[tokio::test]
async fn client_and_server_agree_and_bad_requests_get_errors() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(write_config(dir.path())).await.unwrap();
    let socket = daemon.control_socket().to_path_buf();

    let status_socket = socket.clone();
    let snapshot =
        blocking(move || Client::connect(&status_socket).unwrap().status().unwrap()).await;
    assert_eq!(snapshot.appliance, "t");
    assert_eq!(snapshot.disks.len(), 1);
    assert_eq!(snapshot.disks[0].size_bytes, 1 << 20);

    // Commands go through the event loop and come back.
    let command_socket = socket.clone();
    let message = blocking(move || {
        let mut client = Client::connect(&command_socket).unwrap();
        let selector = DiskSelector {
            disk: Some("m/d".into()),
            group: None,
        };
        let paused = client.command(&Request::Pause { selector }).unwrap();
        let refused = client
            .command(&Request::SetBandwidth {
                bytes_per_s: Some(0),
            })
            .unwrap_err();
        (paused, refused.to_string())
    })
    .await;
    assert_eq!(message.0, "paused m/d");
    assert!(message.1.contains("above 0"), "{}", message.1);
    assert!(daemon.status().disks()[0].is_paused());

    // Garbage gets an error and the connection stays usable; an oversized line gets an error
    // and the connection is closed.
    let raw_socket = socket.clone();
    blocking(move || {
        let stream = UnixStream::connect(&raw_socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        writer.write_all(b"{\"cmd\":\"launch-rockets\"}\n").unwrap();
        reader.read_line(&mut line).unwrap();
        let response: Response = serde_json::from_str(&line).unwrap();
        assert!(
            matches!(response, Response::Error { ref message } if message.contains("bad request")),
            "{line}"
        );
        line.clear();
        writer.write_all(b"{\"cmd\":\"status\"}\n").unwrap();
        reader.read_line(&mut line).unwrap();
        assert!(
            matches!(serde_json::from_str(&line).unwrap(), Response::Status(_)),
            "{line}"
        );
        line.clear();
        let oversized = vec![b'x'; control_server::REQUEST_BYTES_MAX + 10];
        // The server may close before reading all of it; only its answer matters.
        let _ = writer.write_all(&oversized);
        let _ = writer.write_all(b"\n");
        reader.read_line(&mut line).unwrap();
        assert!(line.contains("longer than"), "{line}");
        line.clear();
        assert_eq!(
            reader.read_line(&mut line).unwrap(),
            0,
            "connection should be closed"
        );
    })
    .await;

    daemon.shutdown().await.unwrap();
    assert!(!socket.exists(), "shutdown removes the control socket");
    let gone = blocking(move || Client::connect(&socket).unwrap_err()).await;
    assert!(matches!(gone, ClientError::NotRunning { .. }), "{gone}");
}

#[tokio::test]
async fn a_silent_appliance_times_out_instead_of_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("silent.sock");
    // Accepts (the kernel does, through the backlog) but never answers.
    let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let error = blocking(move || {
        let mut client = Client::connect_with_timeout(&path, Duration::from_millis(200)).unwrap();
        client.status().unwrap_err()
    })
    .await;
    assert!(matches!(error, ClientError::Timeout { .. }), "{error}");
}

#[tokio::test]
async fn refuses_to_replace_a_file_that_is_not_a_socket() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    std::fs::create_dir_all(dir.path().join("run")).unwrap();
    std::fs::write(config.control_socket(), b"precious").unwrap();
    let error = Daemon::start(config.clone())
        .await
        .err()
        .expect("start should fail");
    assert!(matches!(error, DaemonError::NotASocket { .. }), "{error}");
    assert_eq!(std::fs::read(config.control_socket()).unwrap(), b"precious");
}
