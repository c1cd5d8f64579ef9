//! Replication protocol frames: zerocopy headers with a protocol version.
