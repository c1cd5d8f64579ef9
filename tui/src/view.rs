//! `view(model, frame)`: draws the model and nothing else. No clock reads, no I/O: ages are
//! measured against the snapshot's own time, staleness against the console clock in the model.

use ferry_appliance::control::{
    DiskState, DiskStatus, FailoverExport, GroupState, PointConsistency, RecoveryPointStatus,
    StatusSnapshot,
};
use ratatui::layout::{Alignment, Constraint, Layout, Rect};
use ratatui::style::Style;
use ratatui::text::{Line, Span, Text};
use ratatui::widgets::{
    Block, Borders, Cell, Clear, Paragraph, Row as TableRow, Sparkline, Table, Wrap,
};
use ratatui::Frame;

use crate::format;
use crate::model::{
    group_label, journal_fraction, Connection, Dialog, DialogAction, Focus, GroupView, History,
    ItemKey, Model, Outcome, Row, Screen, Series, Severity,
};
use crate::theme::{Theme, Tone};

/// The smallest terminal the console lays out in; below it, a "too small" screen. 80 columns
/// is the design width; 20 rows leave room for tmux's status line on a 24-row terminal.
pub const WIDTH_MIN: u16 = 80;
pub const HEIGHT_MIN: u16 = 20;

/// Draws the whole screen.
pub fn view(model: &Model, frame: &mut Frame) {
    let area = frame.area();
    let theme = &model.options.theme;
    if area.width < WIDTH_MIN || area.height < HEIGHT_MIN {
        too_small(theme, area, frame);
        return;
    }
    let [header, alerts, body, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Min(1),
        Constraint::Length(1),
    ])
    .areas(area);
    draw_header(model, header, frame);
    draw_alerts(model, alerts, frame);
    match &model.screen {
        Screen::Overview => draw_overview(model, body, frame),
        Screen::Detail(key) => draw_detail(model, key, body, frame),
        Screen::Help => draw_help(model, body, frame),
        Screen::Actions => draw_ledger(model, body, frame),
    }
    draw_footer(model, footer, frame);
    if let Some(dialog) = &model.dialog {
        draw_dialog(model, dialog, body, frame);
    }
}

fn too_small(theme: &Theme, area: Rect, frame: &mut Frame) {
    let text = Text::from(vec![
        Line::styled("terminal too small", theme.tone(Tone::Warn)),
        Line::from(format!(
            "{}x{}, the console needs {WIDTH_MIN}x{HEIGHT_MIN}",
            area.width, area.height
        )),
        Line::from("enlarge the window, or q to quit"),
    ]);
    let top = area.height.saturating_sub(3) / 2;
    let centered = Rect {
        y: area.y + top,
        height: area.height.saturating_sub(top),
        ..area
    };
    frame.render_widget(
        Paragraph::new(text)
            .alignment(Alignment::Center)
            .wrap(Wrap { trim: true }),
        centered,
    );
}

fn severity_tone(severity: Severity) -> Tone {
    match severity {
        Severity::Ok => Tone::Ok,
        Severity::Info => Tone::Info,
        Severity::Warn => Tone::Warn,
        Severity::Critical => Tone::Critical,
    }
}

fn severity_glyph(theme: &Theme, severity: Severity) -> &'static str {
    match severity {
        Severity::Ok => theme.glyph("✔", "+"),
        Severity::Info => theme.glyph("↻", "~"),
        Severity::Warn => theme.glyph("▲", "!"),
        Severity::Critical => theme.glyph("✖", "X"),
    }
}

fn state_glyph(theme: &Theme, state: DiskState) -> &'static str {
    match state {
        DiskState::Protected => theme.glyph("✔", "+"),
        DiskState::InitialSync | DiskState::Resyncing => theme.glyph("↻", "~"),
        DiskState::ResyncNeeded => theme.glyph("✖", "X"),
        DiskState::Paused => theme.glyph("‖", "="),
        DiskState::FailedOver => theme.glyph("⇒", ">"),
        DiskState::Reprotecting => theme.glyph("⇐", "<"),
    }
}

/// The state word of a disk, with progress where there is some.
fn state_word(disk: &DiskStatus) -> String {
    let percent = disk
        .sync
        .as_ref()
        .filter(|sync| sync.bytes_total > 0)
        .map(|sync| {
            (sync.bytes_done as f64 / sync.bytes_total as f64 * 100.0)
                .floor()
                .min(100.0)
        });
    match (disk.state, percent) {
        (DiskState::InitialSync, Some(percent)) => format!("sync {percent:.0}%"),
        (DiskState::Resyncing, Some(percent)) => format!("resync {percent:.0}%"),
        (state, _) => state.as_str().to_string(),
    }
}

/// The glyph of a group's failover life-cycle state.
fn group_state_glyph(theme: &Theme, state: GroupState) -> &'static str {
    match state {
        GroupState::Protected => theme.glyph("✔", "+"),
        GroupState::TestFailover => theme.glyph("◇", "o"),
        GroupState::FailedOver => theme.glyph("⇒", ">"),
        GroupState::Reprotecting => theme.glyph("⇐", "<"),
        GroupState::FailingBack => theme.glyph("↩", "<-"),
    }
}

/// The overview's STATE cell of a group: its life-cycle state when a failover is involved,
/// else its health ("protected" when all is well).
fn group_state_cell(theme: &Theme, state: GroupState, severity: Severity) -> (String, Style) {
    if state == GroupState::Protected {
        let word = if severity == Severity::Ok {
            "protected"
        } else {
            group_word(severity)
        };
        (
            format!("{} {word}", severity_glyph(theme, severity)),
            theme.tone(severity_tone(severity)),
        )
    } else {
        (
            format!("{} {}", group_state_glyph(theme, state), state.as_str()),
            theme.tone(Tone::Accent),
        )
    }
}

fn group_word(severity: Severity) -> &'static str {
    match severity {
        Severity::Ok => "healthy",
        Severity::Info => "in progress",
        Severity::Warn => "warning",
        Severity::Critical => "critical",
    }
}

fn draw_header(model: &Model, area: Rect, frame: &mut Frame) {
    let theme = &model.options.theme;
    let sep = theme.separator();
    let mut spans = vec![Span::styled("ferry", theme.title())];
    if let Some(snapshot) = &model.snapshot {
        spans.push(Span::raw(format!("{sep}{}", snapshot.appliance)));
    }
    match &model.connection {
        Connection::Connecting => {
            spans.push(Span::styled(
                format!("{sep}connecting to {}", model.options.endpoint),
                theme.tone(Tone::Info),
            ));
        }
        Connection::Live => {
            let stale_s = model.now_ms.saturating_sub(model.snapshot_received_ms) / 1000;
            if stale_s >= 5 {
                spans.push(Span::styled(
                    format!("{sep}no update for {stale_s}s"),
                    theme.tone(Tone::Warn),
                ));
            }
        }
        Connection::Disconnected { reason } => {
            spans.push(Span::styled(
                format!(
                    "{sep}DISCONNECTED {} retrying: {reason}",
                    theme.glyph("—", "-")
                ),
                theme.tone(Tone::Critical),
            ));
        }
    }
    if let Some(link) = model
        .snapshot
        .as_ref()
        .and_then(|snapshot| snapshot.link.as_ref())
    {
        let (glyph, word, tone) = if link.connected {
            (theme.glyph("✔", "+"), "up", Tone::Ok)
        } else {
            (theme.glyph("✖", "X"), "DOWN", Tone::Critical)
        };
        let peer = if link.peer.is_empty() {
            String::new()
        } else {
            format!(" {} {}", theme.arrow_right(), link.peer)
        };
        spans.push(Span::raw(format!("{sep}link ")));
        spans.push(Span::styled(format!("{glyph} {word}"), theme.tone(tone)));
        spans.push(Span::raw(peer));
        if let Some(limit) = link.bandwidth_limit_bytes_per_s {
            spans.push(Span::raw(format!(
                " (limit {})",
                format::rate(limit as f64)
            )));
        }
    }
    frame.render_widget(Paragraph::new(Line::from(spans)), area);

    let mut right = Vec::new();
    if model.frozen {
        right.push(Span::styled(
            " FROZEN ",
            theme
                .tone(Tone::Warn)
                .add_modifier(ratatui::style::Modifier::REVERSED),
        ));
        right.push(Span::raw(" "));
    }
    if model.options.readonly {
        right.push(Span::styled("READ-ONLY ", theme.tone(Tone::Accent)));
    }
    if let Some(snapshot) = &model.snapshot {
        right.push(Span::raw(format::clock(snapshot.time_unix_ms)));
    }
    let right = Line::from(right);
    let width = right.width() as u16;
    if width > 0 && width < area.width {
        let at = Rect {
            x: area.x + area.width - width,
            width,
            ..area
        };
        frame.render_widget(Clear, at);
        frame.render_widget(Paragraph::new(right), at);
    }
}

fn draw_alerts(model: &Model, area: Rect, frame: &mut Frame) {
    let theme = &model.options.theme;
    let line = if model.snapshot.is_none() {
        Line::styled(
            "waiting for the first status snapshot",
            theme.tone(Tone::Dim),
        )
    } else if model.alerts.is_empty() {
        Line::styled(
            format!("{} no alerts", theme.glyph("✔", "+")),
            theme.tone(Tone::Ok),
        )
    } else {
        let worst = model.worst_alert().unwrap_or(Severity::Warn);
        let count = model.alerts.len();
        let mut spans = vec![Span::styled(
            format!(
                "{} {count} alert{}: ",
                severity_glyph(theme, worst),
                if count == 1 { "" } else { "s" }
            ),
            theme.tone(severity_tone(worst)),
        )];
        for (index, alert) in model.alerts.iter().enumerate() {
            if index > 0 {
                spans.push(Span::raw(theme.separator()));
            }
            spans.push(Span::styled(
                alert.text.clone(),
                theme.tone(severity_tone(alert.severity)),
            ));
            if index >= 6 {
                break; // the line is full long before this; stop formatting
            }
        }
        Line::from(spans)
    };
    frame.render_widget(Paragraph::new(line), area);
}

fn draw_footer(model: &Model, area: Rect, frame: &mut Frame) {
    let theme = &model.options.theme;
    let line = if model.filter_editing {
        Line::from(vec![
            Span::styled("filter: ", theme.title()),
            Span::raw(format!("{}_", model.filter)),
            Span::styled("   Enter keeps it, Esc clears it", theme.tone(Tone::Dim)),
        ])
    } else if let Some(toast) = &model.toast {
        Line::styled(
            toast.text.clone(),
            theme.tone(severity_tone(toast.severity)),
        )
    } else {
        let hints = footer_hints(model, area.width as usize);
        let hints = if theme.unicode {
            hints
        } else {
            hints.replace("↑↓", "j/k")
        };
        let mut spans = vec![Span::styled(hints, theme.tone(Tone::Dim))];
        if !model.filter.is_empty() || model.problems_only {
            let mut active = Vec::new();
            if model.problems_only {
                active.push("problems only".to_string());
            }
            if !model.filter.is_empty() {
                active.push(format!("filter \"{}\"", model.filter));
            }
            spans.insert(
                0,
                Span::styled(
                    format!("[{}] ", active.join(", ")),
                    theme.tone(Tone::Accent),
                ),
            );
        }
        Line::from(spans)
    };
    frame.render_widget(Paragraph::new(line), area);
}

/// The action keys that would do something for `key` now; keys the group's state or this
/// appliance's role forbids are left out (pressing one says why).
fn action_hints(model: &Model, key: Option<&ItemKey>) -> Vec<&'static str> {
    let mut hints = Vec::new();
    let Some(key) = key else { return hints };
    let Some(group) = model.group_of(key) else {
        return hints;
    };
    if model.snapshot.as_ref().is_some_and(|s| !s.disks.is_empty())
        && (matches!(key, ItemKey::Disk { .. })
            || model
                .group_view(&group)
                .is_some_and(|view| !view.disks.is_empty()))
    {
        hints.push("p pause");
    }
    if group.is_empty() {
        return hints;
    }
    for (action, hint) in [
        (DialogAction::RecoveryPoint, "r point"),
        (DialogAction::TestFailover, "t test failover"),
        (DialogAction::FailoverCleanup, "c cleanup"),
        (DialogAction::Failover, "F failover"),
        (DialogAction::Reprotect, "R reprotect"),
        (DialogAction::Failback, "B failback"),
    ] {
        if model.action_refusal(action, &group).is_none() {
            hints.push(hint);
        }
    }
    hints
}

/// The footer's key hints for the screen, shortened to fit `width`: the optional navigation
/// hints go first, then the actions' words (keys stay).
fn footer_hints(model: &Model, width: usize) -> String {
    let (mut nav, optional, actions): (Vec<&str>, Vec<&str>, Vec<&str>) =
        match (&model.screen, model.options.readonly) {
            (Screen::Overview, false) => (
                vec!["↑↓ Enter"],
                vec!["/ filter", "! problems"],
                action_hints(model, model.selected_key().as_ref()),
            ),
            (Screen::Overview, true) => (
                vec!["↑↓ move", "Enter detail"],
                vec!["/ filter", "! problems", "z freeze"],
                Vec::new(),
            ),
            (Screen::Detail(key), false) => (
                vec!["Esc back", "↑↓ next"],
                Vec::new(),
                action_hints(model, Some(key)),
            ),
            (Screen::Detail(_), true) => (
                vec!["Esc back", "↑↓ next item"],
                vec!["z freeze"],
                Vec::new(),
            ),
            (Screen::Help, _) | (Screen::Actions, _) => (vec!["Esc back"], Vec::new(), Vec::new()),
        };
    let tail = ["? help", "q quit"];
    let join = |parts: &[&str]| parts.join("  ");
    let mut optional = optional;
    loop {
        let mut parts = nav.clone();
        parts.extend(&optional);
        parts.extend(&actions);
        parts.extend(tail);
        let text = join(&parts);
        if text.chars().count() <= width || optional.is_empty() {
            if text.chars().count() <= width {
                return text;
            }
            break;
        }
        optional.pop();
    }
    // Still too long: the action keys without their words.
    nav.extend(
        actions
            .iter()
            .map(|hint| hint.split(' ').next().unwrap_or(hint)),
    );
    nav.extend(tail);
    join(&nav)
}

fn rpo_span(
    theme: &Theme,
    lag_seconds: f64,
    threshold: Option<f64>,
    applies: bool,
) -> Span<'static> {
    if !applies {
        return Span::styled("-", theme.tone(Tone::Dim));
    }
    let text = format::seconds(lag_seconds);
    match threshold {
        Some(threshold) if lag_seconds > threshold => {
            Span::styled(format!("{text}!"), theme.tone(Tone::Critical))
        }
        Some(threshold) if lag_seconds > threshold * 0.5 => {
            Span::styled(text, theme.tone(Tone::Warn))
        }
        Some(_) => Span::styled(text, theme.tone(Tone::Ok)),
        None => Span::raw(text),
    }
}

fn journal_span(theme: &Theme, used: u64, capacity: u64) -> Span<'static> {
    if capacity == 0 {
        return Span::styled("-", theme.tone(Tone::Dim));
    }
    let fraction = used as f64 / capacity as f64;
    let tone = if fraction > 0.95 {
        Tone::Critical
    } else if fraction > 0.8 {
        Tone::Warn
    } else {
        Tone::Ok
    };
    Span::styled(
        format!("{}{:>3.0}%", theme.gauge(fraction, 6), fraction * 100.0),
        theme.tone(tone),
    )
}

fn draw_overview(model: &Model, area: Rect, frame: &mut Frame) {
    let theme = &model.options.theme;
    let title = format!(
        " {} group{}, {} disk{}{} ",
        model.groups.len(),
        if model.groups.len() == 1 { "" } else { "s" },
        model.snapshot.as_ref().map_or(0, |s| s.disks.len()),
        if model.snapshot.as_ref().map_or(0, |s| s.disks.len()) == 1 {
            ""
        } else {
            "s"
        },
        model
            .snapshot
            .as_ref()
            .filter(|s| !s.replicas.is_empty())
            .map(|s| format!(", {} replicas", s.replicas.len()))
            .unwrap_or_default()
    );
    let block = Block::default()
        .borders(Borders::TOP)
        .border_set(theme.border())
        .title(title);
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let Some(snapshot) = &model.snapshot else {
        let text = match &model.connection {
            Connection::Disconnected { reason } => format!("cannot reach the appliance: {reason}"),
            _ => format!("connecting to {}", model.options.endpoint),
        };
        frame.render_widget(Paragraph::new(text).wrap(Wrap { trim: true }), inner);
        return;
    };
    if model.rows.is_empty() {
        let text = if model.problems_only || !model.filter.is_empty() {
            "nothing matches: Esc clears the filter"
        } else {
            "this appliance protects no disks yet"
        };
        frame.render_widget(Paragraph::new(text), inner);
        return;
    }
    // Only the visible window is formatted: at 200 disks that is a tenth of the rows.
    let visible = inner.height.saturating_sub(1).max(1) as usize;
    let offset = if model.selected < visible {
        0
    } else {
        model.selected + 1 - visible
    };
    let end = (offset + visible).min(model.rows.len());
    let rows: Vec<TableRow> = model.rows[offset..end]
        .iter()
        .enumerate()
        .map(|(position, row)| {
            let selected = offset + position == model.selected;
            let table_row = overview_row(theme, snapshot, &model.groups, *row, selected);
            if selected {
                table_row.style(theme.selected())
            } else {
                table_row
            }
        })
        .collect();
    let header = TableRow::new([
        "  NAME", "STATE", "RPO", "CHURN", "SHIP", "JOURNAL", "POINT",
    ])
    .style(theme.title());
    let widths = [
        Constraint::Length(18),
        Constraint::Length(15),
        Constraint::Length(6),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(10),
        Constraint::Length(6),
    ];
    frame.render_widget(
        Table::new(rows, widths).header(header).column_spacing(1),
        inner,
    );
}

fn overview_row<'a>(
    theme: &Theme,
    snapshot: &'a StatusSnapshot,
    groups: &[GroupView],
    row: Row,
    selected: bool,
) -> TableRow<'a> {
    let marker = if selected { ">" } else { " " };
    match row {
        Row::Group(index) => {
            let group = &groups[index];
            let status = group.status.map(|i| &snapshot.groups[i]);
            let (state_text, state_style) = group_state_cell(
                theme,
                status.map_or(GroupState::Protected, |status| status.state),
                group.severity,
            );
            let point_age = status
                .and_then(|status| status.latest_point_age_seconds)
                .map_or_else(|| "-".to_string(), format::seconds);
            let any_rpo = group.disks.iter().any(|&i| {
                !matches!(
                    snapshot.disks[i].state,
                    DiskState::InitialSync | DiskState::FailedOver
                )
            });
            TableRow::new(vec![
                Cell::from(Line::from(vec![
                    Span::raw(marker),
                    Span::styled(
                        format!("{} ({})", group_label(&group.name), group.disks.len()),
                        theme.title(),
                    ),
                ])),
                Cell::from(Span::styled(state_text, state_style)),
                Cell::from(rpo_span(
                    theme,
                    group.rpo_lag_seconds_max,
                    status.map(|status| status.rpo_threshold_seconds),
                    any_rpo,
                )),
                Cell::from(format::rate(group.churn_bytes_per_s)),
                Cell::from(format::rate(group.ship_bytes_per_s)),
                Cell::from(journal_span(
                    theme,
                    group.journal_used_bytes,
                    group.journal_capacity_bytes,
                )),
                Cell::from(point_age),
            ])
        }
        Row::Disk(index) => {
            let disk = &snapshot.disks[index];
            let threshold = snapshot
                .groups
                .iter()
                .find(|group| group.name == disk.group)
                .map(|group| group.rpo_threshold_seconds);
            let severity = crate::model::disk_severity(disk, threshold);
            let glyph = if severity >= Severity::Warn {
                severity_glyph(theme, severity)
            } else {
                state_glyph(theme, disk.state)
            };
            let applies = !matches!(disk.state, DiskState::InitialSync | DiskState::FailedOver);
            TableRow::new(vec![
                Cell::from(format!("{marker}  {}/{}", disk.machine, disk.name)),
                Cell::from(Span::styled(
                    format!("{glyph} {}", state_word(disk)),
                    theme.tone(severity_tone(severity)),
                )),
                Cell::from(rpo_span(theme, disk.rpo_lag_seconds, threshold, applies)),
                Cell::from(format::rate(disk.churn_bytes_per_s)),
                Cell::from(format::rate(disk.ship_bytes_per_s)),
                Cell::from(journal_span(
                    theme,
                    disk.journal_used_bytes,
                    disk.journal_capacity_bytes,
                )),
                Cell::from(""),
            ])
        }
        Row::Replica(index) => {
            let replica = &snapshot.replicas[index];
            TableRow::new(vec![
                Cell::from(format!("{marker}{}/{}", replica.machine, replica.name)),
                Cell::from(Span::styled(
                    format!("{} replica", theme.glyph("◆", "*")),
                    theme.tone(Tone::Info),
                )),
                Cell::from("-"),
                Cell::from(""),
                Cell::from(""),
                Cell::from(format!("seq {}", replica.applied_sequence)),
                Cell::from(""),
            ])
        }
    }
}

fn draw_detail(model: &Model, key: &ItemKey, area: Rect, frame: &mut Frame) {
    let theme = &model.options.theme;
    let block = Block::default()
        .borders(Borders::TOP)
        .border_set(theme.border())
        .title(format!(" {} ", key.label()));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let Some(snapshot) = &model.snapshot else {
        return;
    };
    let sep = theme.separator();
    let mut info: Vec<Line> = Vec::new();
    let mut sync_line: Option<Line> = None;
    let group_name: Option<String>;
    match key {
        ItemKey::Disk { machine, name } => {
            let Some(disk) = model.disk(machine, name) else {
                frame.render_widget(
                    Paragraph::new("this disk is no longer in the appliance's status"),
                    inner,
                );
                return;
            };
            group_name = Some(disk.group.clone());
            let status = model.group_status(&disk.group);
            let threshold = status.map(|s| s.rpo_threshold_seconds);
            let severity = crate::model::disk_severity(disk, threshold);
            let applies = !matches!(disk.state, DiskState::InitialSync | DiskState::FailedOver);
            info.push(Line::from(vec![
                Span::styled(
                    format!("{} {}", state_glyph(theme, disk.state), state_word(disk)),
                    theme.tone(severity_tone(severity)),
                ),
                Span::raw(format!(
                    "{sep}group {}{sep}size {}{sep}journal {}{sep}export {}",
                    group_label(&disk.group),
                    format::bytes(disk.size_bytes as f64),
                    format::bytes(disk.journal_capacity_bytes as f64),
                    if disk.export.is_empty() {
                        "-"
                    } else {
                        disk.export.as_str()
                    }
                )),
            ]));
            let mut rpo = vec![
                Span::raw("RPO "),
                rpo_span(theme, disk.rpo_lag_seconds, threshold, applies),
            ];
            if let Some(threshold) = threshold {
                rpo.push(Span::raw(format!(" (max {})", format::seconds(threshold))));
            }
            rpo.push(Span::raw(format!(
                "{sep}churn {}{sep}ship {}{sep}journal ",
                format::rate(disk.churn_bytes_per_s),
                format::rate(disk.ship_bytes_per_s)
            )));
            rpo.push(journal_span(
                theme,
                disk.journal_used_bytes,
                disk.journal_capacity_bytes,
            ));
            info.push(Line::from(rpo));
            info.push(Line::from(vec![
                Span::raw(format!(
                    "seq {} written, {} acked by the target{sep}",
                    disk.last_sequence, disk.acked_sequence
                )),
                forecast_span(theme, disk),
            ]));
            if let Some(sync) = &disk.sync {
                let fraction = if sync.bytes_total == 0 {
                    0.0
                } else {
                    sync.bytes_done as f64 / sync.bytes_total as f64
                };
                let eta = sync.eta_seconds.map_or_else(
                    || "ETA unknown".to_string(),
                    |eta| format!("ETA {}", format::seconds(eta)),
                );
                let word = if disk.state == DiskState::InitialSync {
                    "initial sync"
                } else {
                    "resync"
                };
                sync_line = Some(Line::from(vec![
                    Span::styled(format!("{word} "), theme.title()),
                    Span::styled(theme.gauge(fraction, 14), theme.tone(Tone::Info)),
                    Span::raw(format!(
                        " {:.0}%{sep}{} of {}{sep}{}{sep}{eta}",
                        (fraction * 100.0).floor(),
                        format::bytes(sync.bytes_done as f64),
                        format::bytes(sync.bytes_total as f64),
                        format::rate(sync.bytes_per_s)
                    )),
                ]));
            }
        }
        ItemKey::Group(name) => {
            group_name = Some(name.clone());
            let Some(view) = model.group_view(name) else {
                frame.render_widget(
                    Paragraph::new("this group is no longer in the appliance's status"),
                    inner,
                );
                return;
            };
            let status = model.group_status(name);
            let mut machines: Vec<&str> = view
                .disks
                .iter()
                .map(|&i| snapshot.disks[i].machine.as_str())
                .collect();
            machines.sort_unstable();
            machines.dedup();
            let state = status.map_or(GroupState::Protected, |status| status.state);
            let mut first = vec![Span::styled(
                format!("{} {}", group_state_glyph(theme, state), state.as_str()),
                theme.tone(if state == GroupState::Protected {
                    Tone::Ok
                } else {
                    Tone::Accent
                }),
            )];
            if view.severity != Severity::Ok || state != GroupState::Protected {
                first.push(Span::raw(sep));
                first.push(Span::styled(
                    format!(
                        "{} {}",
                        severity_glyph(theme, view.severity),
                        group_word(view.severity)
                    ),
                    theme.tone(severity_tone(view.severity)),
                ));
            }
            first.push(Span::raw(if view.disks.is_empty() {
                format!("{sep}its disks are on the source appliance")
            } else {
                format!(
                    "{sep}{} disk{} on {}",
                    view.disks.len(),
                    if view.disks.len() == 1 { "" } else { "s" },
                    machines.join(", ")
                )
            }));
            info.push(Line::from(first));
            if view.disks.is_empty() {
                // A target's view of the group: no disks, so no RPO or rates to show here.
                if let Some(status) = status {
                    info.push(Line::from(format!(
                        "recovery point every {}{sep}latest {}",
                        format::seconds(status.recovery_point_interval_seconds),
                        status.latest_point_age_seconds.map_or_else(
                            || "none yet".to_string(),
                            |age| format!("{} ago", format::seconds(age))
                        )
                    )));
                }
            } else {
                let mut rpo = vec![
                    Span::raw("RPO worst "),
                    rpo_span(
                        theme,
                        view.rpo_lag_seconds_max,
                        status.map(|s| s.rpo_threshold_seconds),
                        true,
                    ),
                ];
                if let Some(status) = status {
                    rpo.push(Span::raw(format!(
                        " (threshold {}){sep}recovery point every {}{sep}latest {}",
                        format::seconds(status.rpo_threshold_seconds),
                        format::seconds(status.recovery_point_interval_seconds),
                        status.latest_point_age_seconds.map_or_else(
                            || "none yet".to_string(),
                            |age| format!("{} ago", format::seconds(age))
                        )
                    )));
                }
                info.push(Line::from(rpo));
                info.push(Line::from(vec![
                    Span::raw(format!(
                        "churn {}{sep}ship {}{sep}journal ",
                        format::rate(view.churn_bytes_per_s),
                        format::rate(view.ship_bytes_per_s)
                    )),
                    journal_span(theme, view.journal_used_bytes, view.journal_capacity_bytes),
                ]));
            }
        }
        ItemKey::Replica { machine, name } => {
            let replica = snapshot
                .replicas
                .iter()
                .find(|r| &r.machine == machine && &r.name == name);
            let text = match replica {
                Some(replica) => vec![
                    Line::from(format!(
                        "{} replica of {}/{}",
                        theme.glyph("◆", "*"),
                        replica.machine,
                        replica.name
                    )),
                    Line::from(format!("path {}", replica.replica_path)),
                    Line::from(format!(
                        "applied sequence {}{sep}size {}{sep}source {}",
                        replica.applied_sequence,
                        format::bytes(replica.size_bytes as f64),
                        if replica.source_appliance.is_empty() {
                            "-"
                        } else {
                            replica.source_appliance.as_str()
                        }
                    )),
                ],
                None => vec![Line::from(
                    "this replica is no longer in the appliance's status",
                )],
            };
            frame.render_widget(Paragraph::new(text), inner);
            return;
        }
    }
    let group_status = group_name
        .as_deref()
        .and_then(|name| model.group_status(name));
    let points = group_status
        .map(|status| status.recovery_points.as_slice())
        .unwrap_or_default();
    let exports = group_status
        .map(|status| status.exports.as_slice())
        .unwrap_or_default();
    let info_height = info.len() as u16 + u16::from(sync_line.is_some());
    let export_lines = exports_lines(theme, group_status, exports);
    let exports_height = wrapped_height(&export_lines, inner.width).min(6);
    let points_height = (points.len() as u16 + 1).clamp(2, if exports.is_empty() { 6 } else { 4 });
    let [info_area, charts_area, exports_area, points_area] = Layout::vertical([
        Constraint::Length(info_height),
        Constraint::Min(6),
        Constraint::Length(exports_height),
        Constraint::Length(points_height),
    ])
    .areas(inner);
    if let Some(line) = sync_line {
        info.push(line);
    }
    frame.render_widget(Paragraph::new(info), info_area);
    if !export_lines.is_empty() {
        frame.render_widget(
            Paragraph::new(export_lines).wrap(Wrap { trim: false }),
            exports_area,
        );
    }

    let empty = History::default();
    let history = model.history.get(key).unwrap_or(&empty);
    let [churn_area, ship_area, rpo_area] =
        Layout::vertical([Constraint::Ratio(1, 3); 3]).areas(charts_area);
    draw_chart(
        theme,
        "churn",
        &history.churn_bytes_per_s,
        format::rate,
        1.0,
        churn_area,
        frame,
    );
    draw_chart(
        theme,
        "ship",
        &history.ship_bytes_per_s,
        format::rate,
        1.0,
        ship_area,
        frame,
    );
    draw_chart(
        theme,
        "RPO lag",
        &history.rpo_lag_seconds,
        format::seconds,
        1000.0,
        rpo_area,
        frame,
    );

    let usable = points.iter().filter(|point| point.usable).count();
    let mut lines = vec![Line::styled(
        format!(
            "recovery points of group {} ({}, {usable} usable, newest first)",
            group_label(group_name.as_deref().unwrap_or_default()),
            points.len()
        ),
        theme.title(),
    )];
    if points.is_empty() {
        let text = if snapshot.replicas.is_empty() {
            "none reported by this appliance (the target's catalog lists them)"
        } else {
            "none yet"
        };
        lines.push(Line::styled(text, theme.tone(Tone::Dim)));
    }
    for point in points.iter().rev() {
        lines.push(point_line(theme, point, snapshot.time_unix_ms));
    }
    // Wrapped: why a point is unusable matters more than the next older point.
    frame.render_widget(
        Paragraph::new(lines).wrap(Wrap { trim: false }),
        points_area,
    );
}

/// The failover section of a group's detail: what runs and the URI of every export, for an
/// operator to attach a VM or `qemu-img`/`nbdcopy` to.
fn exports_lines(
    theme: &Theme,
    status: Option<&ferry_appliance::control::GroupStatus>,
    exports: &[FailoverExport],
) -> Vec<Line<'static>> {
    let Some(first) = exports.first() else {
        return Vec::new();
    };
    let state = status.map_or(GroupState::Protected, |status| status.state);
    let mut lines = vec![Line::styled(
        format!(
            "{} {} exports at point #{} ({})",
            group_state_glyph(theme, state),
            if first.test {
                "test failover"
            } else {
                "failover"
            },
            first.point_id,
            exports.len()
        ),
        theme.title(),
    )];
    for export in exports {
        lines.push(Line::from(vec![
            Span::styled(format!("{} ", export.export_name), theme.tone(Tone::Accent)),
            Span::raw(export.uri.clone()),
        ]));
    }
    lines
}

/// Rows a paragraph of `lines` takes when wrapped at `width`.
fn wrapped_height(lines: &[Line], width: u16) -> u16 {
    lines
        .iter()
        .map(|line| (line.width() as u16).div_ceil(width.max(1)).max(1))
        .sum()
}

/// "journal full in 4m10s" when churn outruns shipping; when shipping keeps up, how soon the
/// target catches up.
fn forecast_span(theme: &Theme, disk: &DiskStatus) -> Span<'static> {
    let net = disk.churn_bytes_per_s - disk.ship_bytes_per_s;
    let free = disk
        .journal_capacity_bytes
        .saturating_sub(disk.journal_used_bytes) as f64;
    if disk.journal_capacity_bytes > 0 && net > 0.0 && disk.state == DiskState::Protected {
        let seconds = free / net;
        let tone = if seconds < 600.0 {
            Tone::Warn
        } else {
            Tone::Dim
        };
        Span::styled(
            format!("journal full in {} at this churn", format::seconds(seconds)),
            theme.tone(tone),
        )
    } else if journal_fraction(disk) > 0.0 && net < 0.0 {
        Span::styled(
            format!(
                "journal drains in {}",
                format::seconds(disk.journal_used_bytes as f64 / -net)
            ),
            theme.tone(Tone::Dim),
        )
    } else {
        Span::styled("journal steady", theme.tone(Tone::Dim))
    }
}

fn point_line(theme: &Theme, point: &RecoveryPointStatus, now_unix_ms: u64) -> Line<'static> {
    // Point ids are times in ms (13 digits), so the words stay short to leave room for why a
    // point is not usable.
    let (tone, word) = match (point.consistency, point.usable) {
        (PointConsistency::Crash, true) => (Tone::Ok, "crash-consistent"),
        (PointConsistency::App, true) => (Tone::Ok, "app-consistent"),
        (PointConsistency::Crash, false) => (Tone::Ok, "crash"),
        (PointConsistency::App, false) => (Tone::Ok, "app"),
        (PointConsistency::None, _) => (Tone::Warn, "NOT consistent"),
    };
    let age = now_unix_ms.saturating_sub(point.time_unix_ms) as f64 / 1000.0;
    let mut spans = vec![
        Span::raw(format!(
            "#{:<5} {} {:>6} ago ",
            point.id,
            format::clock(point.time_unix_ms),
            format::seconds(age)
        )),
        Span::styled(word, theme.tone(tone)),
    ];
    if !point.usable {
        spans.push(Span::styled(
            format!(
                " {} unusable{}",
                theme.glyph("✖", "X"),
                point
                    .unusable_reason
                    .as_deref()
                    .map(|reason| format!(": {reason}"))
                    .unwrap_or_default()
            ),
            theme.tone(Tone::Warn),
        ));
    }
    Line::from(spans)
}

/// A sparkline of the newest samples that fit, titled with the current value, the maximum and
/// the time span covered. `scale` turns values into the integers the sparkline wants.
fn draw_chart(
    theme: &Theme,
    name: &str,
    series: &Series,
    render: fn(f64) -> String,
    scale: f64,
    area: Rect,
    frame: &mut Frame,
) {
    let title = match series.last() {
        Some(last) => format!(
            " {name} {} now, max {}, last {} ",
            render(last),
            render(series.max()),
            format::seconds(series.span_ms() as f64 / 1000.0)
        ),
        None => format!(" {name}: no samples yet "),
    };
    let block = Block::default()
        .borders(Borders::TOP)
        .border_set(theme.border())
        .border_style(theme.tone(Tone::Dim))
        .title(Span::styled(title, Style::default()));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let width = inner.width as usize;
    let skip = series.samples.len().saturating_sub(width);
    let data: Vec<u64> = series
        .samples
        .iter()
        .skip(skip)
        .map(|(_, value)| (value * scale).max(0.0) as u64)
        .collect();
    let max = (series.max() * scale).max(1.0) as u64;
    frame.render_widget(
        Sparkline::default()
            .data(&data)
            .max(max)
            .bar_set(theme.bars())
            .style(theme.tone(Tone::Accent)),
        inner,
    );
}

fn draw_help(model: &Model, area: Rect, frame: &mut Frame) {
    let theme = &model.options.theme;
    let block = Block::default()
        .borders(Borders::TOP)
        .border_set(theme.border())
        .title(" help ");
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let mut lines = vec![
        Line::styled("move and look", theme.title()),
        Line::from("  ↑ ↓ / k j  select     PgUp PgDn g G  page, top, end     Tab  next group"),
        Line::from(
            "  Enter / l  detail     Esc / h  back     /  filter by name   !  problems only",
        ),
        Line::from("  z  freeze updates     L  action ledger  ?  this help        q  quit"),
        Line::from(""),
    ];
    if model.options.readonly {
        lines.push(Line::styled(
            "read-only console: actions are disabled (--readonly)",
            theme.tone(Tone::Accent),
        ));
    } else {
        lines.extend([
            Line::styled(
                "actions on the selected disk or its group (each states its consequence)",
                theme.title(),
            ),
            Line::from("  p  pause / resume shipping (at once, with a notice)"),
            Line::from("  r  recovery point now (crash- or app-consistent)     b  bandwidth limit"),
            Line::from(
                "  t  test failover to a usable recovery point          c  end a test failover",
            ),
            Line::from("  F  FAILOVER (pick a point, type the group's name)   R  reprotect"),
            Line::from(
                "  B  FAILBACK (type the group's name)   keys the group's state forbids say why",
            ),
            Line::from(
                "  in dialogs: Tab moves, Enter presses, Esc cancels; focus starts on Cancel",
            ),
        ]);
    }
    lines.extend([
        Line::from(""),
        Line::styled("reading the screen", theme.title()),
        Line::from(format!(
            "  {} ok  {} syncing  {} warning  {} critical  {} paused  {} failed over  {} reprotect",
            theme.glyph("✔", "+"),
            theme.glyph("↻", "~"),
            theme.glyph("▲", "!"),
            theme.glyph("✖", "X"),
            theme.glyph("‖", "="),
            theme.glyph("⇒", ">"),
            theme.glyph("⇐", "<"),
        )),
        Line::from(format!(
            "  group: {} protected {} test-failover {} failed-over {} reprotecting {} failing-back",
            group_state_glyph(theme, GroupState::Protected),
            group_state_glyph(theme, GroupState::TestFailover),
            group_state_glyph(theme, GroupState::FailedOver),
            group_state_glyph(theme, GroupState::Reprotecting),
            group_state_glyph(theme, GroupState::FailingBack),
        )),
        Line::from(
            "  RPO: lag behind the source, ! when over the group's threshold; POINT: age of",
        ),
        Line::from("  the group's newest usable recovery point; JOURNAL: cache journal fill."),
        Line::from("  Actions run in the appliance: closing this console never stops one halfway."),
    ]);
    let text = if theme.unicode {
        Text::from(lines)
    } else {
        Text::from(
            lines
                .into_iter()
                .map(|line| {
                    let style = line.style;
                    let text: String = line
                        .spans
                        .iter()
                        .map(|span| span.content.as_ref())
                        .collect();
                    Line::styled(text.replace("↑ ↓", "up down"), style)
                })
                .collect::<Vec<_>>(),
        )
    };
    frame.render_widget(Paragraph::new(text), inner);
}

fn draw_ledger(model: &Model, area: Rect, frame: &mut Frame) {
    let theme = &model.options.theme;
    let block = Block::default()
        .borders(Borders::TOP)
        .border_set(theme.border())
        .title(" actions sent from this console, newest first ");
    let inner = block.inner(area);
    frame.render_widget(block, area);
    if model.ledger.is_empty() {
        frame.render_widget(
            Paragraph::new(Line::styled("no actions yet", theme.tone(Tone::Dim))),
            inner,
        );
        return;
    }
    let lines: Vec<Line> = model
        .ledger
        .iter()
        .rev()
        .take(inner.height as usize)
        .flat_map(|entry| {
            let age = format::seconds(model.now_ms.saturating_sub(entry.sent_ms) as f64 / 1000.0);
            let (tone, result) = match &entry.outcome {
                Outcome::Pending => (Tone::Info, format!("{} waiting", theme.glyph("…", "..."))),
                Outcome::Done(message) => {
                    (Tone::Ok, format!("{} {message}", theme.glyph("✔", "+")))
                }
                Outcome::Failed(message) => (
                    Tone::Critical,
                    format!("{} {message}", theme.glyph("✖", "X")),
                ),
            };
            let mut entry_lines = vec![Line::from(vec![
                Span::raw(format!(
                    "#{:<3} {:>6} ago  {}: ",
                    entry.id, age, entry.description
                )),
                Span::styled(result, theme.tone(tone)),
            ])];
            entry_lines.extend(
                entry
                    .details
                    .iter()
                    .map(|detail| Line::from(format!("  {detail}"))),
            );
            entry_lines
        })
        .collect();
    frame.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }), inner);
}

fn consequence(model: &Model, dialog: &Dialog) -> String {
    let group = &dialog.group;
    let disks = format!(
        "{} disk{}",
        dialog.disk_count,
        if dialog.disk_count == 1 { "" } else { "s" }
    );
    let machines = if dialog.machines.is_empty() {
        "-".to_string()
    } else {
        dialog.machines.join(", ")
    };
    match dialog.action {
        DialogAction::RecoveryPoint if dialog.app_consistent => format!(
            "Runs the freeze hook on {machines}, cuts an app-consistent recovery point of group \
             {group} ({disks}), then thaws them: their applications pause briefly."
        ),
        DialogAction::RecoveryPoint => format!(
            "Cuts a crash-consistent recovery point of group {group} now: one common write-order \
             point across its {disks}. Nothing is paused."
        ),
        DialogAction::Bandwidth => {
            let link = model.snapshot.as_ref().and_then(|s| s.link.as_ref());
            let peer = link.map(|l| l.peer.as_str()).filter(|p| !p.is_empty()).unwrap_or("the target");
            let now = link
                .and_then(|l| l.bandwidth_limit_bytes_per_s)
                .map_or_else(|| "no limit".to_string(), |limit| format::rate(limit as f64));
            format!(
                "Limits replication from this appliance to {peer} (now: {now}). Below the churn, \
                 RPO lag grows and the journal fills. Empty or 0 removes the limit."
            )
        }
        DialogAction::TestFailover => format!(
            "Brings up copies of group {group}'s {disks} on {machines} at the chosen point, beside \
             the replicas. Replication keeps running and the source is untouched. c cleans up."
        ),
        DialogAction::FailoverCleanup => format!(
            "Deletes the test-failover copies of group {group}. Anything written to them is lost; \
             the replicas and replication are untouched."
        ),
        DialogAction::Failover => format!(
            "Fails group {group} over to the chosen point: the target copies of its {disks} on \
             {machines} become the live disks and replication stops. Writes on the source after \
             that point are NOT in the failed-over copies."
        ),
        DialogAction::Reprotect => format!(
            "Replicates the failed-over copies of group {group} ({disks}) back towards the \
             original site: the original disks are overwritten where they differ."
        ),
        DialogAction::Failback => format!(
            "Moves group {group} ({disks} on {machines}) back to its original site: the failed-over \
             copies stop being live and the original disks take over at the last replicated state."
        ),
    }
}

/// What a failover to `point` would bring up, before the operator confirms: the data-loss
/// window (writes after the point are not in the copies), the point's consistency, and the
/// machines and disks involved.
fn failover_preview(
    model: &Model,
    dialog: &Dialog,
    point: &RecoveryPointStatus,
    now_unix_ms: u64,
) -> Vec<Line<'static>> {
    let theme = &model.options.theme;
    let loss_seconds = now_unix_ms.saturating_sub(point.time_unix_ms) as f64 / 1000.0;
    let consistency = match point.consistency {
        PointConsistency::Crash => "crash-consistent (one write order across the group)",
        PointConsistency::App => "app-consistent (applications were quiesced)",
        PointConsistency::None => "NOT consistent",
    };
    let mut lines = vec![Line::from(vec![
        Span::styled("  data-loss window ", theme.title()),
        Span::styled(
            format::seconds(loss_seconds),
            theme.tone(if loss_seconds > 300.0 {
                Tone::Warn
            } else {
                Tone::Ok
            }),
        ),
        Span::raw(format!(
            ": writes after {} are not in the copies",
            format::clock(point.time_unix_ms)
        )),
    ])];
    lines.push(Line::from(vec![
        Span::styled("  consistency ", theme.title()),
        Span::raw(consistency),
    ]));
    if !dialog.machines.is_empty() {
        lines.push(Line::from(vec![
            Span::styled("  machines ", theme.title()),
            Span::raw(format!(
                "{} ({} disk{})",
                dialog.machines.join(", "),
                dialog.disk_count,
                if dialog.disk_count == 1 { "" } else { "s" }
            )),
        ]));
    }
    lines
}

fn focus_marker(dialog: &Dialog, field: Focus) -> &'static str {
    if dialog.focus == field {
        ">"
    } else {
        " "
    }
}

fn draw_dialog(model: &Model, dialog: &Dialog, body: Rect, frame: &mut Frame) {
    let theme = &model.options.theme;
    let dangerous = matches!(
        dialog.action,
        DialogAction::Failover | DialogAction::Failback
    );
    let width = body.width.saturating_sub(4).min(76);
    let inner_width = width.saturating_sub(4);
    let consequence = consequence(model, dialog);
    let mut lines: Vec<Line> = Vec::new();
    lines.push(Line::from(consequence));
    lines.push(Line::from(""));
    let fields = dialog.action.fields();
    if fields.contains(&Focus::Points) {
        lines.push(Line::from(vec![
            Span::raw(focus_marker(dialog, Focus::Points)),
            Span::styled(
                " usable recovery point (↑↓ to choose):".replace("↑↓", theme.glyph("↑↓", "j/k")),
                theme.title(),
            ),
        ]));
        let now = model.appliance_now_unix_ms();
        let shown = if body.height >= 21 { 3usize } else { 2 };
        let start = dialog.point_index.saturating_sub(shown - 1);
        for (index, point) in dialog.points.iter().enumerate().skip(start).take(shown) {
            let chosen = index == dialog.point_index;
            let mark = if chosen {
                theme.glyph("●", "*")
            } else {
                theme.glyph("○", "o")
            };
            let text = format!(
                "  {mark} #{} {} {}",
                point.id,
                format::clock(point.time_unix_ms),
                point.consistency.as_str(),
            );
            let style = if chosen {
                theme.title()
            } else {
                Style::default()
            };
            lines.push(Line::styled(text, style));
        }
        let hidden = dialog.points.len().saturating_sub(start + shown);
        let unusable = model.group_status(&dialog.group).map_or(0, |status| {
            status.recovery_points.iter().filter(|p| !p.usable).count()
        });
        if hidden > 0 || unusable > 0 {
            let mut notes = Vec::new();
            if hidden > 0 {
                notes.push(format!("{hidden} older below"));
            }
            if unusable > 0 {
                notes.push(format!("{unusable} unusable not offered"));
            }
            lines.push(Line::styled(
                format!("    ({})", notes.join(", ")),
                theme.tone(Tone::Dim),
            ));
        }
        if let Some(point) = dialog.points.get(dialog.point_index) {
            lines.extend(failover_preview(model, dialog, point, now));
        }
    }
    if fields.contains(&Focus::Kind) {
        let (crash, app) = if dialog.app_consistent {
            (" ", "x")
        } else {
            ("x", " ")
        };
        lines.push(Line::from(
            format!(
                "{} kind: ({crash}) crash-consistent   ({app}) app-consistent   (←/→ to change)",
                focus_marker(dialog, Focus::Kind)
            )
            .replace("←/→", theme.glyph("←/→", "left/right")),
        ));
    }
    if fields.contains(&Focus::Input) {
        let prompt = if dialog.action == DialogAction::Bandwidth {
            "limit in MB/s (empty: no limit):".to_string()
        } else {
            format!("type the group's name ({}) to confirm:", dialog.group)
        };
        let cursor = if dialog.focus == Focus::Input {
            "_"
        } else {
            ""
        };
        lines.push(Line::from(vec![
            Span::raw(format!("{} {prompt} ", focus_marker(dialog, Focus::Input))),
            Span::styled(format!("[{}{cursor}]", dialog.input), theme.title()),
        ]));
    }
    if let Some(error) = &dialog.error {
        lines.push(Line::styled(error.clone(), theme.tone(Tone::Critical)));
    }
    lines.push(Line::from(""));
    let button = |label: &str, field: Focus| {
        let focused = dialog.focus == field;
        let text = if focused {
            format!("> {label} <")
        } else {
            format!("  {label}  ")
        };
        let style = if focused {
            theme.selected()
        } else {
            Style::default()
        };
        Span::styled(format!("[{text}]"), style)
    };
    lines.push(Line::from(vec![
        button("Cancel", Focus::Cancel),
        Span::raw("   "),
        button(dialog.action.confirm_label(), Focus::Confirm),
        Span::styled("   Tab moves, Esc cancels", theme.tone(Tone::Dim)),
    ]));
    let text = Text::from(lines);
    // Height: wrapped lines of the text plus the border.
    let wrapped: u16 = text
        .lines
        .iter()
        .map(|line| (line.width() as u16).div_ceil(inner_width.max(1)).max(1))
        .sum();
    let height = (wrapped + 2).min(body.height);
    let area = Rect {
        x: body.x + (body.width.saturating_sub(width)) / 2,
        y: body.y + (body.height.saturating_sub(height)) / 2,
        width,
        height,
    };
    let title_style = if dangerous {
        theme.tone(Tone::Critical)
    } else {
        theme.title()
    };
    let block = Block::default()
        .borders(Borders::ALL)
        .border_set(theme.border())
        .title(Span::styled(dialog_title(theme, dialog), title_style))
        .padding(ratatui::widgets::Padding::horizontal(1));
    frame.render_widget(Clear, area);
    frame.render_widget(
        Paragraph::new(text).block(block).wrap(Wrap { trim: false }),
        area,
    );
}

fn dialog_title(theme: &Theme, dialog: &Dialog) -> String {
    if dialog.group.is_empty() {
        format!(" {} ", dialog.action.title())
    } else {
        format!(
            " {} {} group {} ",
            dialog.action.title(),
            theme.glyph("·", "-"),
            dialog.group
        )
    }
}
