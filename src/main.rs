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
    /// The operator console: status, charts and actions of a running appliance over its control
    /// socket; made for ssh sessions (keyboard only, `?` for help, `q` quits).
    Tui(TuiArgs),
}

#[derive(Debug, clap::Args)]
struct TuiArgs {
    /// The appliance's control socket.
    #[arg(long, env = "FERRY_SOCKET", default_value = "/run/ferry/ferry.sock")]
    socket: std::path::PathBuf,
    /// Hide every action: a console that can only look.
    #[arg(long)]
    readonly: bool,
    /// Colours: auto (honours NO_COLOR), 16, 256, true or never.
    #[arg(long, default_value = "auto")]
    color: ferry_tui::ColorChoice,
    /// Plain ASCII glyphs and borders, whatever the locale says.
    #[arg(long)]
    ascii: bool,
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
        Command::Tui(args) => tui(args)?,
    }
    Ok(())
}

fn print_identity(state_dir: &std::path::Path) -> anyhow::Result<()> {
    let identity =
        ferry_appliance::io::transport::Identity::load_or_create(&state_dir.join("keys"))?;
    println!("{}", identity.fingerprint);
    Ok(())
}

fn tui(args: TuiArgs) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() {
        anyhow::bail!("ferry tui needs a terminal (ssh -t for a remote one)");
    }
    let endpoint = args.socket.display().to_string();
    let appliance =
        ferry_tui::SocketAppliance::new(&args.socket, std::time::Duration::from_secs(5));
    let options = ferry_tui::RunOptions {
        readonly: args.readonly,
        color: args.color,
        ascii: args.ascii,
        refresh: std::time::Duration::from_secs(1),
        endpoint,
    };
    match ferry_tui::run(appliance, options)? {
        ferry_tui::Exit::InputClosed(reason) => eprintln!("ferry tui: {reason}"),
        ferry_tui::Exit::Quit | ferry_tui::Exit::Signal(_) => {}
    }
    Ok(())
}
