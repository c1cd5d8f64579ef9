//! Peer tools (Debian packages) the baselines run, how to run them, and the file helpers the
//! scenarios share: random and zero images, dropping the page cache, timing a command.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

/// A peer tool and the Debian package that has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    QemuImg,
    QemuIo,
    Fio,
    Nbdkit,
    Rsync,
}

impl Tool {
    const ALL: [Tool; 5] = [
        Tool::QemuImg,
        Tool::QemuIo,
        Tool::Fio,
        Tool::Nbdkit,
        Tool::Rsync,
    ];

    pub fn program(self) -> &'static str {
        match self {
            Tool::QemuImg => "qemu-img",
            Tool::QemuIo => "qemu-io",
            Tool::Fio => "fio",
            Tool::Nbdkit => "nbdkit",
            Tool::Rsync => "rsync",
        }
    }

    pub fn package(self) -> &'static str {
        match self {
            Tool::QemuImg | Tool::QemuIo => "qemu-utils",
            Tool::Fio => "fio",
            Tool::Nbdkit => "nbdkit",
            Tool::Rsync => "rsync",
        }
    }
}

/// Which peer tools are on `PATH`.
#[derive(Debug, Clone)]
pub struct Tools {
    found: Vec<(Tool, Option<PathBuf>)>,
}

impl Tools {
    pub fn find() -> Tools {
        Tools {
            found: Tool::ALL
                .into_iter()
                .map(|tool| (tool, which(tool.program())))
                .collect(),
        }
    }

    /// `None` when installed, else the sentence to show ("fio is not installed (Debian: fio)").
    pub fn missing_reason(&self, tool: Tool) -> Option<String> {
        let found = self
            .found
            .iter()
            .find(|(candidate, _)| *candidate == tool)
            .and_then(|(_, path)| path.as_ref());
        match found {
            Some(_) => None,
            None => Some(format!(
                "{} is not installed (Debian package {})",
                tool.program(),
                tool.package()
            )),
        }
    }

    /// Sentences for every missing tool.
    pub fn missing(&self) -> Vec<String> {
        Tool::ALL
            .into_iter()
            .filter_map(|tool| self.missing_reason(tool))
            .collect()
    }
}

pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| {
            std::fs::metadata(candidate).is_ok_and(|meta| {
                use std::os::unix::fs::PermissionsExt;
                meta.is_file() && meta.permissions().mode() & 0o111 != 0
            })
        })
}

/// Runs `command` to completion and returns its stdout; a non-zero exit is an error that shows
/// the command and the end of its stderr.
pub fn output(command: &mut Command) -> anyhow::Result<String> {
    let shown = format!("{command:?}");
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {shown}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(8).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!("{shown} failed ({}): {}", output.status, tail.join(" | "));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Writes everything in the page cache and, as root, drops it, so that disk runs start cold.
pub fn drop_caches() {
    let _ = Command::new("sync").status();
    if super::machine::is_root() {
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "3\n");
    }
}

/// Fills 1 MiB chunks with xorshift64* output: incompressible, not cryptographic.
struct Noise(u64);

impl Noise {
    fn fill(&mut self, buffer: &mut [u8]) {
        for chunk in buffer.chunks_exact_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            chunk.copy_from_slice(&self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
    }
}

/// One step of splitmix64: spreads a seed over all 64 bits.
pub fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Creates `path` with `bytes` of pseudo-random data (seeded) and makes it durable.
pub fn random_image(path: &Path, bytes: u64, seed: u64) -> anyhow::Result<()> {
    let mut file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut noise = Noise(splitmix64(seed) | 1);
    let mut buffer = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let take = left.min(buffer.len() as u64) as usize;
        noise.fill(&mut buffer[..take]);
        file.write_all(&buffer[..take])
            .with_context(|| format!("cannot write {}", path.display()))?;
        left -= take as u64;
    }
    file.sync_all()
        .with_context(|| format!("cannot sync {}", path.display()))?;
    Ok(())
}

/// Creates `path` with `bytes` of written (allocated) zeros and makes it durable: a warm image
/// whose first pass does not pay for thin provisioning.
pub fn zero_image(path: &Path, bytes: u64) -> anyhow::Result<()> {
    let mut file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let buffer = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let take = left.min(buffer.len() as u64) as usize;
        file.write_all(&buffer[..take])
            .with_context(|| format!("cannot write {}", path.display()))?;
        left -= take as u64;
    }
    file.sync_all()
        .with_context(|| format!("cannot sync {}", path.display()))?;
    Ok(())
}

/// Creates a sparse file of `bytes` (a hole: reads as zeros, takes no space).
pub fn sparse_image(path: &Path, bytes: u64) -> anyhow::Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    file.set_len(bytes)
        .with_context(|| format!("cannot size {}", path.display()))?;
    Ok(())
}

/// Fsyncs a file (after a baseline copy wrote it).
pub fn sync_file(path: &Path) -> anyhow::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|file| file.sync_all())
        .with_context(|| format!("cannot sync {}", path.display()))
}

/// Free bytes on the filesystem holding `path` (via `df`, to stay free of unsafe statvfs).
pub fn free_bytes(path: &Path) -> Option<u64> {
    let text = output(Command::new("df").arg("-Pk").arg(path)).ok()?;
    let line = text.lines().nth(1)?;
    let kib: u64 = line.split_whitespace().nth(3)?.parse().ok()?;
    Some(kib * 1024)
}

/// Refuses to start a scenario that would fill the disk.
pub fn need_free(path: &Path, bytes: u64) -> anyhow::Result<()> {
    if let Some(free) = free_bytes(path) {
        if free < bytes {
            bail!(
                "needs {:.1} GiB free in {}, has {:.1} GiB",
                bytes as f64 / (1u64 << 30) as f64,
                path.display(),
                free as f64 / (1u64 << 30) as f64
            );
        }
    }
    Ok(())
}

/// fio's JSON output for one job, reduced to what the bench reads.
#[derive(Debug, Clone, Copy, Default)]
pub struct FioResult {
    pub bytes_per_s: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
}

/// Runs fio with `args` (plus `--output-format=json`) and reads the first job's `direction`
/// ("read" or "write") figures.
pub fn fio(args: &[String], direction: &str) -> anyhow::Result<FioResult> {
    let text = output(Command::new("fio").args(args).arg("--output-format=json"))?;
    // fio may print notes before the JSON document.
    let start = text.find('{').context("fio printed no JSON")?;
    let json: serde_json::Value =
        serde_json::from_str(&text[start..]).context("fio printed malformed JSON")?;
    let job = &json["jobs"][0][direction];
    let number = |value: &serde_json::Value| value.as_f64().unwrap_or(0.0);
    let percentile = |key: &str| number(&job["clat_ns"]["percentile"][key]) / 1e6;
    Ok(FioResult {
        bytes_per_s: number(&job["bw_bytes"]),
        latency_p50_ms: percentile("50.000000"),
        latency_p99_ms: percentile("99.000000"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_images_are_incompressible_and_seeded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        random_image(&a, 3 << 20, 7).expect("a");
        random_image(&b, 3 << 20, 7).expect("b");
        let a = std::fs::read(a).expect("read a");
        assert_eq!(a.len(), 3 << 20);
        assert_eq!(a, std::fs::read(b).expect("read b"));
        // Every 8-byte word differs from its neighbour: no runs of zeros or repeats.
        let repeats = a
            .chunks_exact(8)
            .zip(a.chunks_exact(8).skip(1))
            .filter(|(x, y)| x == y)
            .count();
        assert_eq!(repeats, 0);
    }
}
