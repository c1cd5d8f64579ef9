//! Failover on the target appliance: serves a consistency group's disks at a recovery point as
//! NBD exports with a writable overlay (never writing the replica or the undo log) — on RBD
//! target storage, from an RBD clone made at the point, which a hypervisor can boot straight
//! from — writes materialised images and machine definitions, and keeps the group's failover
//! state.

pub mod definition;
pub mod manager;
pub mod overlay;
pub mod rbd_clone;

pub use manager::{FailoverManager, FailoverRequest};
pub use overlay::{FailoverDisk, OverlayError, PointDisk, OVERLAY_BLOCK_BYTES};
