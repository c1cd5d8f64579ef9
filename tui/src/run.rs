//! The runner: owns the terminal and the threads, turns terminal events, status fetches,
//! action answers and signals into `Msg`s, calls `update`, carries out its commands, and draws
//! with `view` when something changed (at most `FRAME_INTERVAL` apart).
//!
//! Over ssh two failure modes matter (CONSOLE.md): a dropped link must not leave a process
//! spinning (crossterm issue 793: EOF/EIO on the terminal can make `poll` return at once,
//! forever), and the terminal must be given back on exit, on panic (`ratatui::try_init` installs
//! the hook) and on Ctrl-Z.

use std::io::{self, Write};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

use ferry_appliance::control::Request;
use ratatui::crossterm::event::{self, DisableBracketedPaste, EnableBracketedPaste, Event};
use ratatui::crossterm::terminal::{
    enable_raw_mode, BeginSynchronizedUpdate, EndSynchronizedUpdate, EnterAlternateScreen,
};
use ratatui::crossterm::{execute, queue};
use ratatui::DefaultTerminal;
use signal_hook::consts::{SIGCONT, SIGHUP, SIGINT, SIGTERM, SIGTSTP};
use signal_hook::iterator::Signals;

use crate::appliance::Appliance;
use crate::model::{Model, Options};
use crate::theme::{unicode_from_locale, ColorChoice, Theme};
use crate::update::{update, Command, Msg};
use crate::view::view;

/// The shortest time between two frames: a few frames per second is plenty for status and keeps
/// an ssh session's bandwidth low.
pub const FRAME_INTERVAL: Duration = Duration::from_millis(100);
/// Terminal reads per second above which the input is taken for a dead terminal (a person
/// types and pastes far below this; a spinning poll on a hung-up tty far above).
const INPUT_WAKEUPS_PER_S_MAX: u32 = 2_000;
/// How long the input thread waits per poll, so it notices the console quitting.
const INPUT_POLL: Duration = Duration::from_millis(200);

/// How the console is started.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub readonly: bool,
    pub color: ColorChoice,
    /// Force ASCII glyphs even in a UTF-8 locale.
    pub ascii: bool,
    /// Time between status fetches.
    pub refresh: Duration,
    /// Shown while connecting ("/run/ferry/control.sock").
    pub endpoint: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TuiError {
    #[error("terminal: {0}")]
    Terminal(#[source] io::Error),
    #[error("installing signal handlers: {0}")]
    Signals(#[source] io::Error),
    #[error("starting the {name} thread: {source}")]
    Thread {
        name: &'static str,
        source: io::Error,
    },
}

/// Why the console ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    Quit,
    /// SIGHUP/SIGTERM/SIGINT: the session went away or someone asked us to stop.
    Signal(i32),
    /// The terminal stopped delivering input (EOF, EIO, or a spinning poll).
    InputClosed(String),
}

enum RunnerEvent {
    Msg(Msg),
    InputClosed(String),
    Signal(i32),
}

/// Runs the console until the operator quits or the session ends. The terminal is restored
/// before this returns, whatever the reason.
pub fn run<A: Appliance + Clone>(appliance: A, options: RunOptions) -> Result<Exit, TuiError> {
    let env = |name: &str| std::env::var(name).ok();
    let theme = Theme::new(
        options.color.resolve(&env),
        !options.ascii && unicode_from_locale(&env),
    );
    let (events_tx, events_rx) = mpsc::channel::<RunnerEvent>();
    // Dropping `stop_tx` (when this function returns) ends the poller at its next wait.
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let (actions_tx, actions_rx) = mpsc::channel::<(u64, Request)>();

    spawn("status poller", {
        let mut appliance = appliance.clone();
        let events = events_tx.clone();
        let refresh = options.refresh;
        move || poll_status(&mut appliance, &events, &stop_rx, refresh)
    })?;
    spawn("action sender", {
        let mut appliance = appliance;
        let events = events_tx.clone();
        move || send_actions(&mut appliance, &actions_rx, &events)
    })?;
    let mut signals =
        Signals::new([SIGHUP, SIGTERM, SIGINT, SIGTSTP, SIGCONT]).map_err(TuiError::Signals)?;
    let signals_handle = signals.handle();
    spawn("signals", {
        let events = events_tx.clone();
        move || {
            for signal in signals.forever() {
                if events.send(RunnerEvent::Signal(signal)).is_err() {
                    break;
                }
            }
        }
    })?;

    let mut terminal = ratatui::try_init().map_err(TuiError::Terminal)?;
    let result = (|| {
        execute!(io::stdout(), EnableBracketedPaste).map_err(TuiError::Terminal)?;
        let input_stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        spawn("input", {
            let events = events_tx.clone();
            let stop = input_stop.clone();
            move || read_input(&events, &stop)
        })?;
        let size = terminal.size().map_err(TuiError::Terminal)?;
        let endpoint = options.endpoint.clone();
        let model = Model::new(
            Options {
                readonly: options.readonly,
                theme,
                endpoint,
            },
            size.width,
            size.height,
        );
        let exit = main_loop(&mut terminal, model, &events_rx, &actions_tx);
        input_stop.store(true, std::sync::atomic::Ordering::Relaxed);
        exit
    })();
    // Give the terminal back even if the loop failed; errors here have nowhere better to go.
    let _ = execute!(io::stdout(), DisableBracketedPaste);
    ratatui::restore();
    signals_handle.close();
    drop(stop_tx);
    result
}

fn spawn(name: &'static str, body: impl FnOnce() + Send + 'static) -> Result<(), TuiError> {
    thread::Builder::new()
        .name(format!("tui {name}"))
        .spawn(body)
        .map(|_| ())
        .map_err(|source| TuiError::Thread { name, source })
}

fn main_loop(
    terminal: &mut DefaultTerminal,
    mut model: Model,
    events: &Receiver<RunnerEvent>,
    actions: &Sender<(u64, Request)>,
) -> Result<Exit, TuiError> {
    let start = Instant::now();
    let mut dirty = true;
    let mut last_draw: Option<Instant> = None;
    let mut last_second = 0;
    loop {
        let since_draw = last_draw.map_or(FRAME_INTERVAL, |at| at.elapsed());
        if dirty && since_draw >= FRAME_INTERVAL {
            draw(terminal, &model)?;
            dirty = false;
            last_draw = Some(Instant::now());
        }
        let wait = if dirty {
            FRAME_INTERVAL.saturating_sub(since_draw)
        } else {
            Duration::from_secs(1)
        };
        let event = match events.recv_timeout(wait) {
            Ok(event) => Some(event),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return Ok(Exit::Quit),
        };
        // The console clock advances before every message, so toasts expire and the "no update
        // for" counter moves without a separate timer thread.
        let now_ms = start.elapsed().as_millis() as u64;
        let had_toast = model.toast.is_some();
        update(&mut model, Msg::Tick { now_ms });
        if now_ms / 1000 != last_second || had_toast != model.toast.is_some() {
            last_second = now_ms / 1000;
            dirty = true;
        }
        let msg = match event {
            None => continue,
            Some(RunnerEvent::Msg(msg)) => msg,
            Some(RunnerEvent::InputClosed(reason)) => return Ok(Exit::InputClosed(reason)),
            Some(RunnerEvent::Signal(SIGTSTP)) => {
                suspend(terminal)?;
                dirty = true;
                continue;
            }
            Some(RunnerEvent::Signal(SIGCONT)) => {
                reenter(terminal)?;
                dirty = true;
                continue;
            }
            Some(RunnerEvent::Signal(signal)) => return Ok(Exit::Signal(signal)),
        };
        dirty = true;
        for command in update(&mut model, msg) {
            match command {
                Command::Send { id, request } => {
                    if actions.send((id, request)).is_err() {
                        update(
                            &mut model,
                            Msg::ActionResult {
                                id,
                                result: Err("the action sender stopped".into()),
                            },
                        );
                    }
                }
                Command::Quit => return Ok(Exit::Quit),
                Command::Suspend => suspend(terminal)?,
            }
        }
    }
}

fn draw(terminal: &mut DefaultTerminal, model: &Model) -> Result<(), TuiError> {
    // Synchronized output (DEC mode 2026): terminals that know it show the frame at once, the
    // others ignore the sequence.
    queue!(terminal.backend_mut(), BeginSynchronizedUpdate).map_err(TuiError::Terminal)?;
    terminal
        .draw(|frame| view(model, frame))
        .map_err(TuiError::Terminal)?;
    queue!(terminal.backend_mut(), EndSynchronizedUpdate).map_err(TuiError::Terminal)?;
    terminal.backend_mut().flush().map_err(TuiError::Terminal)
}

/// Ctrl-Z or SIGTSTP: give the terminal back, stop like any job, and take it again on SIGCONT.
fn suspend(terminal: &mut DefaultTerminal) -> Result<(), TuiError> {
    let _ = execute!(io::stdout(), DisableBracketedPaste);
    ratatui::try_restore().map_err(TuiError::Terminal)?;
    signal_hook::low_level::emulate_default_handler(SIGTSTP).map_err(TuiError::Signals)?;
    reenter(terminal)
}

/// After SIGCONT the shell may have reset the terminal: raw mode, alternate screen and paste
/// mode again, and a full redraw.
fn reenter(terminal: &mut DefaultTerminal) -> Result<(), TuiError> {
    enable_raw_mode().map_err(TuiError::Terminal)?;
    execute!(io::stdout(), EnterAlternateScreen, EnableBracketedPaste)
        .map_err(TuiError::Terminal)?;
    terminal.clear().map_err(TuiError::Terminal)
}

/// The status poller: one fetch per `refresh`, a failure reported as `Disconnected` and retried
/// at the same pace, until the console drops `stop`.
fn poll_status<A: Appliance>(
    appliance: &mut A,
    events: &Sender<RunnerEvent>,
    stop: &Receiver<()>,
    refresh: Duration,
) {
    loop {
        let msg = match appliance.fetch_status() {
            Ok(snapshot) => Msg::Snapshot(snapshot),
            Err(error) => Msg::Disconnected(error.to_string()),
        };
        if events.send(RunnerEvent::Msg(msg)).is_err() {
            return;
        }
        match stop.recv_timeout(refresh) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Sends actions one at a time, in order, so a slow failover never blocks the status poller.
fn send_actions<A: Appliance>(
    appliance: &mut A,
    actions: &Receiver<(u64, Request)>,
    events: &Sender<RunnerEvent>,
) {
    while let Ok((id, request)) = actions.recv() {
        let result = appliance.send(&request).map_err(|error| error.to_string());
        if events
            .send(RunnerEvent::Msg(Msg::ActionResult { id, result }))
            .is_err()
        {
            return;
        }
    }
}

/// Reads terminal events until the console quits or the terminal goes away. Any read error
/// ends the console (EOF and EIO are how a dropped ssh session looks), and so does a wake-up
/// rate no person produces.
fn read_input(events: &Sender<RunnerEvent>, stop: &std::sync::atomic::AtomicBool) {
    let mut window_start = Instant::now();
    let mut wakeups = 0u32;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        wakeups += 1;
        if window_start.elapsed() >= Duration::from_secs(1) {
            window_start = Instant::now();
            wakeups = 0;
        } else if wakeups > INPUT_WAKEUPS_PER_S_MAX {
            let _ = events.send(RunnerEvent::InputClosed(
                "terminal input is spinning (hung up?)".into(),
            ));
            return;
        }
        let ready = match event::poll(INPUT_POLL) {
            Ok(ready) => ready,
            Err(error) => {
                let _ = events.send(RunnerEvent::InputClosed(format!("terminal input: {error}")));
                return;
            }
        };
        if !ready {
            continue;
        }
        let msg = match event::read() {
            Ok(Event::Key(key)) => Msg::Key(key),
            Ok(Event::Paste(text)) => Msg::Paste(text),
            Ok(Event::Resize(width, height)) => Msg::Resize { width, height },
            Ok(_) => continue,
            Err(error) => {
                let _ = events.send(RunnerEvent::InputClosed(format!("terminal input: {error}")));
                return;
            }
        };
        if events.send(RunnerEvent::Msg(msg)).is_err() {
            return;
        }
    }
}
