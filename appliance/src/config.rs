//! The TOML configuration: parsing, validation with key paths, human sizes and durations.
//!
//! One file configures one appliance: `[appliance]` always, then `[source]` (this appliance
//! protects disks), `[target]` (this appliance keeps replicas), or both. Every table rejects
//! unknown keys, and every error names the key's path and the reason
//! (`source.machine[0].disks[1].path: missing field`, `source.journal_size: "12QB" is not a
//! size …`), because an operator reading a systemd journal should not have to guess.
//!
//! Sizes are bytes (`4096`) or a number with a unit (`512KiB`, `64MiB`, `1GiB`, `10MB`);
//! durations are humantime strings (`30s`, `5m`, `1h`, `1h 30m`). README.md documents every
//! key; keep the two in step.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

pub use crate::io::transport::{Compression, Fingerprint};
use crate::limits::{SEGMENT_BYTES_MIN, SEGMENT_COUNT_MIN};

/// Smallest cache journal the config accepts: the journal needs at least this many segments.
pub const JOURNAL_BYTES_MIN: u64 = (SEGMENT_BYTES_MIN * SEGMENT_COUNT_MIN) as u64;

/// Shortest recovery-point interval (issue: "as short as 1 second").
pub const RECOVERY_POINT_INTERVAL_MIN: Duration = Duration::from_secs(1);

/// Defaults for keys that may be left out.
pub const RECOVERY_POINT_INTERVAL_DEFAULT: Duration = Duration::from_secs(5 * 60);
pub const RETENTION_DEFAULT: Duration = Duration::from_secs(24 * 60 * 60);
pub const RPO_THRESHOLD_DEFAULT: Duration = Duration::from_secs(30);

/// Names of appliances, groups, machines and disks become NBD export names
/// (`<machine>/<disk>`), file names under the state and storage dirs, and Prometheus labels,
/// so they are restricted to a safe alphabet and length.
pub const NAME_BYTES_MAX: usize = 64;

/// Placeholder fingerprint accepted for a source that is not paired yet (the example
/// uses it). It pins nothing: the shipper must refuse to connect until a real fingerprint is set.
pub const FINGERPRINT_PLACEHOLDER: &str = "sha256:...";

/// A configuration that failed to load or validate.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A key has a bad value, is missing, is unknown, or contradicts another key.
    #[error("{}{}: {reason}{}", file_prefix(file), key_or_root(key), location_suffix(*line_column))]
    Invalid {
        /// The config file, when the text came from one.
        file: Option<PathBuf>,
        /// The key's path, e.g. `source.machine[0].disks[1].path` (empty: the whole document).
        key: String,
        reason: String,
        /// 1-based line and column of the offending text, when the parser knows it.
        line_column: Option<(usize, usize)>,
    },
}

fn file_prefix(file: &Option<PathBuf>) -> String {
    match file {
        Some(path) => format!("config {}: ", path.display()),
        None => String::new(),
    }
}

fn key_or_root(key: &str) -> &str {
    if key.is_empty() {
        "(document)"
    } else {
        key
    }
}

fn location_suffix(line_column: Option<(usize, usize)>) -> String {
    match line_column {
        Some((line, column)) => format!(" (line {line}, column {column})"),
        None => String::new(),
    }
}

impl ConfigError {
    /// The key path the error is about (empty for read errors and whole-document errors).
    pub fn key(&self) -> &str {
        match self {
            Self::Read { .. } => "",
            Self::Invalid { key, .. } => key,
        }
    }

    fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            file: None,
            key: key.into(),
            reason: reason.into(),
            line_column: None,
        }
    }

    fn with_file(self, path: &Path) -> Self {
        match self {
            Self::Invalid {
                key,
                reason,
                line_column,
                ..
            } => Self::Invalid {
                file: Some(path.to_path_buf()),
                key,
                reason,
                line_column,
            },
            other => other,
        }
    }
}

/// A whole appliance configuration, parsed and validated.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub appliance: ApplianceConfig,
    #[serde(default)]
    pub source: Option<SourceConfig>,
    #[serde(default)]
    pub target: Option<TargetConfig>,
}

/// `[appliance]`: identity and local paths.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplianceConfig {
    pub name: String,
    /// Holds `journal/`, `keys/`, `bitmaps/`, `catalog/`.
    pub state_dir: PathBuf,
    /// Unix socket of the control API. Default: `<state_dir>/control.sock`.
    #[serde(default)]
    pub control_socket: PathBuf,
    /// Address of the optional Prometheus `GET /metrics` listener.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
}

/// `[source]`: this appliance protects disks and ships their writes to a target.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Capacity of the cache journal (all disks share it).
    #[serde(rename = "journal_size", deserialize_with = "de_size")]
    pub journal_size_bytes: u64,
    /// The target appliance, `host:port`.
    pub target: String,
    /// The target's pinned certificate; `None` while unpaired (key left out, or the
    /// placeholder `sha256:...`): the source then journals but ships nothing.
    #[serde(default, deserialize_with = "de_pin")]
    pub target_fingerprint: Option<Fingerprint>,
    /// Link bandwidth limit in bytes per second (`"100MiB"` or `"100MiB/s"`); none by default.
    #[serde(rename = "bandwidth_limit", default, deserialize_with = "de_opt_rate")]
    pub bandwidth_limit_bytes_per_s: Option<u64>,
    /// Default compression for every group.
    #[serde(default)]
    pub compression: Compression,
    /// Per disk, how many bytes of writes may be answered once journaled, before their disk
    /// write completes (`"0"`: every write is answered when it is on the disk). FLUSH and FUA
    /// still wait for the disk.
    #[serde(
        rename = "write_behind",
        default = "default_write_behind",
        deserialize_with = "de_size"
    )]
    pub write_behind_bytes: u64,
    #[serde(default)]
    pub group: Vec<GroupConfig>,
    #[serde(default)]
    pub machine: Vec<MachineConfig>,
}

/// `[[source.group]]`: a consistency group, the unit of recovery points and failover.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    pub name: String,
    #[serde(
        default = "default_recovery_point_interval",
        deserialize_with = "de_duration"
    )]
    pub recovery_point_interval: Duration,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub app_consistent_interval: Option<Duration>,
    #[serde(default = "default_retention", deserialize_with = "de_duration")]
    pub retention: Duration,
    /// RPO lag above this raises an alert in status and the console.
    #[serde(default = "default_rpo_threshold", deserialize_with = "de_duration")]
    pub rpo_threshold: Duration,
    /// Shell command (`/bin/sh -c`) run before an app-consistent marker, e.g. `fsfreeze -f /data`.
    #[serde(default)]
    pub freeze_hook: Option<String>,
    /// Shell command run after the marker, whether or not it was cut.
    #[serde(default)]
    pub thaw_hook: Option<String>,
    /// Overrides `source.compression` for this group.
    #[serde(default)]
    pub compression: Option<Compression>,
    /// The OTHER source appliances holding disks of this group: every recovery point is cut on
    /// all of them at one instant through a barrier. Empty: the group lives on this appliance.
    #[serde(default)]
    pub members: Vec<MemberConfig>,
    /// UDP address the barrier listens on for the coordinator (QUIC, mutual TLS); defaulted to
    /// `0.0.0.0:20004` when `members` is set.
    #[serde(default)]
    pub barrier_listen: Option<SocketAddr>,
    /// The appliance that times and coordinates the group's cuts (its name); defaulted to the
    /// smallest name among this appliance and the members when `members` is set.
    #[serde(default)]
    pub coordinator: Option<String>,
}

/// Default port of the recovery-point barrier between the source appliances of a group.
pub const BARRIER_PORT_DEFAULT: u16 = 20004;

/// Another source appliance of a consistency group, pinned by its certificate fingerprint.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberConfig {
    /// Its `appliance.name` (also the peer name the target knows it by).
    pub name: String,
    /// Its barrier address, `host:port` (its `barrier_listen`).
    pub address: String,
    pub fingerprint: Fingerprint,
}

impl GroupConfig {
    /// Every appliance that cuts this group's points, this one (`own_name`) included, sorted.
    pub fn member_names(&self, own_name: &str) -> Vec<String> {
        let mut names: Vec<String> = self.members.iter().map(|m| m.name.clone()).collect();
        names.push(own_name.to_string());
        names.sort();
        names.dedup();
        names
    }
}

fn default_write_behind() -> u64 {
    u64::from(crate::capture::disk::WRITE_BEHIND_BYTES_MAX)
}

/// The largest `source.write_behind`.
pub const WRITE_BEHIND_BYTES_LIMIT: u64 = 1 << 30;

fn default_recovery_point_interval() -> Duration {
    RECOVERY_POINT_INTERVAL_DEFAULT
}
fn default_retention() -> Duration {
    RETENTION_DEFAULT
}
fn default_rpo_threshold() -> Duration {
    RPO_THRESHOLD_DEFAULT
}

/// `[[source.machine]]`: a protected machine and its disks.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub name: String,
    /// The consistency group (a `[[source.group]]` name).
    pub group: String,
    #[serde(default)]
    pub availability_set: Option<String>,
    #[serde(default)]
    pub resource_group: Option<String>,
    #[serde(default)]
    pub nics: Vec<NicConfig>,
    pub disks: Vec<DiskConfig>,
}

/// A network interface of a machine (source side, or a target-side override).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicConfig {
    pub network: String,
    pub subnet: String,
    #[serde(default)]
    pub ip: Option<IpAddr>,
}

/// A protected disk: its backing image or device and where its NBD export listens.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub name: String,
    /// Raw image file or block device.
    pub path: PathBuf,
    /// Unix socket of the NBD export.
    #[serde(default)]
    pub export: Option<PathBuf>,
    /// TCP address of the NBD export (e.g. `127.0.0.1:10809`).
    #[serde(default)]
    pub tcp: Option<SocketAddr>,
    /// Journal disk id, assigned by validation from the machine and disk names (see [`disk_id`]).
    #[serde(skip)]
    pub id: u32,
}

/// `[target]`: this appliance keeps replicas for its peers.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// UDP address the QUIC endpoint listens on.
    pub listen: SocketAddr,
    /// Replica files and recovery journals.
    pub storage_dir: PathBuf,
    /// Source appliances allowed to connect.
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    #[serde(default)]
    pub mapping: MappingConfig,
    /// Per-machine overrides of the mapping.
    #[serde(default)]
    pub machine: Vec<TargetMachineConfig>,
    /// Where replica disks live: raw files under `storage_dir` (default) or RBD images.
    #[serde(default)]
    pub storage: StorageKind,
    /// `[target.rbd]`: the Ceph cluster and pool of `storage = "rbd"`.
    #[serde(default)]
    pub rbd: Option<RbdConfig>,
}

/// `target.storage`: the backend of replica disks. Metadata (applied sequence, catalog,
/// settings) stays under `storage_dir` with either.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    /// Raw image files `<storage_dir>/<source>/<machine>/<disk>.raw`.
    #[default]
    File,
    /// One RBD image per disk in `target.rbd.pool`.
    Rbd,
}

/// `[target.rbd]`: how the target reaches its Ceph cluster. The defaults are the `rbd` CLI's,
/// so a host where `rbd ls <pool>` works needs only `pool`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RbdConfig {
    /// The RBD pool the images live in (initialised with `rbd pool init`).
    pub pool: String,
    /// The cluster's `ceph.conf` (at least `mon_host`).
    #[serde(default = "default_ceph_conf")]
    pub conf: PathBuf,
    /// The client's keyring; default: the `keyring` the conf names (or Ceph's search path).
    #[serde(default)]
    pub keyring: Option<PathBuf>,
    /// The cephx client name without `client.` (`ferry` for `client.ferry`).
    #[serde(default = "default_ceph_client")]
    pub client: String,
    /// Prefix of every image name (`<prefix><source>+<machine>+<disk>`), to share a pool.
    #[serde(default = "default_image_prefix")]
    pub image_prefix: String,
    /// The usage name of the libvirt secret (`<usage type='ceph'><name>`) that holds the
    /// client's key on the hypervisors: failover definitions reference it in `<auth>`.
    /// Default: `client.<client> secret`.
    #[serde(default)]
    pub libvirt_secret_usage: Option<String>,
}

fn default_ceph_conf() -> PathBuf {
    PathBuf::from("/etc/ceph/ceph.conf")
}

fn default_ceph_client() -> String {
    "admin".to_string()
}

fn default_image_prefix() -> String {
    "ferry.".to_string()
}

/// A source appliance pinned by its certificate fingerprint.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub name: String,
    pub fingerprint: Fingerprint,
}

/// `[target.mapping]`: how source settings become target settings.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingConfig {
    /// Resource group of failed-over machines (default: the source machine's).
    #[serde(default)]
    pub resource_group: Option<String>,
    /// Source network → target network (unmapped networks keep their name).
    #[serde(default)]
    pub networks: BTreeMap<String, String>,
    /// Source availability set → target availability set (unmapped ones keep their name).
    #[serde(default)]
    pub availability_sets: BTreeMap<String, String>,
    /// Network that test failovers attach to, instead of the mapped production network.
    #[serde(default)]
    pub test_network: Option<String>,
}

/// `[[target.machine]]`: overrides for one machine; every key but `name` is optional.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetMachineConfig {
    pub name: String,
    #[serde(default)]
    pub resource_group: Option<String>,
    #[serde(default)]
    pub availability_set: Option<String>,
    #[serde(default)]
    pub test_network: Option<String>,
    /// Network mapping entries that take precedence over `[target.mapping] networks`.
    #[serde(default)]
    pub networks: BTreeMap<String, String>,
    /// Replaces the mapped NICs entirely (network, subnet and IP as given).
    #[serde(default)]
    pub nics: Option<Vec<NicConfig>>,
}

/// A machine's placement settings: declared on the source, derived for the target through the
/// mapping, stored with the replica and used by failover.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineSettings {
    pub name: String,
    pub resource_group: Option<String>,
    pub availability_set: Option<String>,
    pub nics: Vec<NicConfig>,
    /// Target side only: the network test failovers use.
    #[serde(default)]
    pub test_network: Option<String>,
}

impl MachineConfig {
    /// The settings the source declares for this machine (what travels to the target).
    pub fn settings(&self) -> MachineSettings {
        MachineSettings {
            name: self.name.clone(),
            resource_group: self.resource_group.clone(),
            availability_set: self.availability_set.clone(),
            nics: self.nics.clone(),
            test_network: None,
        }
    }
}

impl TargetConfig {
    /// Derives a machine's target settings from its source settings: the per-machine override
    /// first, then `[target.mapping]`, then the source value unchanged.
    pub fn target_settings(&self, source: &MachineSettings) -> MachineSettings {
        self.mapping.target_settings(&self.machine, source)
    }
}

impl MappingConfig {
    /// Derives a machine's target settings with these mapping rules and the per-machine
    /// `overrides` (`[[target.machine]]`); the target's apply sessions call this with the
    /// settings a source announced.
    pub fn target_settings(
        &self,
        overrides: &[TargetMachineConfig],
        source: &MachineSettings,
    ) -> MachineSettings {
        let mapping = self;
        let overrides = overrides.iter().find(|machine| machine.name == source.name);
        let resource_group = overrides
            .and_then(|o| o.resource_group.clone())
            .or_else(|| mapping.resource_group.clone())
            .or_else(|| source.resource_group.clone());
        let availability_set = overrides
            .and_then(|o| o.availability_set.clone())
            .or_else(|| {
                source
                    .availability_set
                    .as_ref()
                    .map(|set| mapping.availability_sets.get(set).unwrap_or(set).clone())
            });
        let nics = match overrides.and_then(|o| o.nics.clone()) {
            Some(nics) => nics,
            None => source
                .nics
                .iter()
                .map(|nic| {
                    let network = overrides
                        .and_then(|o| o.networks.get(&nic.network))
                        .or_else(|| mapping.networks.get(&nic.network))
                        .unwrap_or(&nic.network)
                        .clone();
                    NicConfig {
                        network,
                        subnet: nic.subnet.clone(),
                        ip: nic.ip,
                    }
                })
                .collect(),
        };
        let test_network = overrides
            .and_then(|o| o.test_network.clone())
            .or_else(|| mapping.test_network.clone());
        MachineSettings {
            name: source.name.clone(),
            resource_group,
            availability_set,
            nics,
            test_network,
        }
    }
}

fn de_pin<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Fingerprint>, D::Error> {
    let text = String::deserialize(deserializer)?;
    if text == FINGERPRINT_PLACEHOLDER {
        return Ok(None);
    }
    text.parse().map(Some).map_err(de::Error::custom)
}

/// Parses a human size: bytes (`4096`), or a whole number with a binary (`KiB`, `MiB`, `GiB`,
/// `TiB`) or decimal (`KB`, `MB`, `GB`, `TB`) unit, case-insensitive, optional space between.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let error = || {
        format!("{text:?} is not a size (expected bytes, or a number with KiB, MiB, GiB, TiB, KB, MB, GB or TB, e.g. \"64MiB\")")
    };
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(digits_end);
    if number.is_empty() {
        return Err(error());
    }
    let number: u64 = number.parse().map_err(|_| error())?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(error()),
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("{text:?} is too large a size"))
}

/// Parses a human duration with humantime (`30s`, `5m`, `1h 30m`, `250ms`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|error| {
        format!("{text:?} is not a duration ({error}; expected e.g. \"30s\", \"5m\", \"1h\")")
    })
}

/// A size or rate as TOML gives it: an integer, or a string.
struct SizeVisitor {
    /// Accept a trailing `/s` (bandwidth).
    rate: bool,
}

impl Visitor<'_> for SizeVisitor {
    type Value = u64;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a size: a number of bytes or a string such as \"64MiB\"")
    }
    fn visit_i64<E: de::Error>(self, value: i64) -> Result<u64, E> {
        u64::try_from(value).map_err(|_| E::custom(format!("{value} is not a size (negative)")))
    }
    fn visit_u64<E: de::Error>(self, value: u64) -> Result<u64, E> {
        Ok(value)
    }
    fn visit_str<E: de::Error>(self, value: &str) -> Result<u64, E> {
        let text = if self.rate {
            value.trim().strip_suffix("/s").unwrap_or(value)
        } else {
            value
        };
        parse_size(text).map_err(E::custom)
    }
}

fn de_size<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    deserializer.deserialize_any(SizeVisitor { rate: false })
}

fn de_opt_rate<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    deserializer
        .deserialize_any(SizeVisitor { rate: true })
        .map(Some)
}

struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration string such as \"30s\", \"5m\" or \"1h\"")
    }
    fn visit_str<E: de::Error>(self, value: &str) -> Result<Duration, E> {
        parse_duration(value).map_err(E::custom)
    }
}

fn de_duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    deserializer.deserialize_any(DurationVisitor)
}

fn de_opt_duration<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    deserializer.deserialize_any(DurationVisitor).map(Some)
}

/// The journal disk id of `machine/disk`: the low 32 bits of xxh3-64 over `"<machine>/<disk>"`,
/// with 0 mapped to 1 (0 is never a disk).
///
/// Derived from the names rather than the order in the file so that reordering, adding or
/// removing other disks never changes the id of a disk whose records sit in the journal or at
/// the target. Validation refuses the (improbable) collision of two disks' ids.
pub fn disk_id(machine: &str, disk: &str) -> u32 {
    let key = format!("{machine}/{disk}");
    let id = twox_hash::XxHash3_64::oneshot(key.as_bytes()) as u32;
    id.max(1)
}

impl Config {
    /// Reads, parses and validates a config file. Relative paths in it are taken relative to the
    /// directory that holds the file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Self::parse_unvalidated(&text).map_err(|e| e.with_file(path))?;
        if let Some(base) = path.parent() {
            config.resolve_relative_paths(base);
        }
        config.validate().map_err(|e| e.with_file(path))?;
        Ok(config)
    }

    /// Parses and validates config text. Relative paths stay relative (to the working directory).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let mut config = Self::parse_unvalidated(text)?;
        config.validate()?;
        Ok(config)
    }

    fn parse_unvalidated(text: &str) -> Result<Self, ConfigError> {
        let deserializer = toml::Deserializer::new(text);
        serde_path_to_error::deserialize(deserializer).map_err(|error| {
            let mut key = error.path().to_string();
            if key == "." {
                key.clear();
            }
            let inner = error.into_inner();
            let line_column = inner.span().map(|span| line_column(text, span.start));
            let (key, reason) = explain(key, inner.message());
            ConfigError::Invalid {
                file: None,
                key,
                reason,
                line_column,
            }
        })
    }

    /// The path of the control socket (defaulted from `state_dir` when the key is left out).
    pub fn control_socket(&self) -> &Path {
        &self.appliance.control_socket
    }

    fn resolve_relative_paths(&mut self, base: &Path) {
        let resolve = |path: &mut PathBuf| {
            if path.is_relative() && !path.as_os_str().is_empty() {
                *path = base.join(&*path);
            }
        };
        resolve(&mut self.appliance.state_dir);
        resolve(&mut self.appliance.control_socket);
        if let Some(source) = &mut self.source {
            for machine in &mut source.machine {
                for disk in &mut machine.disks {
                    resolve(&mut disk.path);
                    if let Some(export) = &mut disk.export {
                        resolve(export);
                    }
                }
            }
        }
        if let Some(target) = &mut self.target {
            resolve(&mut target.storage_dir);
            if let Some(rbd) = &mut target.rbd {
                resolve(&mut rbd.conf);
                if let Some(keyring) = &mut rbd.keyring {
                    resolve(keyring);
                }
            }
        }
    }

    /// Checks what the types cannot: names, references, duplicates, bounds; assigns disk ids
    /// and defaults that depend on other keys.
    fn validate(&mut self) -> Result<(), ConfigError> {
        check_name("appliance.name", &self.appliance.name)?;
        if self.appliance.state_dir.as_os_str().is_empty() {
            return Err(ConfigError::invalid(
                "appliance.state_dir",
                "must not be empty",
            ));
        }
        if self.appliance.control_socket.as_os_str().is_empty() {
            self.appliance.control_socket = self.appliance.state_dir.join("control.sock");
        }
        if self.source.is_none() && self.target.is_none() {
            return Err(ConfigError::invalid(
                "",
                "no [source] and no [target]: an appliance protects disks, keeps replicas, or both",
            ));
        }
        if let Some(source) = &mut self.source {
            validate_source(source, &self.appliance)?;
        }
        if let Some(target) = &self.target {
            validate_target(target)?;
        }
        Ok(())
    }
}

fn validate_source(
    source: &mut SourceConfig,
    appliance: &ApplianceConfig,
) -> Result<(), ConfigError> {
    if source.journal_size_bytes < JOURNAL_BYTES_MIN {
        return Err(ConfigError::invalid(
            "source.journal_size",
            format!(
                "{} bytes is below the minimum of {JOURNAL_BYTES_MIN} bytes ({} segments of {} MiB)",
                source.journal_size_bytes,
                SEGMENT_COUNT_MIN,
                SEGMENT_BYTES_MIN >> 20
            ),
        ));
    }
    check_host_port("source.target", &source.target)?;
    if source.write_behind_bytes > WRITE_BEHIND_BYTES_LIMIT {
        return Err(ConfigError::invalid(
            "source.write_behind",
            format!(
                "{} bytes is above the maximum of {WRITE_BEHIND_BYTES_LIMIT} bytes (1GiB)",
                source.write_behind_bytes
            ),
        ));
    }
    if source.bandwidth_limit_bytes_per_s == Some(0) {
        return Err(ConfigError::invalid(
            "source.bandwidth_limit",
            "must be above 0 (leave the key out for no limit)",
        ));
    }
    for group in &mut source.group {
        default_members(group, &appliance.name);
    }
    let mut group_index: HashMap<&str, usize> = HashMap::new();
    for (index, group) in source.group.iter().enumerate() {
        let key = |field: &str| format!("source.group[{index}].{field}");
        check_name(&key("name"), &group.name)?;
        if let Some(first) = group_index.insert(&group.name, index) {
            return Err(ConfigError::invalid(
                key("name"),
                format!(
                    "duplicate group {:?} (also source.group[{first}])",
                    group.name
                ),
            ));
        }
        if group.recovery_point_interval < RECOVERY_POINT_INTERVAL_MIN {
            return Err(ConfigError::invalid(
                key("recovery_point_interval"),
                format!(
                    "{:?} is shorter than the minimum of 1s",
                    group.recovery_point_interval
                ),
            ));
        }
        if let Some(interval) = group.app_consistent_interval {
            if interval < RECOVERY_POINT_INTERVAL_MIN {
                return Err(ConfigError::invalid(
                    key("app_consistent_interval"),
                    format!("{interval:?} is shorter than the minimum of 1s"),
                ));
            }
        }
        if group.retention < group.recovery_point_interval {
            return Err(ConfigError::invalid(
                key("retention"),
                format!(
                    "{} is shorter than recovery_point_interval ({}): no point would be kept",
                    humantime::format_duration(group.retention),
                    humantime::format_duration(group.recovery_point_interval)
                ),
            ));
        }
        if group.rpo_threshold.is_zero() {
            return Err(ConfigError::invalid(
                key("rpo_threshold"),
                "must be above 0",
            ));
        }
        validate_members(index, group, &appliance.name)?;
        for (field, hook) in [
            ("freeze_hook", &group.freeze_hook),
            ("thaw_hook", &group.thaw_hook),
        ] {
            if hook
                .as_deref()
                .is_some_and(|command| command.trim().is_empty())
            {
                return Err(ConfigError::invalid(
                    key(field),
                    "must not be empty (leave it out)",
                ));
            }
        }
    }

    let mut machine_index: HashMap<String, usize> = HashMap::new();
    let mut ids: HashMap<u32, String> = HashMap::new();
    // Every place a disk is read from or served at must be distinct across the whole file.
    let mut disk_paths: HashMap<PathBuf, String> = HashMap::new();
    let mut exports: HashMap<PathBuf, String> = HashMap::new();
    let mut tcps: HashMap<SocketAddr, String> = HashMap::new();
    if let Some(metrics) = appliance.metrics_listen {
        tcps.insert(metrics, "appliance.metrics_listen".to_string());
    }
    exports.insert(
        appliance.control_socket.clone(),
        "appliance.control_socket".to_string(),
    );
    for (machine_number, machine) in source.machine.iter_mut().enumerate() {
        let key = |field: &str| format!("source.machine[{machine_number}].{field}");
        check_name(&key("name"), &machine.name)?;
        if let Some(first) = machine_index.insert(machine.name.clone(), machine_number) {
            return Err(ConfigError::invalid(
                key("name"),
                format!(
                    "duplicate machine {:?} (also source.machine[{first}])",
                    machine.name
                ),
            ));
        }
        if !group_index.contains_key(machine.group.as_str()) {
            let known: Vec<&str> = source.group.iter().map(|g| g.name.as_str()).collect();
            return Err(ConfigError::invalid(
                key("group"),
                format!(
                    "unknown group {:?} (groups: {})",
                    machine.group,
                    if known.is_empty() {
                        "none declared".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
        for (nic_number, nic) in machine.nics.iter().enumerate() {
            check_label(&key(&format!("nics[{nic_number}].network")), &nic.network)?;
            check_label(&key(&format!("nics[{nic_number}].subnet")), &nic.subnet)?;
        }
        if machine.disks.is_empty() {
            return Err(ConfigError::invalid(
                key("disks"),
                "a machine needs at least one disk",
            ));
        }
        let mut disk_names: HashMap<String, usize> = HashMap::new();
        let machine_name = machine.name.clone();
        for (disk_number, disk) in machine.disks.iter_mut().enumerate() {
            let disk_key = |field: &str| key(&format!("disks[{disk_number}].{field}"));
            check_name(&disk_key("name"), &disk.name)?;
            if let Some(first) = disk_names.insert(disk.name.clone(), disk_number) {
                return Err(ConfigError::invalid(
                    disk_key("name"),
                    format!(
                        "duplicate disk {:?} in machine {machine_name:?} (also disks[{first}])",
                        disk.name
                    ),
                ));
            }
            let label = format!("{machine_name}/{}", disk.name);
            if disk.path.as_os_str().is_empty() {
                return Err(ConfigError::invalid(disk_key("path"), "must not be empty"));
            }
            if let Some(other) = disk_paths.insert(disk.path.clone(), label.clone()) {
                return Err(ConfigError::invalid(
                    disk_key("path"),
                    format!("{} is also the path of disk {other}", disk.path.display()),
                ));
            }
            if disk.export.is_none() && disk.tcp.is_none() {
                return Err(ConfigError::invalid(
                    disk_key("export"),
                    "a disk needs an export (unix socket path) or tcp address, or both",
                ));
            }
            if let Some(export) = &disk.export {
                if let Some(other) = exports.insert(export.clone(), label.clone()) {
                    return Err(ConfigError::invalid(
                        disk_key("export"),
                        format!("{} is also used by {other}", export.display()),
                    ));
                }
            }
            if let Some(tcp) = disk.tcp {
                if let Some(other) = tcps.insert(tcp, label.clone()) {
                    return Err(ConfigError::invalid(
                        disk_key("tcp"),
                        format!("{tcp} is also used by {other}"),
                    ));
                }
            }
            disk.id = disk_id(&machine_name, &disk.name);
            if let Some(other) = ids.insert(disk.id, label.clone()) {
                return Err(ConfigError::invalid(
                    disk_key("name"),
                    format!(
                        "disk id {} of {label} collides with {other}; rename one of them",
                        disk.id
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Fills `barrier_listen` and `coordinator` of a group with members (before validation, which
/// then checks the filled values).
fn default_members(group: &mut GroupConfig, own_name: &str) {
    if group.members.is_empty() {
        return;
    }
    if group.barrier_listen.is_none() {
        group.barrier_listen = Some(SocketAddr::from((
            std::net::Ipv4Addr::UNSPECIFIED,
            BARRIER_PORT_DEFAULT,
        )));
    }
    if group.coordinator.is_none() {
        group.coordinator = group.member_names(own_name).into_iter().next();
    }
}

fn validate_members(index: usize, group: &GroupConfig, own_name: &str) -> Result<(), ConfigError> {
    let key = |field: &str| format!("source.group[{index}].{field}");
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (number, member) in group.members.iter().enumerate() {
        let member_key = |field: &str| key(&format!("members[{number}].{field}"));
        check_name(&member_key("name"), &member.name)?;
        if member.name == own_name {
            return Err(ConfigError::invalid(
                member_key("name"),
                format!("{own_name:?} is this appliance (appliance.name); members lists the other source appliances of the group"),
            ));
        }
        if let Some(first) = names.insert(&member.name, number) {
            return Err(ConfigError::invalid(
                member_key("name"),
                format!("duplicate member {:?} (also members[{first}])", member.name),
            ));
        }
        check_host_port(&member_key("address"), &member.address)?;
    }
    if group.members.is_empty() {
        if let Some(coordinator) = &group.coordinator {
            if coordinator != own_name {
                return Err(ConfigError::invalid(
                    key("coordinator"),
                    format!("{coordinator:?} is not this appliance and the group has no members"),
                ));
            }
        }
        if group.barrier_listen.is_some() {
            return Err(ConfigError::invalid(
                key("barrier_listen"),
                "the group has no members: there is no barrier to listen for",
            ));
        }
        return Ok(());
    }
    if let Some(coordinator) = &group.coordinator {
        if !group.member_names(own_name).contains(coordinator) {
            return Err(ConfigError::invalid(
                key("coordinator"),
                format!(
                    "{coordinator:?} is neither this appliance nor one of the members ({})",
                    group.member_names(own_name).join(", ")
                ),
            ));
        }
    }
    Ok(())
}

fn validate_target(target: &TargetConfig) -> Result<(), ConfigError> {
    if target.storage_dir.as_os_str().is_empty() {
        return Err(ConfigError::invalid(
            "target.storage_dir",
            "must not be empty",
        ));
    }
    match (target.storage, &target.rbd) {
        (StorageKind::Rbd, None) => {
            return Err(ConfigError::invalid(
                "target.rbd",
                "missing: target.storage = \"rbd\" needs a [target.rbd] table with at least `pool`",
            ))
        }
        (StorageKind::File, Some(_)) => {
            return Err(ConfigError::invalid(
                "target.rbd",
                "set, but target.storage is \"file\": add storage = \"rbd\" to [target] or remove [target.rbd]",
            ))
        }
        (StorageKind::Rbd, Some(rbd)) => {
            if rbd.pool.is_empty() {
                return Err(ConfigError::invalid("target.rbd.pool", "must not be empty"));
            }
            if rbd.conf.as_os_str().is_empty() {
                return Err(ConfigError::invalid("target.rbd.conf", "must not be empty"));
            }
            if rbd.keyring.as_ref().is_some_and(|keyring| keyring.as_os_str().is_empty()) {
                return Err(ConfigError::invalid("target.rbd.keyring", "must not be empty"));
            }
            if rbd.client.is_empty() || rbd.client.starts_with("client.") {
                return Err(ConfigError::invalid(
                    "target.rbd.client",
                    "must be the client's name without `client.` (e.g. \"ferry\")",
                ));
            }
            if !rbd
                .image_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                return Err(ConfigError::invalid(
                    "target.rbd.image_prefix",
                    "may hold only letters, digits, '-', '_' and '.'",
                ));
            }
        }
        (StorageKind::File, None) => {}
    }
    let mut peers: HashMap<&str, usize> = HashMap::new();
    for (index, peer) in target.peers.iter().enumerate() {
        let key = format!("target.peers[{index}].name");
        check_name(&key, &peer.name)?;
        if let Some(first) = peers.insert(&peer.name, index) {
            return Err(ConfigError::invalid(
                key,
                format!(
                    "duplicate peer {:?} (also target.peers[{first}])",
                    peer.name
                ),
            ));
        }
    }
    for (from, to) in &target.mapping.networks {
        check_label(&format!("target.mapping.networks.{from}"), to)?;
    }
    let mut machines: HashMap<&str, usize> = HashMap::new();
    for (index, machine) in target.machine.iter().enumerate() {
        let key = format!("target.machine[{index}].name");
        check_name(&key, &machine.name)?;
        if let Some(first) = machines.insert(&machine.name, index) {
            return Err(ConfigError::invalid(
                key,
                format!(
                    "duplicate machine {:?} (also target.machine[{first}])",
                    machine.name
                ),
            ));
        }
    }
    Ok(())
}

/// Names become file names, export names and metric labels: `[A-Za-z0-9._-]`, not starting with
/// a dot, at most [`NAME_BYTES_MAX`] bytes.
fn check_name(key: &str, name: &str) -> Result<(), ConfigError> {
    let valid_character = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() {
        return Err(ConfigError::invalid(key, "must not be empty"));
    }
    if name.len() > NAME_BYTES_MAX {
        return Err(ConfigError::invalid(
            key,
            format!("{name:?} is longer than {NAME_BYTES_MAX} bytes"),
        ));
    }
    if name.starts_with('.') || !name.chars().all(valid_character) {
        return Err(ConfigError::invalid(
            key,
            format!("{name:?} is not a valid name (letters, digits, '.', '_', '-'; not starting with '.')"),
        ));
    }
    Ok(())
}

/// Free-form labels (networks, subnets) only need to be non-empty.
fn check_label(key: &str, label: &str) -> Result<(), ConfigError> {
    if label.trim().is_empty() {
        return Err(ConfigError::invalid(key, "must not be empty"));
    }
    Ok(())
}

fn check_host_port(key: &str, address: &str) -> Result<(), ConfigError> {
    let bad = || {
        ConfigError::invalid(
            key,
            format!("{address:?} is not host:port (e.g. \"203.0.113.7:7400\")"),
        )
    };
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || host.contains(char::is_whitespace) || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    Ok(())
}

/// Turns serde's messages into "key: reason": a missing or unknown field is named in the key
/// path itself, so operators see `…disks[1].path: missing field`.
fn explain(key: String, message: &str) -> (String, String) {
    let join = |field: &str| {
        if key.is_empty() {
            field.to_string()
        } else {
            format!("{key}.{field}")
        }
    };
    if let Some(rest) = message.strip_prefix("missing field `") {
        if let Some(field) = rest.strip_suffix('`') {
            return (join(field), "missing field".to_string());
        }
    }
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some((field, expected)) = rest.split_once('`') {
            let expected = expected.trim_start_matches(',').trim();
            let reason = if expected.is_empty() {
                "unknown key".to_string()
            } else {
                format!("unknown key ({})", expected.replace('`', ""))
            };
            // serde_path_to_error already records an unknown key in the path in some versions.
            let already = key.rsplit(['.', ']']).next() == Some(field);
            return (if already { key } else { join(field) }, reason);
        }
    }
    (key, message.trim().to_string())
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line = before.iter().filter(|&&byte| byte == b'\n').count() + 1;
    let column = before
        .iter()
        .rposition(|&byte| byte == b'\n')
        .map_or(before.len(), |newline| before.len() - newline - 1)
        + 1;
    (line, column)
}

#[cfg(test)]
mod tests;
