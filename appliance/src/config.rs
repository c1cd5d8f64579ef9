//! The TOML configuration: parsing, validation with key paths, human sizes and durations.
