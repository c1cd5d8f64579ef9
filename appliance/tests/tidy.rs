//! Tidy checks over the source tree: the sans-IO core stays free of I/O and clocks, and every
//! core module says what it is for.

use std::path::{Path, PathBuf};

/// Words that mean I/O or a clock read; none may appear anywhere in `src/core/` (comments
/// included, so the check needs no Rust parser and cannot be dodged by a `use` alias).
const FORBIDDEN: &[&str] = &[
    "tokio",
    "quinn",
    "io_uring",
    "io-uring",
    "memmap2",
    "libc",
    "std::fs",
    "std::net",
    // Clock types, however imported (`std::time::Instant`, `use std::time::{Duration, Instant}`).
    "Instant",
    "SystemTime",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|error| panic!("read {dir:?}: {error}"));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn core_does_no_io_and_every_module_says_what_it_is_for() {
    let core = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/core");
    let mut files = Vec::new();
    rust_files(&core, &mut files);
    assert!(
        files.len() >= 5,
        "expected the core modules under {core:?}, found {files:?}"
    );
    let mut problems = Vec::new();
    for path in &files {
        let text =
            std::fs::read_to_string(path).unwrap_or_else(|error| panic!("{path:?}: {error}"));
        if !text.starts_with("//!") {
            problems.push(format!(
                "{}: does not start with a `//!` line",
                path.display()
            ));
        }
        for (line_index, line) in text.lines().enumerate() {
            for word in FORBIDDEN {
                // The core's own module doc names the forbidden crates to forbid them.
                let is_doc = line.trim_start().starts_with("//!");
                if !is_doc && line.contains(word) {
                    problems.push(format!(
                        "{}:{}: mentions `{word}`",
                        path.display(),
                        line_index + 1
                    ));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "the sans-IO core breaks its rules:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_check_catches_what_it_should() {
    let line = "use tokio::net::TcpStream;";
    assert!(FORBIDDEN.iter().any(|word| line.contains(word)));
    let line = "let started = std::time::Instant::now();";
    assert!(FORBIDDEN.iter().any(|word| line.contains(word)));
    let line = "use std::time::{Duration, Instant};";
    assert!(FORBIDDEN.iter().any(|word| line.contains(word)));
    let line = "let deadline_ns = now + timeout_ns; // a common instant";
    assert!(!FORBIDDEN.iter().any(|word| line.contains(word)));
}
