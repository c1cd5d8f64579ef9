//! The RBD image of a failover on RBD target storage: each disk of the group gets a clone of
//! its replica image that holds the recovery point's state, so a hypervisor boots the
//! failed-over machine straight from the pool (and the failover's NBD export serves the same
//! image).
//!
//! Making one (`make`): a snapshot of the replica image `ferry-failover+<group>+<point>`,
//! protected, cloned (layering, copy-on-write) to `<replica image>+failover+<group>`; then
//! every range where the point differs from that snapshot — the undo pieces of the point's
//! view, read *after* the snapshot — is written into the clone from the view. Why that is
//! exact without stopping the apply executor: the executor publishes a write's before-image in
//! the undo index before it issues the write to the replica, so every write the snapshot holds
//! after the point has its before-image among the pieces read afterwards; a piece whose write
//! missed the snapshot rewrites bytes the snapshot already holds at the point (the earliest
//! before-image after the point *is* the point's content). It is the view's own rule (replica
//! first, index after) applied to a snapshot.
//!
//! Names: replica images are `<prefix><source>+<machine>+<disk>` with `+`-free sanitised
//! parts, so a clone (two more `+`-separated parts) can never be taken for a replica, and
//! `rbd ls` lists it beside its parent. The snapshot names the group and the point.
//!
//! Removing one (`remove`, at cleanup and failback, and before a new failover of the group):
//! the clone's own snapshots (reprotect's rounds), the clone, then every `ferry-failover+<group>+*` snapshot of the replica (unprotected
//! first), so a failover that died before its record was written leaves nothing behind either.
//! Everything here blocks on the cluster: callers on the runtime use `spawn_blocking`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::apply::catalog::DiskView;
use crate::apply::replica::RbdStorage;
use crate::apply::storage::sanitize;
use crate::io::disk::IoBuf;
use crate::io::rbd::{self, Pool, RbdError, REPLICA_FEATURES};

/// The point's ranges are copied into the clone this much at a time.
const COPY_CHUNK_BYTES: u64 = 4 << 20;
/// How long removing a clone waits for handles of this process that are still closing (an
/// NBD connection finishing its last request) before it reports the image busy.
const REMOVE_BUSY_WAIT: Duration = Duration::from_secs(10);

/// One disk's failover image, as the failover record keeps it (enough to remove it after a
/// restart of the target appliance).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverClone {
    pub source: String,
    pub machine: String,
    pub disk: String,
    pub pool: String,
    /// The replica image the snapshot is of.
    pub parent: String,
    pub snapshot: String,
    /// The clone: the failed-over machine's disk.
    pub clone: String,
}

impl FailoverClone {
    /// The names for one disk of `group`'s failover to `point_id`.
    pub fn new(
        storage: &RbdStorage,
        group: &str,
        point_id: u64,
        source: &str,
        machine: &str,
        disk: &str,
    ) -> FailoverClone {
        let parent = storage.image_name(source, machine, disk);
        FailoverClone {
            source: source.to_string(),
            machine: machine.to_string(),
            disk: disk.to_string(),
            pool: storage.pool().name().to_string(),
            clone: format!("{parent}+failover+{}", sanitize(group)),
            snapshot: format!("{}{point_id}", snapshot_prefix(group)),
            parent,
        }
    }

    /// `pool/clone`, as `rbd` and libvirt name it.
    pub fn spec(&self) -> String {
        format!("{}/{}", self.pool, self.clone)
    }
}

/// The prefix of every snapshot a failover of `group` takes.
fn snapshot_prefix(group: &str) -> String {
    format!("ferry-failover+{}+", sanitize(group))
}

fn describe(error: RbdError) -> String {
    error.to_string()
}

fn missing(error: &RbdError) -> bool {
    error.errno() == Some(libc::ENOENT)
}

/// Removes the clone (if it exists), then every snapshot of its parent that a failover of
/// `group` took (unprotected first). Blocking. Whatever is already gone is fine.
pub fn remove(pool: &Pool, clone: &FailoverClone, group: &str) -> Result<(), String> {
    // The clone's own snapshots (reprotect's rounds) first: RBD keeps an image with snapshots.
    match pool.open_image(&clone.clone) {
        Ok(image) => {
            for snapshot in image.snapshots().map_err(describe)? {
                if image
                    .is_snapshot_protected(&snapshot.name)
                    .map_err(describe)?
                {
                    image.unprotect_snapshot(&snapshot.name).map_err(describe)?;
                }
                image.remove_snapshot(&snapshot.name).map_err(describe)?;
            }
        }
        Err(error) if missing(&error) => {}
        Err(error) => return Err(describe(error)),
    }
    let deadline = Instant::now() + REMOVE_BUSY_WAIT;
    loop {
        match pool.remove_image(&clone.clone) {
            Ok(()) => break,
            Err(error) if missing(&error) => break,
            Err(error) if error.errno() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(error) if error.errno() == Some(libc::EBUSY) => {
                return Err(format!(
                    "{error}: the image is open elsewhere (a machine booted from it?); stop it, then run the cleanup again"
                ))
            }
            Err(error) => return Err(describe(error)),
        }
    }
    let parent = match pool.open_image(&clone.parent) {
        Ok(parent) => parent,
        Err(error) if missing(&error) => return Ok(()),
        Err(error) => return Err(describe(error)),
    };
    let prefix = snapshot_prefix(group);
    for snapshot in parent.snapshots().map_err(describe)? {
        if !snapshot.name.starts_with(&prefix) {
            continue;
        }
        if parent
            .is_snapshot_protected(&snapshot.name)
            .map_err(describe)?
        {
            parent
                .unprotect_snapshot(&snapshot.name)
                .map_err(describe)?;
        }
        match parent.remove_snapshot(&snapshot.name) {
            Ok(()) => {}
            Err(error) if missing(&error) => {}
            Err(error) => return Err(describe(error)),
        }
    }
    Ok(())
}

/// Snapshot, protect, clone; returns the clone, open. Blocking.
fn create(pool: &Pool, clone: &FailoverClone) -> Result<rbd::Image, String> {
    let parent = pool.open_image(&clone.parent).map_err(describe)?;
    parent.create_snapshot(&clone.snapshot).map_err(describe)?;
    parent.protect_snapshot(&clone.snapshot).map_err(describe)?;
    pool.clone_image(
        &clone.parent,
        &clone.snapshot,
        &clone.clone,
        REPLICA_FEATURES,
    )
    .map_err(describe)?;
    pool.open_image(&clone.clone).map_err(describe)
}

/// Makes `clone` hold `view`'s point: removes what an earlier failover of `group` left,
/// snapshots the replica, clones it, and writes the point's before-images into the clone.
/// Returns the bytes written into the clone. On error the caller removes what was made.
pub async fn make(
    pool: &Pool,
    clone: &FailoverClone,
    group: &str,
    view: Arc<DiskView>,
) -> Result<u64, String> {
    let context = |message: String| {
        format!(
            "RBD image of failover disk {}/{} ({}): {message}",
            clone.machine,
            clone.disk,
            clone.spec()
        )
    };
    let image = {
        let (pool, clone, group) = (pool.clone(), clone.clone(), group.to_string());
        tokio::task::spawn_blocking(move || {
            remove(&pool, &clone, &group)?;
            create(&pool, &clone)
        })
        .await
        .map_err(|join| context(format!("task failed: {join}")))?
        .map_err(context)?
    };
    // After the snapshot, never before (see the module comment).
    let ranges = {
        let view = view.clone();
        tokio::task::spawn_blocking(move || view.undo_ranges())
            .await
            .map_err(|join| context(format!("task failed: {join}")))?
    };
    let mut written = 0u64;
    for (start, length) in ranges {
        let end = start + length;
        let mut offset = start;
        while offset < end {
            let chunk = (end - offset).min(COPY_CHUNK_BYTES) as usize;
            let view = view.clone();
            let buf = tokio::task::spawn_blocking(move || {
                let mut buf = IoBuf::zeroed(chunk);
                view.read_into(offset, &mut buf[..]).map(|()| buf)
            })
            .await
            .map_err(|join| context(format!("task failed: {join}")))?
            .map_err(|read| context(format!("reading the point at {offset}: {read}")))?;
            let (result, _) = image.write_at(offset, buf).await;
            result.map_err(|write| context(write.to_string()))?;
            offset += chunk as u64;
            written += chunk as u64;
        }
    }
    image
        .flush()
        .await
        .map_err(|flush| context(flush.to_string()))?;
    Ok(written)
}

/// The monitors of a `mon_host` value as (host, port): `v2:10.0.0.1:3300/0`,
/// `[v2:10.0.0.1:3300/0,v1:10.0.0.1:6789/0]`, `10.0.0.1,10.0.0.2:6789` or DNS names. Of an
/// address vector the first entry is kept (one `<host>` per monitor); a missing port is left
/// to the client's default.
pub fn monitors(mon_host: &str) -> Vec<(String, Option<u16>)> {
    let mut monitors: Vec<(String, Option<u16>)> = Vec::new();
    for vector in mon_host.split([' ', ';']).filter(|part| !part.is_empty()) {
        let first = vector
            .trim_start_matches('[')
            .trim_end_matches(']')
            .split(',')
            .filter(|part| !part.is_empty());
        // An address vector names one monitor; a plain comma list names several.
        let entries: Vec<&str> = if vector.starts_with('[') {
            first.take(1).collect()
        } else {
            first.collect()
        };
        for entry in entries {
            let entry = entry
                .strip_prefix("v2:")
                .or_else(|| entry.strip_prefix("v1:"))
                .or_else(|| entry.strip_prefix("any:"))
                .unwrap_or(entry);
            let entry = entry.split('/').next().unwrap_or(entry);
            let (host, port) = match entry.rsplit_once(':') {
                Some((host, port)) if !host.contains(':') => match port.parse::<u16>() {
                    Ok(port) => (host.to_string(), Some(port)),
                    Err(_) => (entry.to_string(), None),
                },
                _ => (entry.to_string(), None),
            };
            if !host.is_empty() && !monitors.iter().any(|(known, _)| *known == host) {
                monitors.push((host, port));
            }
        }
    }
    monitors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monitors_from_every_mon_host_spelling() {
        assert_eq!(
            monitors("v2:127.0.0.1:3300/0"),
            vec![("127.0.0.1".to_string(), Some(3300))]
        );
        assert_eq!(
            monitors(
                "[v2:10.0.0.1:3300/0,v1:10.0.0.1:6789/0] [v2:10.0.0.2:3300/0,v1:10.0.0.2:6789/0]"
            ),
            vec![
                ("10.0.0.1".to_string(), Some(3300)),
                ("10.0.0.2".to_string(), Some(3300))
            ]
        );
        assert_eq!(
            monitors("10.0.0.1,10.0.0.2:6789,mon3.example"),
            vec![
                ("10.0.0.1".to_string(), None),
                ("10.0.0.2".to_string(), Some(6789)),
                ("mon3.example".to_string(), None)
            ]
        );
        assert!(monitors("").is_empty());
    }
}
