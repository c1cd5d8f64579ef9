//! `update(model, msg) -> commands`: every change to the model happens here, in reaction to one
//! closed set of messages. Commands are what the runner must do outside (send a request to the
//! appliance, quit, suspend); the update itself does no I/O, so it is tested directly.

use ferry_appliance::control::{DiskSelector, DiskState, Request, Response};
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use crate::format;
use crate::model::{
    Connection, Dialog, DialogAction, Focus, ItemKey, LedgerEntry, Model, Outcome, Row, Screen,
    Severity, Toast, LEDGER_ENTRIES_MAX, TOAST_MS,
};

/// Everything that can happen to the console.
#[derive(Clone, Debug, PartialEq)]
pub enum Msg {
    /// A status snapshot arrived from the appliance.
    Snapshot(ferry_appliance::control::StatusSnapshot),
    /// A status fetch failed; the poller keeps retrying.
    Disconnected(String),
    Key(KeyEvent),
    /// Bracketed paste: text that arrived as one paste, never as key presses.
    Paste(String),
    Resize {
        width: u16,
        height: u16,
    },
    /// The console clock: ms since the console started.
    Tick {
        now_ms: u64,
    },
    /// The appliance answered an action (`Ok` carries its answer, `Err` its refusal or the
    /// transport error).
    ActionResult {
        id: u64,
        result: Result<Response, String>,
    },
}

/// What the runner does for the update.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    Send {
        id: u64,
        request: Request,
    },
    Quit,
    /// Ctrl-Z in raw mode: give the terminal back and stop, as the shell expects.
    Suspend,
}

/// Applies one message to the model.
pub fn update(model: &mut Model, msg: Msg) -> Vec<Command> {
    match msg {
        Msg::Snapshot(snapshot) => {
            model.connection = Connection::Live;
            if model.frozen {
                model.pending = Some(snapshot);
            } else {
                model.apply_snapshot(snapshot);
            }
            Vec::new()
        }
        Msg::Disconnected(reason) => {
            model.connection = Connection::Disconnected { reason };
            Vec::new()
        }
        Msg::Resize { width, height } => {
            model.width = width;
            model.height = height;
            Vec::new()
        }
        Msg::Tick { now_ms } => {
            model.now_ms = now_ms;
            if model
                .toast
                .as_ref()
                .is_some_and(|toast| toast.expires_ms <= now_ms)
            {
                model.toast = None;
            }
            Vec::new()
        }
        Msg::ActionResult { id, result } => {
            let Some(entry) = model.ledger.iter_mut().find(|entry| entry.id == id) else {
                return Vec::new();
            };
            let (severity, text) = match result {
                Ok(response) => {
                    let (summary, details) = describe(&response);
                    let text = format!("done: {}: {summary}", entry.description);
                    entry.outcome = Outcome::Done(summary);
                    entry.details = details;
                    (Severity::Ok, text)
                }
                Err(message) => {
                    let text = format!("failed: {}: {message}", entry.description);
                    entry.outcome = Outcome::Failed(message);
                    (Severity::Critical, text)
                }
            };
            toast(model, severity, text);
            Vec::new()
        }
        Msg::Paste(text) => {
            let clean: String = text.chars().filter(|c| !c.is_control()).collect();
            if let Some(dialog) = model
                .dialog
                .as_mut()
                .filter(|dialog| dialog.focus == Focus::Input)
            {
                dialog.input.push_str(&clean);
                dialog.error = None;
            } else if model.filter_editing {
                model.filter.push_str(&clean);
                model.derive();
            }
            Vec::new()
        }
        Msg::Key(key) => {
            if key.kind == KeyEventKind::Release {
                return Vec::new();
            }
            on_key(model, key)
        }
    }
}

/// An answer as the action ledger shows it: one summary line (also the toast) and the lines
/// worth keeping beside it (a failover's export URIs, the machine definitions it wrote).
pub fn describe(response: &Response) -> (String, Vec<String>) {
    let point_words = |point: &ferry_appliance::control::RecoveryPointStatus| {
        let usable = match (&point.unusable_reason, point.usable) {
            (_, true) => String::new(),
            (Some(reason), false) => format!(", NOT usable: {reason}"),
            (None, false) => ", NOT usable".to_string(),
        };
        format!(
            "point #{} at {} ({}{usable})",
            point.id,
            format::clock(point.time_unix_ms),
            point.consistency.as_str()
        )
    };
    match response {
        Response::Ok { message } => (message.clone(), Vec::new()),
        Response::Error { message } => (message.clone(), Vec::new()),
        Response::PointCreated { point, .. } => (format!("cut {}", point_words(point)), Vec::new()),
        Response::Failover {
            point,
            test,
            exports,
            definitions,
            ..
        } => {
            let summary = format!(
                "{} up at {}, {} export{}",
                if *test { "test failover" } else { "failover" },
                point_words(point),
                exports.len(),
                if exports.len() == 1 { "" } else { "s" }
            );
            let mut details: Vec<String> = exports
                .iter()
                .map(|export| format!("{} {}", export.export_name, export.uri))
                .collect();
            details.extend(
                exports
                    .iter()
                    .filter_map(|export| export.materialized_path.as_ref())
                    .map(|path| format!("image {path}")),
            );
            details.extend(definitions.iter().map(|path| format!("machine {path}")));
            (summary, details)
        }
        Response::RecoveryPoints { group, points } => (
            format!(
                "{} recovery point{} of group {group} ({} usable)",
                points.len(),
                if points.len() == 1 { "" } else { "s" },
                points.iter().filter(|point| point.usable).count()
            ),
            Vec::new(),
        ),
        Response::Verify { disks } => {
            let differing = disks.iter().filter(|disk| !disk.identical).count();
            let summary = if differing == 0 {
                format!(
                    "{} disk{} identical",
                    disks.len(),
                    if disks.len() == 1 { "" } else { "s" }
                )
            } else {
                format!(
                    "{differing} of {} disks DIFFER (extents sent again)",
                    disks.len()
                )
            };
            (summary, Vec::new())
        }
        Response::Status(snapshot) => (format!("status of {}", snapshot.appliance), Vec::new()),
    }
}

fn toast(model: &mut Model, severity: Severity, text: String) {
    model.toast = Some(Toast {
        severity,
        text,
        expires_ms: model.now_ms + TOAST_MS,
    });
}

fn on_key(model: &mut Model, key: KeyEvent) -> Vec<Command> {
    let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
    if ctrl && key.code == KeyCode::Char('c') {
        return vec![Command::Quit];
    }
    if ctrl && key.code == KeyCode::Char('z') {
        return vec![Command::Suspend];
    }
    if model.dialog.is_some() {
        return on_dialog_key(model, key);
    }
    if model.filter_editing {
        on_filter_key(model, key);
        return Vec::new();
    }
    match key.code {
        KeyCode::Char('q') => return vec![Command::Quit],
        KeyCode::Char('?') | KeyCode::F(1) => {
            model.screen = if model.screen == Screen::Help {
                Screen::Overview
            } else {
                Screen::Help
            };
        }
        KeyCode::Esc => back(model),
        KeyCode::Char('L') => {
            model.screen = if model.screen == Screen::Actions {
                Screen::Overview
            } else {
                Screen::Actions
            };
        }
        KeyCode::Char('z') => {
            model.frozen = !model.frozen;
            if !model.frozen {
                if let Some(snapshot) = model.pending.take() {
                    model.apply_snapshot(snapshot);
                }
            }
            let text = if model.frozen {
                "frozen: z resumes live updates"
            } else {
                "live"
            };
            toast(model, Severity::Info, text.to_string());
        }
        _ => match model.screen {
            Screen::Overview => return on_overview_key(model, key),
            Screen::Detail(_) => return on_detail_key(model, key),
            Screen::Help | Screen::Actions => {
                if matches!(
                    key.code,
                    KeyCode::Left | KeyCode::Char('h') | KeyCode::Backspace
                ) {
                    model.screen = Screen::Overview;
                }
            }
        },
    }
    Vec::new()
}

fn back(model: &mut Model) {
    match model.screen {
        Screen::Overview => {
            if !model.filter.is_empty() || model.problems_only {
                model.filter.clear();
                model.problems_only = false;
                model.derive();
            }
        }
        _ => model.screen = Screen::Overview,
    }
}

fn on_filter_key(model: &mut Model, key: KeyEvent) {
    match key.code {
        KeyCode::Enter => model.filter_editing = false,
        KeyCode::Esc => {
            model.filter_editing = false;
            model.filter.clear();
            model.derive();
        }
        KeyCode::Backspace => {
            model.filter.pop();
            model.derive();
        }
        KeyCode::Char(c) if !c.is_control() => {
            model.filter.push(c);
            model.derive();
            model.selected = 0;
        }
        _ => {}
    }
}

fn move_selection(model: &mut Model, delta: isize) {
    if model.rows.is_empty() {
        return;
    }
    let last = model.rows.len() - 1;
    model.selected = model.selected.saturating_add_signed(delta).min(last);
}

/// Moves to the next (or previous) group header.
fn jump_group(model: &mut Model, forward: bool) {
    let count = model.rows.len();
    for step in 1..=count {
        let index = if forward {
            (model.selected + step) % count
        } else {
            (model.selected + count - step % count) % count
        };
        if matches!(model.rows[index], Row::Group(_)) {
            model.selected = index;
            return;
        }
    }
}

fn page(model: &Model) -> isize {
    (model.height.saturating_sub(8)).max(1) as isize
}

fn on_overview_key(model: &mut Model, key: KeyEvent) -> Vec<Command> {
    match key.code {
        KeyCode::Up | KeyCode::Char('k') => move_selection(model, -1),
        KeyCode::Down | KeyCode::Char('j') => move_selection(model, 1),
        KeyCode::PageUp => move_selection(model, -page(model)),
        KeyCode::PageDown => move_selection(model, page(model)),
        KeyCode::Home | KeyCode::Char('g') => model.selected = 0,
        KeyCode::End | KeyCode::Char('G') => move_selection(model, isize::MAX),
        KeyCode::Tab => jump_group(model, true),
        KeyCode::BackTab => jump_group(model, false),
        KeyCode::Enter | KeyCode::Right | KeyCode::Char('l') => {
            if let Some(key) = model.selected_key() {
                model.screen = Screen::Detail(key);
            }
        }
        KeyCode::Char('/') => {
            model.filter_editing = true;
        }
        KeyCode::Char('!') => {
            model.problems_only = !model.problems_only;
            model.derive();
            let text = if model.problems_only {
                "problems only: ! or Esc shows everything"
            } else {
                "showing everything"
            };
            toast(model, Severity::Info, text.to_string());
        }
        _ => {
            let target = model.selected_key();
            return on_action_key(model, key, target);
        }
    }
    Vec::new()
}

fn on_detail_key(model: &mut Model, key: KeyEvent) -> Vec<Command> {
    match key.code {
        KeyCode::Left | KeyCode::Char('h') | KeyCode::Backspace => {
            model.screen = Screen::Overview;
        }
        // Up/down step through the overview's rows without leaving the detail screen.
        KeyCode::Up | KeyCode::Char('k') | KeyCode::Down | KeyCode::Char('j') | KeyCode::Tab => {
            let delta = if matches!(key.code, KeyCode::Up | KeyCode::Char('k')) {
                -1
            } else {
                1
            };
            if key.code == KeyCode::Tab {
                jump_group(model, true);
            } else {
                move_selection(model, delta);
            }
            if let Some(key) = model.selected_key() {
                model.screen = Screen::Detail(key);
            }
        }
        _ => {
            let Screen::Detail(target) = model.screen.clone() else {
                return Vec::new();
            };
            return on_action_key(model, key, Some(target));
        }
    }
    Vec::new()
}

/// The action keys, on the overview or a detail screen, for the selected item.
fn on_action_key(model: &mut Model, key: KeyEvent, target: Option<ItemKey>) -> Vec<Command> {
    let action = match key.code {
        KeyCode::Char('p') => None,
        KeyCode::Char('r') => Some(DialogAction::RecoveryPoint),
        KeyCode::Char('b') => Some(DialogAction::Bandwidth),
        KeyCode::Char('t') => Some(DialogAction::TestFailover),
        KeyCode::Char('c') => Some(DialogAction::FailoverCleanup),
        KeyCode::Char('F') => Some(DialogAction::Failover),
        KeyCode::Char('R') => Some(DialogAction::Reprotect),
        KeyCode::Char('B') => Some(DialogAction::Failback),
        _ => return Vec::new(),
    };
    if model.options.readonly {
        toast(
            model,
            Severity::Warn,
            "read-only console: actions are disabled".to_string(),
        );
        return Vec::new();
    }
    if model.snapshot.is_none() {
        toast(
            model,
            Severity::Warn,
            "no status from the appliance yet".to_string(),
        );
        return Vec::new();
    }
    match action {
        None => pause_or_resume(model, target),
        Some(DialogAction::Bandwidth) => {
            match model.action_refusal(DialogAction::Bandwidth, "") {
                Some(reason) => toast(model, Severity::Warn, format!("Bandwidth limit: {reason}")),
                None => open_dialog(model, DialogAction::Bandwidth, String::new()),
            }
            Vec::new()
        }
        Some(action) => {
            let group = target.as_ref().and_then(|key| model.group_of(key));
            match group {
                Some(group) if !group.is_empty() => match model.action_refusal(action, &group) {
                    Some(reason) => toast(
                        model,
                        Severity::Warn,
                        format!("{}: {reason}", action.title()),
                    ),
                    None => open_dialog(model, action, group),
                },
                _ => toast(
                    model,
                    Severity::Warn,
                    format!(
                        "{}: select a consistency group or one of its disks",
                        action.title()
                    ),
                ),
            }
            Vec::new()
        }
    }
}

/// Pause and resume are one key and a toast: both are harmless and undone by the other.
fn pause_or_resume(model: &mut Model, target: Option<ItemKey>) -> Vec<Command> {
    let Some(target) = target else {
        return Vec::new();
    };
    let (scope, paused, label) = match &target {
        ItemKey::Disk { machine, name } => {
            let paused = model
                .disk(machine, name)
                .is_some_and(|disk| disk.state == DiskState::Paused);
            (
                DiskSelector {
                    disk: Some(format!("{machine}/{name}")),
                    group: None,
                },
                paused,
                format!("{machine}/{name}"),
            )
        }
        ItemKey::Group(group) if !group.is_empty() => {
            let paused = model.group_view(group).is_some_and(|view| {
                let snapshot = model.snapshot.as_ref();
                !view.disks.is_empty()
                    && view.disks.iter().all(|&index| {
                        snapshot.is_some_and(|s| s.disks[index].state == DiskState::Paused)
                    })
            });
            (
                DiskSelector {
                    disk: None,
                    group: Some(group.clone()),
                },
                paused,
                format!("group {group}"),
            )
        }
        _ => {
            toast(
                model,
                Severity::Warn,
                "pause: select a disk or a named group".to_string(),
            );
            return Vec::new();
        }
    };
    let (request, description) = if paused {
        (
            Request::Resume { selector: scope },
            format!("resume {label}"),
        )
    } else {
        (Request::Pause { selector: scope }, format!("pause {label}"))
    };
    vec![send(model, request, description)]
}

/// Records an action in the ledger and returns the command that sends it.
fn send(model: &mut Model, request: Request, description: String) -> Command {
    let id = model.next_action_id;
    model.next_action_id += 1;
    if model.ledger.len() == LEDGER_ENTRIES_MAX {
        model.ledger.pop_front();
    }
    model.ledger.push_back(LedgerEntry {
        id,
        description: description.clone(),
        sent_ms: model.now_ms,
        outcome: Outcome::Pending,
        details: Vec::new(),
    });
    toast(
        model,
        Severity::Info,
        format!("sent: {description} (L lists actions)"),
    );
    Command::Send { id, request }
}

fn open_dialog(model: &mut Model, action: DialogAction, group: String) {
    let points = if matches!(action, DialogAction::Failover | DialogAction::TestFailover) {
        model.usable_points(&group)
    } else {
        Vec::new()
    };
    let (disk_count, machines) = match (model.group_view(&group), model.snapshot.as_ref()) {
        (Some(view), Some(snapshot)) => {
            let mut machines: Vec<String> = view
                .disks
                .iter()
                .map(|&index| snapshot.disks[index].machine.clone())
                .collect();
            machines.sort();
            machines.dedup();
            (view.disks.len(), machines)
        }
        _ => (0, Vec::new()),
    };
    model.dialog = Some(Dialog {
        action,
        group,
        focus: Focus::Cancel,
        app_consistent: false,
        input: String::new(),
        points,
        point_index: 0,
        error: None,
        disk_count,
        machines,
    });
}

fn on_dialog_key(model: &mut Model, key: KeyEvent) -> Vec<Command> {
    let Some(dialog) = model.dialog.as_mut() else {
        return Vec::new();
    };
    let fields = dialog.action.fields();
    let position = fields
        .iter()
        .position(|field| *field == dialog.focus)
        .unwrap_or(0);
    match key.code {
        KeyCode::Esc => {
            model.dialog = None;
            toast(model, Severity::Info, "cancelled".to_string());
        }
        KeyCode::Tab => dialog.focus = fields[(position + 1) % fields.len()],
        KeyCode::BackTab => dialog.focus = fields[(position + fields.len() - 1) % fields.len()],
        KeyCode::Left | KeyCode::Right
            if matches!(dialog.focus, Focus::Cancel | Focus::Confirm) =>
        {
            dialog.focus = if dialog.focus == Focus::Cancel {
                Focus::Confirm
            } else {
                Focus::Cancel
            };
        }
        KeyCode::Left | KeyCode::Right | KeyCode::Char(' ') if dialog.focus == Focus::Kind => {
            dialog.app_consistent = !dialog.app_consistent;
        }
        KeyCode::Up | KeyCode::Char('k') if dialog.focus == Focus::Points => {
            dialog.point_index = dialog.point_index.saturating_sub(1);
        }
        KeyCode::Down | KeyCode::Char('j') if dialog.focus == Focus::Points => {
            dialog.point_index =
                (dialog.point_index + 1).min(dialog.points.len().saturating_sub(1));
        }
        KeyCode::Backspace if dialog.focus == Focus::Input => {
            dialog.input.pop();
            dialog.error = None;
        }
        KeyCode::Char(c) if dialog.focus == Focus::Input && !c.is_control() => {
            dialog.input.push(c);
            dialog.error = None;
        }
        KeyCode::Enter => match dialog.focus {
            Focus::Cancel => {
                model.dialog = None;
                toast(model, Severity::Info, "cancelled".to_string());
            }
            Focus::Confirm => return confirm(model),
            // Enter in the bandwidth field applies it (a harmless, reversible action). In a
            // typed-name field it does nothing: confirming takes a deliberate move to Confirm.
            Focus::Input if dialog.action == DialogAction::Bandwidth => return confirm(model),
            Focus::Input => {
                dialog.error = Some("Tab to the confirm button, then Enter".to_string());
            }
            Focus::Points | Focus::Kind => dialog.focus = fields[(position + 1) % fields.len()],
        },
        _ => {}
    }
    Vec::new()
}

/// The Confirm button: validates the dialog and, if it holds, sends the request.
fn confirm(model: &mut Model) -> Vec<Command> {
    let Some(dialog) = model.dialog.as_mut() else {
        return Vec::new();
    };
    if dialog.action.needs_typed_name() && dialog.input != dialog.group {
        dialog.error = Some(format!(
            "type the group's name exactly ({}) to confirm",
            dialog.group
        ));
        dialog.focus = Focus::Input;
        return Vec::new();
    }
    let group = dialog.group.clone();
    let point = dialog.points.get(dialog.point_index).cloned();
    if matches!(
        dialog.action,
        DialogAction::Failover | DialogAction::TestFailover
    ) && point.is_none()
    {
        dialog.error = Some(format!("group {group} has no usable recovery point"));
        return Vec::new();
    }
    let point_label = point.as_ref().map_or_else(String::new, |point| {
        format!(
            "point #{} ({})",
            point.id,
            format::clock(point.time_unix_ms)
        )
    });
    let (request, description) = match dialog.action {
        DialogAction::RecoveryPoint => (
            Request::CreateRecoveryPoint {
                group: group.clone(),
                app_consistent: dialog.app_consistent,
            },
            format!(
                "{} recovery point of group {group}",
                if dialog.app_consistent {
                    "app-consistent"
                } else {
                    "crash-consistent"
                }
            ),
        ),
        DialogAction::Bandwidth => {
            let text = dialog.input.trim();
            let limit = if text.is_empty() || text == "0" {
                None
            } else {
                match text.parse::<f64>() {
                    Ok(mb_per_s) if mb_per_s.is_finite() && mb_per_s > 0.0 => {
                        Some((mb_per_s * 1e6).round() as u64)
                    }
                    _ => {
                        dialog.error =
                            Some(format!("{text:?} is not a rate in MB/s (empty: no limit)"));
                        return Vec::new();
                    }
                }
            };
            let description = match limit {
                Some(bytes_per_s) => {
                    format!("limit bandwidth to {}", format::rate(bytes_per_s as f64))
                }
                None => "remove the bandwidth limit".to_string(),
            };
            (Request::SetBandwidth { bytes_per_s: limit }, description)
        }
        DialogAction::TestFailover => (
            Request::Failover {
                group: group.clone(),
                point: point.as_ref().map(|p| p.id),
                test: true,
                at_unix_ms: None,
                planned: false,
                materialize_dir: None,
            },
            format!("test failover of group {group} to {point_label}"),
        ),
        DialogAction::Failover => (
            Request::Failover {
                group: group.clone(),
                point: point.as_ref().map(|p| p.id),
                test: false,
                at_unix_ms: None,
                planned: false,
                materialize_dir: None,
            },
            format!("FAILOVER of group {group} to {point_label}"),
        ),
        DialogAction::FailoverCleanup => (
            Request::FailoverCleanup {
                group: group.clone(),
            },
            format!("clean up the test failover of group {group}"),
        ),
        DialogAction::Reprotect => (
            Request::Reprotect {
                group: group.clone(),
            },
            format!("reprotect group {group}"),
        ),
        DialogAction::Failback => (
            Request::Failback {
                group: group.clone(),
            },
            format!("FAILBACK of group {group}"),
        ),
    };
    model.dialog = None;
    vec![send(model, request, description)]
}
