//! `ferry bench`: measures this machine's Ferry against the physical limit and peer tools, each
//! scenario beside its baseline in the same run (issue 7). The replication scenarios drive the
//! real product: this same binary is started as a source and a target appliance on loopback with
//! generated configs and keys, and `ferry status --json` / `ferry verify` say when replication is
//! done. Results: a table and machine facts in benches/RESULTS.md (the generated section), a plot
//! in benches/results.svg, or JSON on stdout with `--json`.

mod churn;
mod failover;
mod figure;
mod initial;
mod journal;
mod machine;
mod pair;
mod progress;
mod rbd;
mod relay;
mod report;
mod resync;
mod tools;
mod transport;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;

pub use figure::Figure;
use progress::Progress;

/// Arguments of `ferry bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Scenarios to run, by number or name: 1 initial, 2 sparse, 3 churn, 4 resync,
    /// 5 transport, 6 journal, 7 failover, 8 rbd (starts a one-node Ceph cluster)
    /// [default: all].
    scenarios: Vec<String>,
    /// Small sizes: every scenario in well under 2 minutes together.
    #[arg(long)]
    quick: bool,
    /// Print the results as JSON on stdout (`{"machine": {…}, "scenarios": […]}`).
    #[arg(long)]
    json: bool,
    /// Where disks, replicas and appliance state go [default: a fresh directory under /var/tmp,
    /// removed at the end].
    #[arg(long, env = "FERRY_BENCH_DIR")]
    dir: Option<PathBuf>,
    /// Where RESULTS.md and results.svg are written.
    #[arg(long, default_value = "benches")]
    out: PathBuf,
    /// Write neither RESULTS.md nor the plot.
    #[arg(long)]
    no_write: bool,
}

/// One scenario of issue 7.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scenario {
    Initial,
    Sparse,
    Churn,
    Resync,
    Transport,
    Journal,
    Failover,
    Rbd,
}

impl Scenario {
    const ALL: [Scenario; 8] = [
        Scenario::Initial,
        Scenario::Sparse,
        Scenario::Churn,
        Scenario::Resync,
        Scenario::Transport,
        Scenario::Journal,
        Scenario::Failover,
        Scenario::Rbd,
    ];

    fn number(self) -> usize {
        Scenario::ALL
            .iter()
            .position(|scenario| *scenario == self)
            .expect("listed")
            + 1
    }

    fn name(self) -> &'static str {
        match self {
            Scenario::Initial => "initial",
            Scenario::Sparse => "sparse",
            Scenario::Churn => "churn",
            Scenario::Resync => "resync",
            Scenario::Transport => "transport",
            Scenario::Journal => "journal",
            Scenario::Failover => "failover",
            Scenario::Rbd => "rbd",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Scenario::Initial => "initial replication, random data",
            Scenario::Sparse => "initial replication, all-zero sparse disk",
            Scenario::Churn => "steady churn through the source export",
            Scenario::Resync => "delta resync after 1% of 4 KiB blocks changed",
            Scenario::Transport => "transport bulk throughput",
            Scenario::Journal => "journal append",
            Scenario::Failover => "failover to a readable export",
            Scenario::Rbd => "target storage on Ceph RBD",
        }
    }

    fn parse(text: &str) -> anyhow::Result<Scenario> {
        Scenario::ALL
            .into_iter()
            .find(|scenario| scenario.name() == text || scenario.number().to_string() == text)
            .with_context(|| {
                format!(
                    "unknown scenario {text:?}: expected 1-8 or one of {}",
                    Scenario::ALL.map(Scenario::name).join(", ")
                )
            })
    }
}

/// How large a run is: `--quick`, the default, or the CI smoke size (`FERRY_BENCH_TINY=1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    Tiny,
    Quick,
    Full,
}

impl Size {
    /// Picks `tiny`, `quick` or `full` for this run.
    pub fn pick<T>(self, tiny: T, quick: T, full: T) -> T {
        match self {
            Size::Tiny => tiny,
            Size::Quick => quick,
            Size::Full => full,
        }
    }
}

/// What every scenario gets: where to put files, how large to be, the binary to start as an
/// appliance, the peer tools found, and the progress display.
pub struct Env {
    pub dir: PathBuf,
    pub size: Size,
    pub exe: PathBuf,
    pub tools: tools::Tools,
    pub progress: Progress,
}

impl Env {
    /// A fresh subdirectory of the work directory for one scenario.
    pub fn scenario_dir(&self, scenario: Scenario) -> anyhow::Result<PathBuf> {
        let dir = self.dir.join(scenario.name());
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot clear {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(dir)
    }

    /// A line for the operator (above the progress bar on a terminal, else on stderr).
    pub fn log(&self, line: &str) {
        self.progress.log(line);
    }
}

/// Runs `ferry bench`.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let mut scenarios = Vec::new();
    for text in &args.scenarios {
        let scenario = Scenario::parse(text)?;
        if !scenarios.contains(&scenario) {
            scenarios.push(scenario);
        }
    }
    if scenarios.is_empty() {
        scenarios = Scenario::ALL.to_vec();
    }
    scenarios.sort();
    let size = if std::env::var("FERRY_BENCH_TINY").is_ok_and(|value| value == "1") {
        Size::Tiny
    } else if args.quick {
        Size::Quick
    } else {
        Size::Full
    };

    let exe = std::env::current_exe().context("cannot find this binary (current_exe)")?;
    stop_appliances_on_signal()?;
    let (dir, _cleanup) = work_dir(args.dir.as_deref())?;
    let progress = Progress::new(
        std::io::stderr().is_terminal(),
        scenarios.iter().map(|scenario| steps(*scenario)).sum(),
    );
    let tools = tools::Tools::find();
    for missing in tools.missing() {
        progress.log(&format!(
            "ferry bench: {missing} is not installed: its baselines are skipped"
        ));
    }
    let env = Env {
        dir,
        size,
        exe,
        tools,
        progress,
    };
    let machine_start = machine::Machine::probe(&env.dir);
    let started = Instant::now();
    let mut figures = Vec::new();
    for scenario in &scenarios {
        env.progress.scenario(scenario.number(), scenario.title());
        let scenario_started = Instant::now();
        let result = match scenario {
            Scenario::Initial => initial::random(&env),
            Scenario::Sparse => initial::sparse(&env),
            Scenario::Churn => churn::run(&env),
            Scenario::Resync => resync::run(&env),
            Scenario::Transport => transport::run(&env),
            Scenario::Journal => journal::run(&env),
            Scenario::Failover => failover::run(&env),
            Scenario::Rbd => rbd::run(&env),
        };
        match result {
            Ok(mut found) => {
                for figure in &mut found {
                    figure.scenario = scenario.number();
                }
                figures.extend(found);
            }
            Err(error) => {
                let message = format!("{:#}", error);
                env.log(&format!(
                    "ferry bench: scenario {} ({}) failed: {message}",
                    scenario.number(),
                    scenario.name()
                ));
                let mut figure = Figure::failed(scenario.title(), &message);
                figure.scenario = scenario.number();
                figures.push(figure);
            }
        }
        // Scenario files can be large (a 4 GiB disk, its replica, a copy): free them now.
        let _ = std::fs::remove_dir_all(env.dir.join(scenario.name()));
        env.log(&format!(
            "ferry bench: scenario {} took {:.1} s",
            scenario.number(),
            scenario_started.elapsed().as_secs_f64()
        ));
    }
    env.progress.finish();
    let mut machine = machine_start;
    machine.finish(started.elapsed());

    let report = report::Report {
        machine,
        figures,
        size,
    };
    if !args.no_write {
        report.write(&args.out)?;
        env.log(&format!(
            "ferry bench: wrote {} and {}",
            args.out.join("RESULTS.md").display(),
            args.out.join("results.svg").display()
        ));
    }
    if args.json {
        crate::emit(&format!(
            "{}\n",
            serde_json::to_string_pretty(&report.json())?
        ))?;
    } else {
        crate::emit(&report.table())?;
    }
    Ok(())
}

/// On SIGINT or SIGTERM: stop the appliances the bench started (they would outlive it
/// otherwise), then exit 130.
fn stop_appliances_on_signal() -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("cannot watch SIGINT/SIGTERM")?;
    std::thread::Builder::new()
        .name("bench-signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                eprintln!("ferry bench: signal {signal}: stopping the appliances it started");
                pair::stop_all_running();
                std::process::exit(130);
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

/// Progress steps of a scenario (for the bar's length).
fn steps(scenario: Scenario) -> u64 {
    match scenario {
        Scenario::Initial => initial::RANDOM_STEPS,
        Scenario::Sparse => initial::SPARSE_STEPS,
        Scenario::Churn => churn::STEPS,
        Scenario::Resync => resync::STEPS,
        Scenario::Transport => transport::STEPS,
        Scenario::Journal => journal::STEPS,
        Scenario::Failover => failover::STEPS,
        Scenario::Rbd => rbd::STEPS,
    }
}

/// Removes the work directory when dropped, if the bench created it.
struct Cleanup(Option<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn work_dir(given: Option<&Path>) -> anyhow::Result<(PathBuf, Cleanup)> {
    if let Some(dir) = given {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        return Ok((dir.to_path_buf(), Cleanup(None)));
    }
    // /var/tmp: on disk (not a tmpfs), so disk figures are the disk's.
    let dir = std::env::temp_dir();
    let base = if Path::new("/var/tmp").is_dir() {
        PathBuf::from("/var/tmp")
    } else {
        dir
    };
    let dir = base.join(format!("ferry-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok((dir.clone(), Cleanup(Some(dir))))
}
