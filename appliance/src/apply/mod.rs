//! Apply: drives the target replication core over target storage.
