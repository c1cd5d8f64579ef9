//! Ferry's appliance library: the sans-IO core, the I/O edges that drive it, the daemon, and
//! the control API shared with the CLI and the operator console.
//!
//! Read ARCHITECTURE.md at the workspace root for the map; modules are listed here in
//! data-flow order (capture → journal → ship → apply → recovery points → failover).

pub mod limits;

/// Sans-IO: formats, protocol state machines, codecs.
pub mod core;

/// I/O edges: mapped journal files, disk engines, QUIC transport.
pub mod io;

pub mod capture;

pub mod ship;

pub mod apply;

pub mod failover;

pub mod config;

pub mod control;

pub mod daemon;
