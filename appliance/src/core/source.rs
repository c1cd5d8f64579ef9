//! Source side of the replication protocol (sans-IO state machine).
