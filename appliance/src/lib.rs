//! Ferry's appliance library: the sans-IO core, the I/O edges that drive it, the daemon, and
//! the control API shared with the CLI and the operator console.
//!
//! Read ARCHITECTURE.md at the workspace root for the map; modules are listed here in
//! data-flow order (capture → journal → ship → apply → recovery points → failover).

pub mod limits;

pub mod core;

pub mod io;

pub mod control;
