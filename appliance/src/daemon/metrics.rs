//! Prometheus metrics: the status snapshot rendered in the text exposition format, served by a
//! minimal HTTP/1.1 responder (`GET /metrics`, one request per connection) on the optional
//! `appliance.metrics_listen` address. Hand-rolled because it answers one fixed request; a web
//! framework would be most of the binary's dependency tree for it.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use super::status::StatusModel;
use crate::control::{DiskState, StatusSnapshot};

/// Largest request head read; scrapers send a few hundred bytes.
const REQUEST_HEAD_BYTES_MAX: usize = 8 << 10;
/// A client must send its request head within this time.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrape connections served at once.
const METRICS_CONNECTIONS_MAX: usize = 16;

const STATES: [DiskState; 7] = [
    DiskState::InitialSync,
    DiskState::Protected,
    DiskState::ResyncNeeded,
    DiskState::Resyncing,
    DiskState::Paused,
    DiskState::FailedOver,
    DiskState::Reprotecting,
];

/// Escapes a label value as the exposition format requires.
fn label(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for character in value.chars() {
        match character {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            other => escaped.push(other),
        }
    }
    escaped
}

struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &str, value: f64) {
        if labels.is_empty() {
            let _ = writeln!(self.out, "{name} {value}");
        } else {
            let _ = writeln!(self.out, "{name}{{{labels}}} {value}");
        }
    }
}

/// Renders a snapshot as Prometheus text (format 0.0.4). Disk series carry `machine`, `disk`
/// and `group` labels.
pub fn render(snapshot: &StatusSnapshot) -> String {
    let mut out = String::new();
    let mut family = Family { out: &mut out };
    family.header(
        "ferry_build_info",
        "gauge",
        "Ferry version and appliance name.",
    );
    family.sample(
        "ferry_build_info",
        &format!(
            r#"version="{}",appliance="{}""#,
            env!("CARGO_PKG_VERSION"),
            label(&snapshot.appliance)
        ),
        1.0,
    );
    let disk_labels: Vec<String> = snapshot
        .disks
        .iter()
        .map(|disk| {
            format!(
                r#"machine="{}",disk="{}",group="{}""#,
                label(&disk.machine),
                label(&disk.name),
                label(&disk.group)
            )
        })
        .collect();
    type Figure = fn(&crate::control::DiskStatus) -> f64;
    let disk_families: [(&str, &str, &str, Figure); 9] = [
        (
            "ferry_disk_bytes_written_total",
            "counter",
            "Bytes written through the export (writes, trims, zero ranges).",
            |d| d.bytes_written as f64,
        ),
        (
            "ferry_disk_journal_used_bytes",
            "gauge",
            "Bytes used in the cache journal (shared by all disks).",
            |d| d.journal_used_bytes as f64,
        ),
        (
            "ferry_disk_journal_capacity_bytes",
            "gauge",
            "Capacity of the cache journal (shared by all disks).",
            |d| d.journal_capacity_bytes as f64,
        ),
        (
            "ferry_disk_churn_bytes_per_second",
            "gauge",
            "Write rate over the last 10 seconds.",
            |d| d.churn_bytes_per_s,
        ),
        (
            "ferry_disk_ship_bytes_per_second",
            "gauge",
            "Rate at which this disk's records are shipped.",
            |d| d.ship_bytes_per_s,
        ),
        (
            "ferry_disk_last_sequence",
            "gauge",
            "Sequence of the disk's latest journal record.",
            |d| d.last_sequence as f64,
        ),
        (
            "ferry_disk_acked_sequence",
            "gauge",
            "Every record of the disk up to this sequence is acknowledged by the target.",
            |d| d.acked_sequence as f64,
        ),
        (
            "ferry_disk_rpo_lag_seconds",
            "gauge",
            "Age of the oldest write the target has not acknowledged.",
            |d| d.rpo_lag_seconds,
        ),
        (
            "ferry_disk_size_bytes",
            "gauge",
            "Size of the protected disk.",
            |d| d.size_bytes as f64,
        ),
    ];
    for (name, kind, help, figure) in disk_families {
        family.header(name, kind, help);
        for (disk, labels) in snapshot.disks.iter().zip(&disk_labels) {
            family.sample(name, labels, figure(disk));
        }
    }
    family.header(
        "ferry_disk_state",
        "gauge",
        "Replication state of the disk (1 for the current state).",
    );
    for (disk, labels) in snapshot.disks.iter().zip(&disk_labels) {
        for state in STATES {
            let value = if disk.state == state { 1.0 } else { 0.0 };
            family.sample(
                "ferry_disk_state",
                &format!(r#"{labels},state="{}""#, state.as_str()),
                value,
            );
        }
    }
    if !snapshot.groups.is_empty() {
        family.header(
            "ferry_group_rpo_threshold_seconds",
            "gauge",
            "RPO lag above which the group alerts.",
        );
        for group in &snapshot.groups {
            family.sample(
                "ferry_group_rpo_threshold_seconds",
                &format!(r#"group="{}""#, label(&group.name)),
                group.rpo_threshold_seconds,
            );
        }
    }
    if let Some(link) = &snapshot.link {
        let labels = format!(r#"peer="{}""#, label(&link.peer));
        family.header(
            "ferry_link_connected",
            "gauge",
            "1 when the link to the target is up.",
        );
        family.sample(
            "ferry_link_connected",
            &labels,
            if link.connected { 1.0 } else { 0.0 },
        );
        family.header(
            "ferry_link_sent_bytes_total",
            "counter",
            "Bytes of replication frames sent to the target since start (transport headers not counted).",
        );
        family.sample(
            "ferry_link_sent_bytes_total",
            &labels,
            link.sent_bytes as f64,
        );
        if let Some(floor) = link.sequence_floor {
            family.header(
                "ferry_link_sequence_floor",
                "gauge",
                "Sequence up to which records ship before they are durable in the journal.",
            );
            family.sample("ferry_link_sequence_floor", &labels, floor as f64);
        }
        if let Some(limit) = link.bandwidth_limit_bytes_per_s {
            family.header(
                "ferry_link_bandwidth_limit_bytes_per_second",
                "gauge",
                "Configured link bandwidth limit.",
            );
            family.sample(
                "ferry_link_bandwidth_limit_bytes_per_second",
                &labels,
                limit as f64,
            );
        }
    }
    if !snapshot.replicas.is_empty() {
        family.header(
            "ferry_replica_applied_sequence",
            "gauge",
            "Highest sequence applied to the replica.",
        );
        for replica in &snapshot.replicas {
            family.sample(
                "ferry_replica_applied_sequence",
                &format!(
                    r#"machine="{}",disk="{}""#,
                    label(&replica.machine),
                    label(&replica.name)
                ),
                replica.applied_sequence as f64,
            );
        }
    }
    out
}

/// Serves scrapes until `shutdown` turns true.
pub(crate) async fn serve(
    listener: TcpListener,
    status: Arc<StatusModel>,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(METRICS_CONNECTIONS_MAX));
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Ok(permit) = permits.clone().try_acquire_owned() else {
                        tracing::warn!(%peer, "metrics: too many scrapes at once, dropping one");
                        continue;
                    };
                    let status = status.clone();
                    connections.spawn(async move {
                        if let Err(error) = serve_connection(stream, &status).await {
                            tracing::debug!(%peer, %error, "metrics connection failed");
                        }
                        drop(permit);
                    });
                }
                Err(error) => {
                    tracing::warn!(%error, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    connections.shutdown().await;
}

async fn serve_connection(mut stream: TcpStream, status: &StatusModel) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let read_head = async {
        let mut buffer = [0u8; 1024];
        while !head.windows(4).any(|window| window == b"\r\n\r\n")
            && head.len() <= REQUEST_HEAD_BYTES_MAX
        {
            let read = stream.read(&mut buffer).await?;
            if read == 0 {
                break;
            }
            head.extend_from_slice(&buffer[..read]);
        }
        std::io::Result::Ok(())
    };
    let (code, content_type, body) = match tokio::time::timeout(REQUEST_TIMEOUT, read_head).await {
        Err(_) => (
            "408 Request Timeout",
            "text/plain",
            "request timeout\n".to_string(),
        ),
        Ok(result) => {
            result?;
            respond(&head, status)
        }
    };
    let response = format!(
        "HTTP/1.1 {code}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

fn respond(head: &[u8], status: &StatusModel) -> (&'static str, &'static str, String) {
    let first_line = head.split(|&byte| byte == b'\n').next().unwrap_or_default();
    let first_line = String::from_utf8_lossy(first_line);
    let mut parts = first_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(&status.snapshot_now()),
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "not found: try /metrics\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET /metrics\n".to_string(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{DiskStatus, LinkStatus};

    #[test]
    fn renders_every_figure_with_labels_escaped() {
        let snapshot = StatusSnapshot {
            appliance: "site-a".into(),
            time_unix_ms: 0,
            disks: vec![DiskStatus {
                machine: "web-1".into(),
                name: "os".into(),
                state: DiskState::Paused,
                bytes_written: 8192,
                journal_used_bytes: 100,
                journal_capacity_bytes: 4096,
                churn_bytes_per_s: 1.5,
                last_sequence: 9,
                acked_sequence: 4,
                rpo_lag_seconds: 0.25,
                group: "a\"b".into(),
                size_bytes: 1 << 20,
                ship_bytes_per_s: 0.0,
                export: "/x.sock".into(),
                sync: None,
            }],
            replicas: vec![],
            groups: vec![],
            link: Some(LinkStatus {
                peer: "127.0.0.1:7400".into(),
                connected: false,
                last_error: None,
                bandwidth_limit_bytes_per_s: Some(1000),
                sent_bytes: 123_456,
                sequence_floor: Some(1 << 20),
            }),
        };
        let text = render(&snapshot);
        let labels = r#"machine="web-1",disk="os",group="a\"b""#;
        for expected in [
            format!("ferry_disk_bytes_written_total{{{labels}}} 8192"),
            format!("ferry_disk_journal_used_bytes{{{labels}}} 100"),
            format!("ferry_disk_journal_capacity_bytes{{{labels}}} 4096"),
            format!("ferry_disk_churn_bytes_per_second{{{labels}}} 1.5"),
            format!("ferry_disk_last_sequence{{{labels}}} 9"),
            format!("ferry_disk_acked_sequence{{{labels}}} 4"),
            format!("ferry_disk_rpo_lag_seconds{{{labels}}} 0.25"),
            format!("ferry_disk_state{{{labels},state=\"paused\"}} 1"),
            format!("ferry_disk_state{{{labels},state=\"protected\"}} 0"),
            "# TYPE ferry_disk_bytes_written_total counter".to_string(),
            "ferry_link_connected{peer=\"127.0.0.1:7400\"} 0".to_string(),
            "ferry_link_bandwidth_limit_bytes_per_second{peer=\"127.0.0.1:7400\"} 1000".to_string(),
            "ferry_link_sent_bytes_total{peer=\"127.0.0.1:7400\"} 123456".to_string(),
            "ferry_link_sequence_floor{peer=\"127.0.0.1:7400\"} 1048576".to_string(),
        ] {
            assert!(
                text.lines().any(|line| line == expected),
                "missing {expected:?} in\n{text}"
            );
        }
        // Every non-comment line is `name{labels} value` with a parseable value.
        for line in text.lines().filter(|line| !line.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }

    #[test]
    fn only_get_metrics_is_served() {
        let config = crate::config::Config::parse(
            "[appliance]\nname = \"t\"\nstate_dir = \"/s\"\n[target]\nlisten = \"127.0.0.1:1\"\nstorage_dir = \"/r\"\n",
        )
        .unwrap();
        let status = StatusModel::from_config(&config);
        assert_eq!(
            respond(b"GET /metrics HTTP/1.1\r\n\r\n", &status).0,
            "200 OK"
        );
        assert_eq!(
            respond(b"GET /metrics?x=1 HTTP/1.1\r\n\r\n", &status).0,
            "200 OK"
        );
        assert_eq!(
            respond(b"GET / HTTP/1.1\r\n\r\n", &status).0,
            "404 Not Found"
        );
        assert_eq!(
            respond(b"POST /metrics HTTP/1.1\r\n\r\n", &status).0,
            "405 Method Not Allowed"
        );
        assert_eq!(respond(b"\xff\xfe", &status).0, "405 Method Not Allowed");
    }
}
