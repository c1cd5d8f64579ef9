//! The `ferry` binary: one executable for the source appliance, the target appliance, the CLI
//! and the operator console. Subcommands parse their arguments here and call into the
//! `ferry-appliance` and `ferry-tui` libraries; `anyhow` is used only at this edge.
//!
//! Exit codes: 0 success, 1 failure, 2 usage error (clap's).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use ferry_appliance::config::Config;
use ferry_appliance::control::{DiskSelector, Request, Response};
use ferry_appliance::daemon::{self, Client};

mod bench;
mod demo;

/// Where `ferry status` and friends look for the control socket when told nothing else.
const CONTROL_SOCKET_DEFAULT: &str = "/run/ferry/ferry.sock";

/// Ferry: disaster-recovery replication for Linux machines' disks.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the appliance in the foreground (logs on stderr; stops cleanly on SIGTERM/SIGINT).
    Run(RunArgs),
    /// Show the status of a running appliance, per disk (and per replica on a target).
    Status(StatusArgs),
    /// Pause replication of disks (writes keep being journaled).
    Pause(SelectArgs),
    /// Resume replication of paused disks.
    Resume(SelectArgs),
    /// Change the link bandwidth limit of a running source appliance.
    Bandwidth(BandwidthArgs),
    /// Drain replication, then compare source disks and replicas by extent hashes: exit 0 when
    /// identical, 1 with the differing extents (which are sent again).
    Verify(VerifyArgs),
    /// Recovery points of a consistency group: cut one now, or list the retained ones.
    #[command(subcommand)]
    RecoveryPoint(RecoveryPointCommand),
    /// On the target: bring a consistency group up at a recovery point — each disk served at
    /// once as an NBD export (writes go to an overlay, never to the replica), optionally written
    /// to DIR/<machine>/<disk>.raw, and a definition (JSON + libvirt XML) per machine.
    /// `ferry failover cleanup --group G` removes a test failover.
    Failover(FailoverArgs),
    /// On the target, after a failover: replicate the failed-over disks back to the original
    /// source (it pulls only the extents that differ, then what the machines write).
    Reprotect(GroupArgs),
    /// On the target, after a reprotect: planned failover back to the original source (the
    /// failover exports turn read-only, a last round, the source resumes production and
    /// resyncs its replica, the failover is cleaned up).
    Failback(GroupArgs),
    /// Print the version and the on-disk/on-wire format versions.
    Version,
    /// Create this appliance's key pair if there is none yet and print its fingerprint
    /// (`sha256:…`), the form a peer's config takes. Needs no running appliance.
    Identity {
        /// The appliance's config file; its `appliance.state_dir` holds the key pair.
        #[arg(
            long,
            required_unless_present = "state_dir",
            conflicts_with = "state_dir"
        )]
        config: Option<std::path::PathBuf>,
        /// State directory of the appliance (instead of --config); keys live in `keys/`.
        #[arg(long)]
        state_dir: Option<std::path::PathBuf>,
    },
    /// The operator console: status, charts and actions of a running appliance over its control
    /// socket; made for ssh sessions (keyboard only, `?` for help, `q` quits).
    Tui(TuiArgs),
    /// A source and a target appliance on loopback in this process, sample disks with a write
    /// workload through their NBD exports, and the console on the source (`q` ends the demo).
    Demo(DemoArgs),
    /// Measure this machine's Ferry beside the physical limit and peer tools (issue 7): source
    /// and target appliances on loopback, qemu-img, fio, nbdkit, rsync; writes
    /// benches/RESULTS.md and benches/results.svg.
    Bench(bench::BenchArgs),
}

#[derive(Debug, clap::Args)]
struct DemoArgs {
    /// Where to put configs, state, disks and replicas (must be empty or missing) [default: a
    /// fresh /tmp/ferry-demo-<pid>, removed at the end].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// No console: run the workload, then print a summary (bytes, RPO, verify).
    #[arg(long)]
    headless: bool,
    /// How long the workload runs ("30s", "2m") [default: 30s headless, until `q` otherwise].
    #[arg(long)]
    duration: Option<String>,
    /// Size of the largest sample disks ("64MiB", "1GiB"); sparse, ~10% written at start.
    #[arg(long, default_value = "64MiB")]
    disk_size: String,
    /// Console colours: auto (honours NO_COLOR), 16, 256, true or never.
    #[arg(long, default_value = "auto")]
    color: ferry_tui::ColorChoice,
    /// Plain ASCII glyphs and borders in the console.
    #[arg(long)]
    ascii: bool,
}

#[derive(Debug, clap::Args)]
struct TuiArgs {
    #[command(flatten)]
    connect: ConnectArgs,
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

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The appliance's TOML config.
    #[arg(long, env = "FERRY_CONFIG")]
    config: PathBuf,
    /// Log line format on stderr (filter with RUST_LOG, default info).
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

/// How to reach a running appliance.
#[derive(Debug, Args)]
struct ConnectArgs {
    /// Read the control socket path from this config.
    #[arg(long, conflicts_with = "socket")]
    config: Option<PathBuf>,
    /// The control socket [default: /run/ferry/ferry.sock].
    #[arg(long, env = "FERRY_SOCKET")]
    socket: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct StatusArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Print the snapshot as JSON (a top-level `disks` array, `replicas` on a target).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct SelectArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// One disk, as MACHINE/DISK.
    #[arg(long, conflicts_with = "group")]
    disk: Option<String>,
    /// Every disk of a consistency group.
    #[arg(long)]
    group: Option<String>,
    /// Every disk of the appliance.
    #[arg(long, conflicts_with_all = ["disk", "group"], required_unless_present_any = ["disk", "group"])]
    all: bool,
}

#[derive(Debug, Args)]
struct VerifyArgs {
    #[command(flatten)]
    select: SelectArgs,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Give up after this long ("10m", "90s").
    #[arg(long, default_value = "30m")]
    timeout: String,
}

#[derive(Debug, Subcommand)]
enum RecoveryPointCommand {
    /// Cut a recovery point of a group now (on the source appliance that coordinates it) and
    /// print its id.
    Create(CreatePointArgs),
    /// List a group's recovery points: on a target its catalog, on a source the points it cut.
    List(ListPointsArgs),
}

#[derive(Debug, Args)]
struct CreatePointArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// The consistency group.
    #[arg(long)]
    group: String,
    /// Run the group's freeze hook before the cut and its thaw hook after.
    #[arg(long)]
    app_consistent: bool,
}

#[derive(Debug, Args)]
struct ListPointsArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// The consistency group.
    #[arg(long)]
    group: String,
    /// Print the points as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct FailoverArgs {
    #[command(subcommand)]
    cleanup: Option<FailoverSubcommand>,
    #[command(flatten)]
    connect: ConnectArgs,
    /// The consistency group.
    #[arg(long, required = true)]
    group: Option<String>,
    /// The recovery point: its id, `latest` (the newest usable point), or a time — RFC 3339
    /// (`2026-11-27T03:00:00Z`) or `<duration> ago` (`10m ago`) — for the newest usable point
    /// at or before it.
    #[arg(long, default_value = "latest", conflicts_with = "planned")]
    point: String,
    /// A test failover: replication keeps running, the machines go into the test network.
    #[arg(long)]
    test: bool,
    /// A planned failover: the source's exports turn read-only, its journal drains, a final
    /// point is cut and used (no data loss; the source must be connected).
    #[arg(long, conflicts_with = "test")]
    planned: bool,
    /// Also write each disk's image at the point to DIR/<machine>/<disk>.raw (needs --out).
    #[arg(long, requires = "out")]
    materialize: bool,
    /// Where --materialize writes images and definitions.
    #[arg(long, requires = "materialize")]
    out: Option<PathBuf>,
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum FailoverSubcommand {
    /// Remove a test failover of a group (exports stopped, overlays deleted).
    Cleanup(GroupArgs),
}

#[derive(Debug, Args)]
struct GroupArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// The consistency group.
    #[arg(long)]
    group: String,
}

#[derive(Debug, Args)]
struct BandwidthArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Bytes per second ("100MiB", "1GB", plain bytes; "/s" optional), or "off".
    limit: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Status(args) => status(args),
        Command::Pause(args) => select_command(args, true),
        Command::Resume(args) => select_command(args, false),
        Command::Bandwidth(args) => bandwidth(args),
        Command::Verify(args) => verify(args),
        Command::RecoveryPoint(RecoveryPointCommand::Create(args)) => create_point(args),
        Command::RecoveryPoint(RecoveryPointCommand::List(args)) => list_points(args),
        Command::Failover(args) => failover(args),
        Command::Reprotect(args) => group_command(args, true),
        Command::Failback(args) => group_command(args, false),
        Command::Version => version(),
        Command::Identity { config, state_dir } => print_identity(config, state_dir),
        Command::Tui(args) => tui(args),
        Command::Demo(args) => run_demo(args),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // A reader that went away (`ferry status | head`) is not a failure.
            let broken_pipe = error
                .downcast_ref::<std::io::Error>()
                .is_some_and(|error| error.kind() == std::io::ErrorKind::BrokenPipe);
            if broken_pipe {
                return ExitCode::SUCCESS;
            }
            eprintln!("ferry: error: {}", error_chain(&error));
            ExitCode::from(1)
        }
    }
}

/// The error and its causes, skipping a cause whose text the message already contains (many
/// error types print their source inline).
fn error_chain(error: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if message.contains(&text) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&text);
    }
    message
}

/// Prints to stdout, reporting a closed pipe as an error instead of panicking like `print!`.
fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let config = Config::load(&args.config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ferry")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(daemon::run_until_signal(config))?;
    Ok(())
}

fn control_socket(connect: &ConnectArgs) -> anyhow::Result<PathBuf> {
    if let Some(socket) = &connect.socket {
        return Ok(socket.clone());
    }
    if let Some(path) = &connect.config {
        return Ok(Config::load(path)?.control_socket().to_path_buf());
    }
    Ok(PathBuf::from(CONTROL_SOCKET_DEFAULT))
}

fn connect(connect: &ConnectArgs) -> anyhow::Result<Client> {
    let socket = control_socket(connect)?;
    Ok(Client::connect(Path::new(&socket))?)
}

fn status(args: StatusArgs) -> anyhow::Result<()> {
    let snapshot = connect(&args.connect)?.status()?;
    if args.json {
        emit(&format!("{}\n", serde_json::to_string_pretty(&snapshot)?))
    } else {
        emit(&daemon::table::format_status(&snapshot))
    }
}

fn select_command(args: SelectArgs, pause: bool) -> anyhow::Result<()> {
    let selector = DiskSelector {
        disk: args.disk,
        group: args.group,
    };
    let request = if pause {
        Request::Pause { selector }
    } else {
        Request::Resume { selector }
    };
    emit(&format!("{}\n", connect(&args.connect)?.command(&request)?))
}

fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    let timeout =
        ferry_appliance::config::parse_duration(&args.timeout).map_err(anyhow::Error::msg)?;
    let socket = control_socket(&args.select.connect)?;
    let mut client = Client::connect_with_timeout(&socket, timeout)?;
    let request = Request::Verify {
        selector: DiskSelector {
            disk: args.select.disk,
            group: args.select.group,
        },
    };
    let disks = match client.request(&request)? {
        Response::Verify { disks } => disks,
        Response::Error { message } => anyhow::bail!("verify refused: {message}"),
        other => anyhow::bail!("unexpected answer to verify: {other:?}"),
    };
    if args.json {
        emit(&format!(
            "{}\n",
            serde_json::to_string_pretty(&serde_json::json!({ "disks": disks }))?
        ))?;
    } else {
        let mut text = String::new();
        for disk in &disks {
            text.push_str(&format!(
                "{}/{}: {} ({} extents, {} bytes compared, {} differing)\n",
                disk.machine,
                disk.name,
                if disk.identical {
                    "identical"
                } else {
                    "DIFFERS"
                },
                disk.extents_compared,
                disk.bytes_compared,
                disk.extents_differing
            ));
        }
        emit(&text)?;
    }
    let differing: u64 = disks.iter().map(|disk| disk.extents_differing).sum();
    if differing > 0 {
        anyhow::bail!(
            "{differing} extents differed between source and replica (they were sent again)"
        );
    }
    Ok(())
}

fn bandwidth(args: BandwidthArgs) -> anyhow::Result<()> {
    let bytes_per_s = match args.limit.trim() {
        "off" | "none" | "unlimited" => None,
        text => {
            let text = text.strip_suffix("/s").unwrap_or(text);
            Some(ferry_appliance::config::parse_size(text).map_err(anyhow::Error::msg)?)
        }
    };
    emit(&format!(
        "{}\n",
        connect(&args.connect)?.command(&Request::SetBandwidth { bytes_per_s })?
    ))
}

/// How long a failback may take: the source's last reprotect round and its hand-over.
const FAILBACK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// `ferry reprotect` / `ferry failback`: one group command answered with a message.
fn group_command(args: GroupArgs, reprotect: bool) -> anyhow::Result<()> {
    let socket = control_socket(&args.connect)?;
    let mut client = Client::connect_with_timeout(&socket, FAILBACK_TIMEOUT)?;
    let (request, what) = if reprotect {
        (
            Request::Reprotect {
                group: args.group.clone(),
            },
            "reprotect",
        )
    } else {
        (
            Request::Failback {
                group: args.group.clone(),
            },
            "failback",
        )
    };
    match client.request(&request)? {
        Response::Ok { message } => emit(&format!("{message}\n")),
        Response::Error { message } => anyhow::bail!("{what} of group {:?}: {message}", args.group),
        other => anyhow::bail!("unexpected answer to {what}: {other:?}"),
    }
}

/// How long a failover may take: a planned failover's drain and final point, and
/// materialising whole disks.
const FAILOVER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

/// `--point`: an id, `latest`, an RFC 3339 time or `<duration> ago`, as (id, at_unix_ms).
fn parse_point(
    text: &str,
    now: std::time::SystemTime,
) -> anyhow::Result<(Option<u64>, Option<u64>)> {
    let text = text.trim();
    if text == "latest" {
        return Ok((None, None));
    }
    if let Ok(id) = text.parse::<u64>() {
        return Ok((Some(id), None));
    }
    let unix_ms = |time: std::time::SystemTime| {
        time.duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_millis() as u64)
            .map_err(|_| anyhow::anyhow!("--point {text:?} is before 1970"))
    };
    if let Some(ago) = text.strip_suffix("ago") {
        let duration = humantime::parse_duration(ago.trim()).map_err(|error| {
            anyhow::anyhow!("--point {text:?}: {error} (give e.g. \"10m ago\")")
        })?;
        let at = now
            .checked_sub(duration)
            .ok_or_else(|| anyhow::anyhow!("--point {text:?} is too far back"))?;
        return Ok((None, Some(unix_ms(at)?)));
    }
    match humantime::parse_rfc3339_weak(text) {
        Ok(time) => Ok((None, Some(unix_ms(time)?))),
        Err(_) => anyhow::bail!(
            "--point {text:?} is not a point id, `latest`, an RFC 3339 time (2026-11-27T03:00:00Z) or `<duration> ago`"
        ),
    }
}

fn failover(args: FailoverArgs) -> anyhow::Result<()> {
    if let Some(FailoverSubcommand::Cleanup(args)) = args.cleanup {
        let request = Request::FailoverCleanup {
            group: args.group.clone(),
        };
        return match connect(&args.connect)?.request(&request)? {
            Response::Ok { message } => emit(&format!("{message}\n")),
            Response::Error { message } => {
                anyhow::bail!("failover cleanup of group {:?}: {message}", args.group)
            }
            other => anyhow::bail!("unexpected answer to failover cleanup: {other:?}"),
        };
    }
    let group = args
        .group
        .ok_or_else(|| anyhow::anyhow!("--group is required"))?;
    let (point, at_unix_ms) = if args.planned {
        (None, None)
    } else {
        parse_point(&args.point, std::time::SystemTime::now())?
    };
    let materialize_dir = match args.out {
        Some(out) => {
            let out =
                std::path::absolute(&out).with_context(|| format!("--out {}", out.display()))?;
            Some(out.display().to_string())
        }
        None => None,
    };
    let request = Request::Failover {
        group: group.clone(),
        point,
        test: args.test,
        at_unix_ms,
        planned: args.planned,
        materialize_dir,
    };
    let socket = control_socket(&args.connect)?;
    let mut client = Client::connect_with_timeout(&socket, FAILOVER_TIMEOUT)?;
    let response = client.request(&request)?;
    let (point, test, exports, definitions) = match &response {
        Response::Failover {
            point,
            test,
            exports,
            definitions,
            ..
        } => (point, *test, exports, definitions),
        Response::Error { message } => anyhow::bail!("failover of group {group:?}: {message}"),
        other => anyhow::bail!("unexpected answer to failover: {other:?}"),
    };
    if args.json {
        return emit(&format!("{}\n", serde_json::to_string_pretty(&response)?));
    }
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(point.time_unix_ms);
    let mut text = format!(
        "{} of group {group} up at recovery point {} ({}, {})\n",
        if test { "test failover" } else { "failover" },
        point.id,
        humantime::format_rfc3339_millis(time),
        point.consistency.as_str(),
    );
    for export in exports {
        text.push_str(&format!(
            "  export  {:<24} {}\n",
            export.export_name, export.uri
        ));
        if let Some(image) = &export.rbd_image {
            text.push_str(&format!("  rbd     {:<24} {image}\n", export.export_name));
        }
        if let Some(path) = &export.materialized_path {
            text.push_str(&format!("  image   {:<24} {path}\n", export.export_name));
        }
    }
    for definition in definitions {
        text.push_str(&format!("  machine {definition}\n"));
    }
    if test {
        text.push_str(&format!(
            "replication continues; remove the test copies with: ferry failover cleanup --group {group}\n"
        ));
    }
    emit(&text)
}

/// How long a cut may take: the freeze and thaw hooks (30 s each at most) and the barrier.
const CREATE_POINT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(90);

fn create_point(args: CreatePointArgs) -> anyhow::Result<()> {
    let socket = control_socket(&args.connect)?;
    let mut client = Client::connect_with_timeout(&socket, CREATE_POINT_TIMEOUT)?;
    let request = Request::CreateRecoveryPoint {
        group: args.group.clone(),
        app_consistent: args.app_consistent,
    };
    match client.request(&request)? {
        Response::PointCreated { point, .. } => emit(&format!("{}\n", point.id)),
        Response::Error { message } => {
            anyhow::bail!(
                "recovery point of group {:?} not created: {message}",
                args.group
            )
        }
        other => anyhow::bail!("unexpected answer to recovery-point create: {other:?}"),
    }
}

fn list_points(args: ListPointsArgs) -> anyhow::Result<()> {
    let request = Request::ListRecoveryPoints {
        group: args.group.clone(),
    };
    let (group, points) = match connect(&args.connect)?.request(&request)? {
        Response::RecoveryPoints { group, points } => (group, points),
        Response::Error { message } => {
            anyhow::bail!("recovery points of group {:?}: {message}", args.group)
        }
        other => anyhow::bail!("unexpected answer to recovery-point list: {other:?}"),
    };
    if args.json {
        return emit(&format!(
            "{}\n",
            serde_json::to_string_pretty(&serde_json::json!({ "group": group, "points": points }))?
        ));
    }
    let mut text = format!(
        "{:<15} {:<24} {:<6} {}\n",
        "ID", "TIME (UTC)", "KIND", "USABLE"
    );
    for point in &points {
        let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(point.time_unix_ms);
        let usable = match (&point.usable, &point.unusable_reason) {
            (true, _) => "yes".to_string(),
            (false, Some(reason)) => format!("no ({reason})"),
            (false, None) => "no".to_string(),
        };
        text.push_str(&format!(
            "{:<15} {:<24} {:<6} {}\n",
            point.id,
            humantime::format_rfc3339_millis(time).to_string(),
            point.consistency.as_str(),
            usable
        ));
    }
    if points.is_empty() {
        text.push_str(&format!("(no recovery points of group {group})\n"));
    }
    emit(&text)
}

fn version() -> anyhow::Result<()> {
    emit(&format!(
        "ferry {} (journal record format {})\n",
        env!("CARGO_PKG_VERSION"),
        ferry_appliance::core::record::RECORD_VERSION
    ))
}

fn print_identity(
    config: Option<std::path::PathBuf>,
    state_dir: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let state_dir = match (config, state_dir) {
        (_, Some(state_dir)) => state_dir,
        (Some(config), None) => ferry_appliance::config::Config::load(&config)?
            .appliance
            .state_dir
            .clone(),
        (None, None) => anyhow::bail!("ferry identity needs --config FILE or --state-dir DIR"),
    };
    let keys_dir = ferry_appliance::daemon::layout::StateLayout::new(&state_dir).keys;
    let identity = ferry_appliance::io::transport::Identity::load_or_create(&keys_dir)?;
    emit(&format!("{}\n", identity.fingerprint))
}

fn tui(args: TuiArgs) -> anyhow::Result<()> {
    if !std::io::stdout().is_terminal() {
        anyhow::bail!("ferry tui needs a terminal (ssh -t for a remote one)");
    }
    let socket = control_socket(&args.connect)?;
    let endpoint = socket.display().to_string();
    let appliance = ferry_tui::SocketAppliance::new(&socket, std::time::Duration::from_secs(5));
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

fn run_demo(args: DemoArgs) -> anyhow::Result<()> {
    let duration = args
        .duration
        .as_deref()
        .map(ferry_appliance::config::parse_duration)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let console = (!args.headless).then(|| ferry_tui::RunOptions {
        readonly: false,
        color: args.color,
        ascii: args.ascii,
        refresh: std::time::Duration::from_secs(1),
        endpoint: String::new(),
    });
    let disk_size_bytes =
        ferry_appliance::config::parse_size(&args.disk_size).map_err(anyhow::Error::msg)?;
    if disk_size_bytes < 16 << 20 {
        anyhow::bail!("--disk-size must be at least 16MiB");
    }
    demo::run(demo::DemoOptions {
        dir: args.dir,
        disk_size_bytes,
        headless: args.headless,
        duration,
        console,
    })
}
