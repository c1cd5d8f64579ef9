//! The machine's facts for the results: cores, CPU, memory, the disk under the work directory,
//! the kernel, the load before and after, and what was built.

use std::path::Path;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Machine {
    pub cores: usize,
    pub cpu: String,
    pub memory_bytes: u64,
    /// Device and filesystem of the work directory, e.g. "/dev/vda (ext4)".
    pub disk: String,
    pub kernel: String,
    pub load_start: String,
    pub load_end: String,
    pub date_utc: String,
    pub build: String,
    pub duration_s: f64,
    pub root: bool,
}

impl Machine {
    pub fn probe(work_dir: &Path) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|line| line.starts_with("model name"))
            .and_then(|line| line.split_once(':'))
            .map(|(_, name)| name.trim().to_owned())
            .unwrap_or_else(|| "unknown".to_owned());
        let memory_bytes = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| {
                let line = text.lines().find(|line| line.starts_with("MemTotal:"))?;
                let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
                Some(kib * 1024)
            })
            .unwrap_or(0);
        Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu,
            memory_bytes,
            disk: disk_of(work_dir),
            kernel: read_trimmed("/proc/sys/kernel/osrelease"),
            load_start: load(),
            load_end: String::new(),
            date_utc: date_utc(),
            build: format!(
                "ferry {} ({} build)",
                env!("CARGO_PKG_VERSION"),
                if cfg!(debug_assertions) {
                    "debug"
                } else {
                    "release"
                }
            ),
            duration_s: 0.0,
            root: is_root(),
        }
    }

    pub fn finish(&mut self, took: Duration) {
        self.load_end = load();
        self.duration_s = took.as_secs_f64();
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "cores": self.cores,
            "cpu": self.cpu,
            "memory_bytes": self.memory_bytes,
            "disk": self.disk,
            "kernel": self.kernel,
            "load_average_start": self.load_start,
            "load_average_end": self.load_end,
            "date_utc": self.date_utc,
            "build": self.build,
            "duration_s": self.duration_s,
            "root": self.root,
        })
    }
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|text| text.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

pub fn load() -> String {
    let text = read_trimmed("/proc/loadavg");
    text.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Root can drop the page cache; others measure with whatever is cached.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|line| line.starts_with("Uid:"))?;
            Some(line.split_whitespace().nth(2)? == "0")
        })
        .unwrap_or(false)
}

/// The mount (device and filesystem type) holding `path`: the longest mount point that prefixes
/// it, with the device's model from sysfs when there is one.
fn disk_of(path: &Path) -> String {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut best: Option<(usize, String, String)> = None;
    for line in mounts.lines() {
        let mut fields = line.split_whitespace();
        let (Some(device), Some(mount), Some(kind)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if path.starts_with(mount) && best.as_ref().is_none_or(|(len, _, _)| mount.len() >= *len) {
            best = Some((mount.len(), device.to_owned(), kind.to_owned()));
        }
    }
    let Some((_, device, kind)) = best else {
        return "unknown".to_owned();
    };
    let name = device.trim_start_matches("/dev/");
    let bus = if name.starts_with("vd") {
        ", virtio-blk"
    } else if name.starts_with("nvme") {
        ", NVMe"
    } else {
        ""
    };
    format!("{device} ({kind}{bus})")
}

/// Now in UTC as `YYYY-MM-DD HH:MM UTC`, without a date crate.
fn date_utc() -> String {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let days = (seconds / 86_400) as i64;
    let time = seconds % 86_400;
    // Civil from days (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        time / 3600,
        time % 3600 / 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn date_is_formatted_in_utc() {
        let date = super::date_utc();
        assert_eq!(date.len(), "2026-11-26 16:00 UTC".len(), "{date}");
        assert!(date.starts_with("20"), "{date}");
    }
}
