//! Human-readable rendering of a status snapshot for `ferry status` (the `--json` form is the
//! snapshot itself): one row per disk, then one per replica, with sizes and rates in binary
//! units so a glance shows orders of magnitude.

use std::fmt::Write as _;

use crate::control::StatusSnapshot;

/// `1536` → `1.5 KiB`; bytes below 1 KiB are shown exactly.
pub fn human_bytes(bytes: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|title| title.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (index, cell) in cells.enumerate() {
            let _ = write!(text, "{cell:<width$}  ", width = widths[index]);
        }
        let _ = writeln!(out, "{}", text.trim_end());
    };
    line(out, &mut header.iter().copied());
    for row in rows {
        line(out, &mut row.iter().map(String::as_str));
    }
}

/// The table `ferry status` prints.
pub fn format_status(snapshot: &StatusSnapshot) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "appliance {}", snapshot.appliance);
    if let Some(link) = &snapshot.link {
        let state = if link.connected {
            "connected"
        } else {
            "not connected"
        };
        let _ = write!(out, "target {} ({state}", link.peer);
        if let Some(error) = &link.last_error {
            let _ = write!(out, ": {error}");
        }
        if let Some(limit) = link.bandwidth_limit_bytes_per_s {
            let _ = write!(out, "; limit {}/s", human_bytes(limit as f64));
        }
        let _ = writeln!(out, ")");
    }
    if !snapshot.disks.is_empty() {
        let _ = writeln!(out);
        let rows: Vec<Vec<String>> = snapshot
            .disks
            .iter()
            .map(|disk| {
                vec![
                    disk.machine.clone(),
                    disk.name.clone(),
                    disk.state.as_str().to_string(),
                    human_bytes(disk.bytes_written as f64),
                    format!(
                        "{} / {}",
                        human_bytes(disk.journal_used_bytes as f64),
                        human_bytes(disk.journal_capacity_bytes as f64)
                    ),
                    format!("{}/s", human_bytes(disk.churn_bytes_per_s)),
                    disk.last_sequence.to_string(),
                    disk.acked_sequence.to_string(),
                    format!("{:.1}s", disk.rpo_lag_seconds),
                ]
            })
            .collect();
        table(
            &mut out,
            &[
                "MACHINE",
                "DISK",
                "STATE",
                "WRITTEN",
                "JOURNAL",
                "CHURN",
                "LAST SEQ",
                "ACKED SEQ",
                "RPO LAG",
            ],
            &rows,
        );
    }
    if !snapshot.replicas.is_empty() {
        let _ = writeln!(out);
        let rows: Vec<Vec<String>> = snapshot
            .replicas
            .iter()
            .map(|replica| {
                vec![
                    replica.machine.clone(),
                    replica.name.clone(),
                    replica.applied_sequence.to_string(),
                    replica.replica_path.clone(),
                ]
            })
            .collect();
        table(
            &mut out,
            &["MACHINE", "DISK", "APPLIED SEQ", "REPLICA"],
            &rows,
        );
    }
    if snapshot.disks.is_empty() && snapshot.replicas.is_empty() {
        let _ = writeln!(out, "no disks and no replicas yet");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_picks_binary_units() {
        assert_eq!(human_bytes(0.0), "0 B");
        assert_eq!(human_bytes(1023.0), "1023 B");
        assert_eq!(human_bytes(1536.0), "1.5 KiB");
        assert_eq!(human_bytes((1u64 << 30) as f64), "1.0 GiB");
    }
}
