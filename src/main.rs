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
    /// Create this appliance's key pair if there is none yet and print its fingerprint
    /// (`sha256:…`), the form a peer's config takes. Needs no running appliance.
    Identity {
        /// State directory of the appliance; the key pair lives in its `keys/` folder.
        #[arg(long)]
        state_dir: std::path::PathBuf,
    },
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
        Command::Identity { state_dir } => print_identity(&state_dir)?,
    }
    Ok(())
}

fn print_identity(state_dir: &std::path::Path) -> anyhow::Result<()> {
    let identity =
        ferry_appliance::io::transport::Identity::load_or_create(&state_dir.join("keys"))?;
    println!("{}", identity.fingerprint);
    Ok(())
}
