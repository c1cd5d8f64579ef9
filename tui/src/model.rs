//! The console's model: the latest status snapshot, what is derived from it (rows sorted
//! problems first, alerts, per-disk and per-group history for the charts), and the operator's
//! own state (selection, screen, dialog, filter, action ledger). Only `update` changes it.

use std::collections::{HashMap, VecDeque};

use ferry_appliance::control::{
    DiskState, DiskStatus, GroupState, GroupStatus, RecoveryPointStatus, StatusSnapshot,
};

use crate::theme::Theme;

/// Samples kept per series: ten minutes at the appliance's one snapshot per second.
pub const HISTORY_SAMPLES_MAX: usize = 600;
/// Actions kept in the ledger.
pub const LEDGER_ENTRIES_MAX: usize = 200;
/// Journal fill above which a disk raises an alert (issue 6: "journal over 80%").
pub const JOURNAL_ALERT_FRACTION: f64 = 0.8;
/// Journal fill above which the alert becomes critical: the next burst drops to the bitmap.
pub const JOURNAL_CRITICAL_FRACTION: f64 = 0.95;
/// How long a toast stays on the footer line.
pub const TOAST_MS: u64 = 6_000;

/// How bad something is; rows and alerts sort by it, worst first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    Ok,
    /// Something in progress that needs no action (initial sync, resync, reprotect).
    Info,
    Warn,
    Critical,
}

/// What a row, a detail screen or an action refers to; stable across snapshots, unlike indices.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ItemKey {
    Group(String),
    Disk { machine: String, name: String },
    Replica { machine: String, name: String },
}

impl ItemKey {
    pub fn label(&self) -> String {
        match self {
            Self::Group(name) => format!("group {}", group_label(name)),
            Self::Disk { machine, name } => format!("{machine}/{name}"),
            Self::Replica { machine, name } => format!("replica {machine}/{name}"),
        }
    }
}

/// The name shown for a group; disks outside any group live in the unnamed one.
pub fn group_label(name: &str) -> &str {
    if name.is_empty() {
        "(no group)"
    } else {
        name
    }
}

/// One line of the overview table, pointing into the displayed snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Row {
    /// Index into `Model::groups`.
    Group(usize),
    /// Index into `snapshot.disks`.
    Disk(usize),
    /// Index into `snapshot.replicas`.
    Replica(usize),
}

/// A consistency group as derived from a snapshot: its status (if the appliance sent one) and
/// the disks that name it, worst first.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupView {
    pub name: String,
    /// Index into `snapshot.groups`.
    pub status: Option<usize>,
    pub disks: Vec<usize>,
    pub severity: Severity,
    pub churn_bytes_per_s: f64,
    pub ship_bytes_per_s: f64,
    pub rpo_lag_seconds_max: f64,
    pub journal_used_bytes: u64,
    pub journal_capacity_bytes: u64,
}

/// A line of the alert bar.
#[derive(Clone, Debug, PartialEq)]
pub struct Alert {
    pub severity: Severity,
    pub text: String,
    /// What to open when the operator jumps to it.
    pub item: Option<ItemKey>,
}

/// A time series with a bounded length.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Series {
    /// (snapshot time in ms since the epoch, value)
    pub samples: VecDeque<(u64, f64)>,
}

impl Series {
    pub fn push(&mut self, time_unix_ms: u64, value: f64) {
        if self
            .samples
            .back()
            .is_some_and(|(last, _)| *last >= time_unix_ms)
        {
            return; // the same snapshot again (or a clock step back): keep the series monotonic
        }
        if self.samples.len() == HISTORY_SAMPLES_MAX {
            self.samples.pop_front();
        }
        self.samples
            .push_back((time_unix_ms, if value.is_finite() { value } else { 0.0 }));
    }

    pub fn last(&self) -> Option<f64> {
        self.samples.back().map(|(_, value)| *value)
    }

    pub fn max(&self) -> f64 {
        self.samples
            .iter()
            .map(|(_, value)| *value)
            .fold(0.0, f64::max)
    }

    /// Milliseconds between the first and the last sample.
    pub fn span_ms(&self) -> u64 {
        match (self.samples.front(), self.samples.back()) {
            (Some((first, _)), Some((last, _))) => last - first,
            _ => 0,
        }
    }
}

/// The charts' data for one disk or group.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct History {
    pub churn_bytes_per_s: Series,
    pub ship_bytes_per_s: Series,
    pub rpo_lag_seconds: Series,
}

/// Whether the console currently hears from the appliance.
#[derive(Clone, Debug, PartialEq)]
pub enum Connection {
    Connecting,
    Live,
    Disconnected { reason: String },
}

#[derive(Clone, Debug, PartialEq)]
pub enum Screen {
    Overview,
    Detail(ItemKey),
    Help,
    Actions,
}

/// An action that needs a dialog; pause and resume need none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DialogAction {
    RecoveryPoint,
    Bandwidth,
    TestFailover,
    FailoverCleanup,
    Failover,
    Reprotect,
    Failback,
}

impl DialogAction {
    pub fn title(self) -> &'static str {
        match self {
            Self::RecoveryPoint => "Recovery point now",
            Self::Bandwidth => "Bandwidth limit",
            Self::TestFailover => "Test failover",
            Self::FailoverCleanup => "Clean up test failover",
            Self::Failover => "FAILOVER",
            Self::Reprotect => "Reprotect",
            Self::Failback => "FAILBACK",
        }
    }

    pub fn confirm_label(self) -> &'static str {
        match self {
            Self::RecoveryPoint => "Cut point",
            Self::Bandwidth => "Set limit",
            Self::TestFailover => "Start test",
            Self::FailoverCleanup => "Delete copies",
            Self::Failover => "Fail over",
            Self::Reprotect => "Reprotect",
            Self::Failback => "Fail back",
        }
    }

    /// The fields the dialog has, in Tab order; focus starts on Cancel.
    pub fn fields(self) -> &'static [Focus] {
        match self {
            Self::RecoveryPoint => &[Focus::Kind, Focus::Cancel, Focus::Confirm],
            Self::Bandwidth => &[Focus::Input, Focus::Cancel, Focus::Confirm],
            Self::TestFailover => &[Focus::Points, Focus::Cancel, Focus::Confirm],
            Self::FailoverCleanup | Self::Reprotect => &[Focus::Cancel, Focus::Confirm],
            Self::Failover => &[Focus::Points, Focus::Input, Focus::Cancel, Focus::Confirm],
            Self::Failback => &[Focus::Input, Focus::Cancel, Focus::Confirm],
        }
    }

    /// Whether the operator must type the group's name to confirm.
    pub fn needs_typed_name(self) -> bool {
        matches!(self, Self::Failover | Self::Failback)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Focus {
    Points,
    Kind,
    Input,
    Cancel,
    Confirm,
}

/// An open confirmation dialog.
#[derive(Clone, Debug, PartialEq)]
pub struct Dialog {
    pub action: DialogAction,
    pub group: String,
    pub focus: Focus,
    /// Recovery point kind: crash (false) or app-consistent (true).
    pub app_consistent: bool,
    /// The typed group name, or the bandwidth limit in MB/s.
    pub input: String,
    /// The usable points offered by the picker, newest first, taken when the dialog opened so
    /// the list does not move under the cursor. What the operator picks is what they get: no
    /// "latest at failover time" entry whose data-loss window nobody could preview.
    pub points: Vec<RecoveryPointStatus>,
    pub point_index: usize,
    /// Why the last confirm attempt was refused.
    pub error: Option<String>,
    /// How many disks and machines the action touches, for the consequence text.
    pub disk_count: usize,
    pub machines: Vec<String>,
}

/// An action sent to the appliance and, once it answered, its result.
#[derive(Clone, Debug, PartialEq)]
pub struct LedgerEntry {
    pub id: u64,
    pub description: String,
    /// Console clock (ms since start) when it was sent.
    pub sent_ms: u64,
    pub outcome: Outcome,
    /// What the answer carried beyond its summary: a failover's export URIs and machine
    /// definitions, one per line.
    pub details: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Pending,
    Done(String),
    Failed(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Toast {
    pub severity: Severity,
    pub text: String,
    pub expires_ms: u64,
}

/// Fixed choices made at start-up.
#[derive(Clone, Debug)]
pub struct Options {
    pub readonly: bool,
    pub theme: Theme,
    /// What the console talks to, for the header ("socket /run/ferry/control.sock").
    pub endpoint: String,
}

/// Everything the view draws from.
#[derive(Clone, Debug)]
pub struct Model {
    pub options: Options,
    pub connection: Connection,
    /// The displayed snapshot.
    pub snapshot: Option<StatusSnapshot>,
    /// Console clock when the displayed snapshot arrived.
    pub snapshot_received_ms: u64,
    /// Frozen: new snapshots wait here instead of moving the screen under the operator.
    pub frozen: bool,
    pub pending: Option<StatusSnapshot>,
    pub groups: Vec<GroupView>,
    pub rows: Vec<Row>,
    pub alerts: Vec<Alert>,
    pub history: HashMap<ItemKey, History>,
    pub selected: usize,
    pub screen: Screen,
    pub dialog: Option<Dialog>,
    pub filter: String,
    pub filter_editing: bool,
    pub problems_only: bool,
    pub toast: Option<Toast>,
    pub ledger: VecDeque<LedgerEntry>,
    pub next_action_id: u64,
    /// Console clock: ms since the console started, advanced by `Msg::Tick`.
    pub now_ms: u64,
    pub width: u16,
    pub height: u16,
}

impl Model {
    pub fn new(options: Options, width: u16, height: u16) -> Self {
        Self {
            options,
            connection: Connection::Connecting,
            snapshot: None,
            snapshot_received_ms: 0,
            frozen: false,
            pending: None,
            groups: Vec::new(),
            rows: Vec::new(),
            alerts: Vec::new(),
            history: HashMap::new(),
            selected: 0,
            screen: Screen::Overview,
            dialog: None,
            filter: String::new(),
            filter_editing: false,
            problems_only: false,
            toast: None,
            ledger: VecDeque::new(),
            next_action_id: 1,
            now_ms: 0,
            width,
            height,
        }
    }

    /// Takes a new snapshot: records history, derives groups, alerts and rows, and keeps the
    /// selection on the same item when it still exists.
    pub fn apply_snapshot(&mut self, snapshot: StatusSnapshot) {
        let selected_key = self.selected_key();
        self.record_history(&snapshot);
        self.snapshot = Some(snapshot);
        self.snapshot_received_ms = self.now_ms;
        self.derive();
        self.select_key(selected_key);
    }

    /// Recomputes groups, alerts and rows from the displayed snapshot and the filters.
    pub fn derive(&mut self) {
        let Some(snapshot) = &self.snapshot else {
            self.groups.clear();
            self.alerts.clear();
            self.rows.clear();
            return;
        };
        self.groups = derive_groups(snapshot);
        self.alerts = derive_alerts(snapshot, &self.groups);
        self.rows = derive_rows(snapshot, &self.groups, &self.filter, self.problems_only);
        if self.selected >= self.rows.len() {
            self.selected = self.rows.len().saturating_sub(1);
        }
    }

    fn record_history(&mut self, snapshot: &StatusSnapshot) {
        let time = snapshot.time_unix_ms;
        let mut seen: Vec<ItemKey> = Vec::with_capacity(snapshot.disks.len() + 8);
        let mut group_sums: HashMap<&str, (f64, f64, f64)> = HashMap::new();
        for disk in &snapshot.disks {
            let key = ItemKey::Disk {
                machine: disk.machine.clone(),
                name: disk.name.clone(),
            };
            let history = self.history.entry(key.clone()).or_default();
            history.churn_bytes_per_s.push(time, disk.churn_bytes_per_s);
            history.ship_bytes_per_s.push(time, disk.ship_bytes_per_s);
            history.rpo_lag_seconds.push(time, disk.rpo_lag_seconds);
            seen.push(key);
            let sums = group_sums.entry(disk.group.as_str()).or_default();
            sums.0 += disk.churn_bytes_per_s;
            sums.1 += disk.ship_bytes_per_s;
            sums.2 = sums.2.max(disk.rpo_lag_seconds);
        }
        for (group, (churn, ship, rpo)) in group_sums {
            let key = ItemKey::Group(group.to_string());
            let history = self.history.entry(key.clone()).or_default();
            history.churn_bytes_per_s.push(time, churn);
            history.ship_bytes_per_s.push(time, ship);
            history.rpo_lag_seconds.push(time, rpo);
            seen.push(key);
        }
        // Disks that left the configuration stop costing memory.
        if self.history.len() > seen.len() {
            let seen: std::collections::HashSet<ItemKey> = seen.into_iter().collect();
            self.history.retain(|key, _| seen.contains(key));
        }
    }

    pub fn selected_row(&self) -> Option<Row> {
        self.rows.get(self.selected).copied()
    }

    pub fn row_key(&self, row: Row) -> Option<ItemKey> {
        let snapshot = self.snapshot.as_ref()?;
        Some(match row {
            Row::Group(index) => ItemKey::Group(self.groups.get(index)?.name.clone()),
            Row::Disk(index) => {
                let disk = snapshot.disks.get(index)?;
                ItemKey::Disk {
                    machine: disk.machine.clone(),
                    name: disk.name.clone(),
                }
            }
            Row::Replica(index) => {
                let replica = snapshot.replicas.get(index)?;
                ItemKey::Replica {
                    machine: replica.machine.clone(),
                    name: replica.name.clone(),
                }
            }
        })
    }

    pub fn selected_key(&self) -> Option<ItemKey> {
        self.selected_row().and_then(|row| self.row_key(row))
    }

    pub fn select_key(&mut self, key: Option<ItemKey>) {
        let Some(key) = key else { return };
        if let Some(index) =
            (0..self.rows.len()).find(|&i| self.row_key(self.rows[i]).as_ref() == Some(&key))
        {
            self.selected = index;
        }
    }

    pub fn disk(&self, machine: &str, name: &str) -> Option<&DiskStatus> {
        self.snapshot
            .as_ref()?
            .disks
            .iter()
            .find(|disk| disk.machine == machine && disk.name == name)
    }

    pub fn group_view(&self, name: &str) -> Option<&GroupView> {
        self.groups.iter().find(|group| group.name == name)
    }

    pub fn group_status(&self, name: &str) -> Option<&GroupStatus> {
        self.snapshot
            .as_ref()?
            .groups
            .iter()
            .find(|group| group.name == name)
    }

    /// The consistency group an item belongs to (a disk's group, or the group itself).
    pub fn group_of(&self, key: &ItemKey) -> Option<String> {
        match key {
            ItemKey::Group(name) => Some(name.clone()),
            ItemKey::Disk { machine, name } => Some(self.disk(machine, name)?.group.clone()),
            ItemKey::Replica { .. } => None,
        }
    }

    /// The group's place in the failover life cycle (protected when the appliance says nothing).
    pub fn group_state(&self, name: &str) -> GroupState {
        self.group_status(name)
            .map_or(GroupState::Protected, |status| status.state)
    }

    /// The appliance's clock now, estimated from the displayed snapshot and the console time
    /// since it arrived (the view reads no clock).
    pub fn appliance_now_unix_ms(&self) -> u64 {
        self.snapshot.as_ref().map_or(0, |snapshot| {
            snapshot.time_unix_ms + self.now_ms.saturating_sub(self.snapshot_received_ms)
        })
    }

    /// The group's points a failover may use, newest first.
    pub fn usable_points(&self, group: &str) -> Vec<RecoveryPointStatus> {
        self.group_status(group).map_or_else(Vec::new, |status| {
            status
                .recovery_points
                .iter()
                .rev()
                .filter(|point| point.usable)
                .cloned()
                .collect()
        })
    }

    /// Why `action` cannot run on `group` now (its state forbids it, or this appliance is not
    /// the one that carries it out), or `None` when it can. The console refuses with this reason
    /// before any dialog, and leaves the key out of the footer's hints.
    pub fn action_refusal(&self, action: DialogAction, group: &str) -> Option<String> {
        let snapshot = self.snapshot.as_ref()?;
        let state = self.group_state(group);
        let has_disks = self
            .group_view(group)
            .is_some_and(|view| !view.disks.is_empty());
        let has_replicas = !snapshot.replicas.is_empty();
        let state_word = state.as_str();
        let on_target = "failover runs on the target appliance (the one with the replicas): \
                         open the console on its control socket";
        match action {
            DialogAction::Bandwidth => snapshot
                .disks
                .is_empty()
                .then(|| "this appliance ships nothing: the limit is set on a source".to_string()),
            DialogAction::RecoveryPoint => {
                if !has_disks {
                    Some(format!(
                        "recovery points are cut on the source: this appliance has no disks of \
                         group {group}"
                    ))
                } else if !matches!(state, GroupState::Protected | GroupState::TestFailover) {
                    Some(format!(
                        "group {group} is {state_word}: its source no longer replicates"
                    ))
                } else {
                    None
                }
            }
            DialogAction::TestFailover | DialogAction::Failover => {
                if !has_replicas {
                    Some(on_target.to_string())
                } else if state == GroupState::TestFailover {
                    Some(format!(
                        "a test failover of group {group} is running: c cleans it up first"
                    ))
                } else if state != GroupState::Protected {
                    Some(format!("group {group} is {state_word} already"))
                } else if self.usable_points(group).is_empty() {
                    let newest = self
                        .group_status(group)
                        .and_then(|status| status.recovery_points.last());
                    Some(
                        match newest.and_then(|point| point.unusable_reason.as_ref()) {
                            Some(reason) => format!(
                                "group {group} has no usable recovery point yet (the newest, #{}, \
                             is {reason})",
                                newest.map_or(0, |point| point.id)
                            ),
                            None => format!(
                                "group {group} has no usable recovery point yet (one is cut every \
                             interval once its disks are protected; r cuts one now)"
                            ),
                        },
                    )
                } else {
                    None
                }
            }
            DialogAction::FailoverCleanup => (state != GroupState::TestFailover).then(|| {
                format!("cleanup ends a test failover, and group {group} is {state_word}")
            }),
            DialogAction::Reprotect => (state != GroupState::FailedOver).then(|| {
                format!("reprotect follows a failover, and group {group} is {state_word}")
            }),
            DialogAction::Failback => (state != GroupState::Reprotecting).then(|| {
                format!(
                    "failback needs a reprotected group (R after a failover), and group {group} \
                     is {state_word}"
                )
            }),
        }
    }

    pub fn worst_alert(&self) -> Option<Severity> {
        self.alerts.iter().map(|alert| alert.severity).max()
    }
}

/// The fraction of the journal in use; 0 when the capacity is unknown.
pub fn journal_fraction(disk: &DiskStatus) -> f64 {
    if disk.journal_capacity_bytes == 0 {
        0.0
    } else {
        disk.journal_used_bytes as f64 / disk.journal_capacity_bytes as f64
    }
}

/// Whether a disk's RPO lag counts against its group's threshold: before the first full copy
/// there is no recovery point to lag behind.
fn rpo_applies(disk: &DiskStatus) -> bool {
    !matches!(disk.state, DiskState::InitialSync | DiskState::FailedOver)
}

/// How bad a disk is, against its group's RPO threshold (if the group is known).
pub fn disk_severity(disk: &DiskStatus, rpo_threshold_seconds: Option<f64>) -> Severity {
    let mut severity = match disk.state {
        DiskState::Protected => Severity::Ok,
        DiskState::InitialSync
        | DiskState::Resyncing
        | DiskState::Reprotecting
        | DiskState::FailedOver => Severity::Info,
        DiskState::Paused => Severity::Warn,
        DiskState::ResyncNeeded => Severity::Critical,
    };
    if let Some(threshold) = rpo_threshold_seconds {
        if rpo_applies(disk) && disk.rpo_lag_seconds > threshold {
            severity = severity.max(Severity::Critical);
        }
    }
    let fill = journal_fraction(disk);
    if fill > JOURNAL_CRITICAL_FRACTION {
        severity = severity.max(Severity::Critical);
    } else if fill > JOURNAL_ALERT_FRACTION {
        severity = severity.max(Severity::Warn);
    }
    severity
}

/// Groups in problems-first order: every group the appliance reports, plus the ones disks name
/// without a status (and the unnamed group of ungrouped disks).
pub fn derive_groups(snapshot: &StatusSnapshot) -> Vec<GroupView> {
    let mut by_name: HashMap<&str, usize> = HashMap::new();
    let mut groups: Vec<GroupView> = Vec::new();
    let new_group = |name: &str, status: Option<usize>| GroupView {
        name: name.to_string(),
        status,
        disks: Vec::new(),
        severity: Severity::Ok,
        churn_bytes_per_s: 0.0,
        ship_bytes_per_s: 0.0,
        rpo_lag_seconds_max: 0.0,
        journal_used_bytes: 0,
        journal_capacity_bytes: 0,
    };
    for (index, group) in snapshot.groups.iter().enumerate() {
        if !by_name.contains_key(group.name.as_str()) {
            by_name.insert(&group.name, groups.len());
            groups.push(new_group(&group.name, Some(index)));
        }
    }
    for (index, disk) in snapshot.disks.iter().enumerate() {
        let group_index = *by_name.entry(&disk.group).or_insert_with(|| {
            groups.push(new_group(&disk.group, None));
            groups.len() - 1
        });
        let threshold = groups[group_index]
            .status
            .map(|status| snapshot.groups[status].rpo_threshold_seconds);
        let group = &mut groups[group_index];
        group.disks.push(index);
        group.severity = group.severity.max(disk_severity(disk, threshold));
        group.churn_bytes_per_s += disk.churn_bytes_per_s;
        group.ship_bytes_per_s += disk.ship_bytes_per_s;
        if rpo_applies(disk) {
            group.rpo_lag_seconds_max = group.rpo_lag_seconds_max.max(disk.rpo_lag_seconds);
        }
        group.journal_used_bytes += disk.journal_used_bytes;
        group.journal_capacity_bytes += disk.journal_capacity_bytes;
    }
    for group in &mut groups {
        if let Some(status) = group.status.map(|index| &snapshot.groups[index]) {
            if point_overdue(status) {
                group.severity = group.severity.max(Severity::Warn);
            }
        }
        let disks = &snapshot.disks;
        let threshold = group
            .status
            .map(|index| snapshot.groups[index].rpo_threshold_seconds);
        group.disks.sort_by(|&a, &b| {
            disk_severity(&disks[b], threshold)
                .cmp(&disk_severity(&disks[a], threshold))
                .then_with(|| disks[a].machine.cmp(&disks[b].machine))
                .then_with(|| disks[a].name.cmp(&disks[b].name))
        });
    }
    groups.sort_by(|a, b| {
        b.severity
            .cmp(&a.severity)
            .then_with(|| a.name.cmp(&b.name))
    });
    groups
}

/// A group whose newest recovery point is older than two intervals is missing points.
fn point_overdue(status: &GroupStatus) -> bool {
    status.recovery_point_interval_seconds > 0.0
        && status
            .latest_point_age_seconds
            .is_some_and(|age| age > 2.0 * status.recovery_point_interval_seconds)
}

/// The alert line: RPO over threshold, journal over 80%, resync needed, overdue recovery
/// points, link down, peer refused — worst first.
pub fn derive_alerts(snapshot: &StatusSnapshot, groups: &[GroupView]) -> Vec<Alert> {
    let mut alerts = Vec::new();
    if let Some(link) = &snapshot.link {
        let refused = link
            .last_error
            .as_deref()
            .filter(|error| error.contains("refused"));
        if let Some(error) = refused {
            alerts.push(Alert {
                severity: Severity::Critical,
                text: error.to_string(),
                item: None,
            });
        } else if !link.connected {
            let why = link
                .last_error
                .as_deref()
                .map(|error| format!(": {error}"))
                .unwrap_or_default();
            let peer = if link.peer.is_empty() {
                "peer"
            } else {
                link.peer.as_str()
            };
            alerts.push(Alert {
                severity: Severity::Critical,
                text: format!("link down to {peer}{why}"),
                item: None,
            });
        }
    }
    for group in groups {
        let status = group.status.map(|index| &snapshot.groups[index]);
        let threshold = status.map(|status| status.rpo_threshold_seconds);
        for &index in &group.disks {
            let disk = &snapshot.disks[index];
            let item = Some(ItemKey::Disk {
                machine: disk.machine.clone(),
                name: disk.name.clone(),
            });
            let label = format!("{}/{}", disk.machine, disk.name);
            if let Some(threshold) = threshold {
                if rpo_applies(disk) && disk.rpo_lag_seconds > threshold {
                    alerts.push(Alert {
                        severity: Severity::Critical,
                        text: format!(
                            "{label} RPO {} > {}",
                            crate::format::seconds(disk.rpo_lag_seconds),
                            crate::format::seconds(threshold)
                        ),
                        item: item.clone(),
                    });
                }
            }
            if disk.state == DiskState::ResyncNeeded {
                alerts.push(Alert {
                    severity: Severity::Critical,
                    text: format!("{label} journal overflowed: resync needed"),
                    item: item.clone(),
                });
            }
            let fill = journal_fraction(disk);
            if fill > JOURNAL_ALERT_FRACTION {
                alerts.push(Alert {
                    severity: if fill > JOURNAL_CRITICAL_FRACTION {
                        Severity::Critical
                    } else {
                        Severity::Warn
                    },
                    text: format!("{label} journal {:.0}%", fill * 100.0),
                    item: item.clone(),
                });
            }
            if disk.state == DiskState::Paused {
                alerts.push(Alert {
                    severity: Severity::Warn,
                    text: format!("{label} paused"),
                    item,
                });
            }
        }
        if let Some(status) = status.filter(|status| point_overdue(status)) {
            alerts.push(Alert {
                severity: Severity::Warn,
                text: format!(
                    "group {} last usable recovery point {} ago",
                    status.name,
                    crate::format::seconds(status.latest_point_age_seconds.unwrap_or(0.0))
                ),
                item: Some(ItemKey::Group(status.name.clone())),
            });
        }
    }
    alerts.sort_by_key(|alert| std::cmp::Reverse(alert.severity));
    alerts
}

/// The overview's rows: each group header followed by its disks, then the replicas of a
/// target appliance. The text filter matches group, machine or disk names; "problems only"
/// keeps disks and groups at warning or worse.
pub fn derive_rows(
    snapshot: &StatusSnapshot,
    groups: &[GroupView],
    filter: &str,
    problems_only: bool,
) -> Vec<Row> {
    let filter = filter.to_lowercase();
    let matches = |text: &str| filter.is_empty() || text.to_lowercase().contains(&filter);
    let mut rows =
        Vec::with_capacity(groups.len() + snapshot.disks.len() + snapshot.replicas.len());
    for (group_index, group) in groups.iter().enumerate() {
        if problems_only && group.severity < Severity::Warn {
            continue;
        }
        let threshold = group
            .status
            .map(|index| snapshot.groups[index].rpo_threshold_seconds);
        let group_matches = matches(&group.name);
        let header_at = rows.len();
        rows.push(Row::Group(group_index));
        for &index in &group.disks {
            let disk = &snapshot.disks[index];
            if problems_only && disk_severity(disk, threshold) < Severity::Warn {
                continue;
            }
            if group_matches || matches(&disk.machine) || matches(&disk.name) {
                rows.push(Row::Disk(index));
            }
        }
        let has_disks = rows.len() > header_at + 1;
        if !group_matches && !has_disks {
            rows.truncate(header_at);
        }
    }
    if !problems_only {
        for (index, replica) in snapshot.replicas.iter().enumerate() {
            if matches(&replica.machine) || matches(&replica.name) {
                rows.push(Row::Replica(index));
            }
        }
    }
    rows
}
