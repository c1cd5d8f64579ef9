//! The write gate of a consistency group: while a recovery-point cut holds it closed, new write,
//! trim and zeroing requests of the group's disks wait before they get a journal sequence, so
//! the cut's marker lands between two well-defined sets of writes.
//!
//! Within one appliance the journal's single sequence already orders every acknowledged write
//! before any write issued after it; the gate is what makes a cut across several appliances
//! consistent: each member closes its gate, and only once every member is closed does any of
//! them append its marker (`daemon::points`). A write that passed the gate before it closed
//! still gets its sequence; that is fine, it was not acknowledged before the cut began.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

/// One gate per consistency group, shared by the capture disks of the group and its cutter.
/// Cheap to clone. Writers hold a read lock only while their sequence is assigned; a cut holds
/// the write lock. tokio's lock is fair: once a cut waits, later writers queue behind it.
#[derive(Clone, Debug, Default)]
pub struct WriteGate {
    lock: Arc<RwLock<()>>,
}

/// Held by a write while it registers and gets its sequence.
#[derive(Debug)]
pub struct GatePass {
    _guard: OwnedRwLockReadGuard<()>,
}

/// Held by a cut; new registrations wait until it is dropped (or [`GateClosed::open`]ed).
#[derive(Debug)]
pub struct GateClosed {
    _guard: OwnedRwLockWriteGuard<()>,
    closed_at: Instant,
}

impl GateClosed {
    /// Opens the gate and says how long it was closed (what a cut cost the writes it held).
    pub fn open(self) -> Duration {
        self.closed_at.elapsed()
    }
}

impl WriteGate {
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits while a cut holds the gate, then lets one write register.
    pub async fn pass(&self) -> GatePass {
        GatePass {
            _guard: self.lock.clone().read_owned().await,
        }
    }

    /// Closes the gate: waits for writes registering right now, then holds every new one until
    /// the returned value is dropped.
    pub async fn close(&self) -> GateClosed {
        let guard = self.lock.clone().write_owned().await;
        GateClosed {
            _guard: guard,
            closed_at: Instant::now(),
        }
    }
}
