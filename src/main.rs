//! The `ferry` binary: one executable for the source appliance, the target appliance, the CLI
//! and the operator console. Subcommands parse their arguments here and call into the
//! `ferry-appliance` and `ferry-tui` libraries; `anyhow` is used only at this edge.

use clap::{Parser, Subcommand};

/// Ferry: disaster-recovery replication for Linux machines' disks.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the version and the on-disk/on-wire format versions.
    Version,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!(
                "ferry {} (journal record format {})",
                env!("CARGO_PKG_VERSION"),
                ferry_appliance::core::record::RECORD_VERSION
            );
        }
    }
    Ok(())
}
