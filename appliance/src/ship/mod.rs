//! Ship: drives the source replication core over the QUIC transport.
