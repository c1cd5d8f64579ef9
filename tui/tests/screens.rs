//! Screen snapshot tests: canned status snapshots through `update` into `view` on a
//! `TestBackend`, compared with the committed `.snap` files (accept changes with
//! `INSTA_UPDATE=always cargo test -p ferry-tui`, then review the diff).

use ferry_appliance::control::Request;
use ferry_tui::fixtures;
use ferry_tui::model::{Focus, ItemKey, Screen};
use ferry_tui::{update, view, ColorMode, Command, Model, Msg, Options, Theme};
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::style::Color;
use ratatui::Terminal;

fn model(width: u16, height: u16, mode: ColorMode, unicode: bool, readonly: bool) -> Model {
    let options = Options {
        readonly,
        theme: Theme::new(mode, unicode),
        endpoint: "/run/ferry/control.sock".to_string(),
    };
    Model::new(options, width, height)
}

fn render(model: &Model) -> Terminal<TestBackend> {
    let mut terminal = Terminal::new(TestBackend::new(model.width, model.height)).unwrap();
    terminal.draw(|frame| view(model, frame)).unwrap();
    terminal
}

fn key(code: KeyCode) -> Msg {
    Msg::Key(KeyEvent::new(code, KeyModifiers::NONE))
}

fn press(model: &mut Model, codes: &[KeyCode]) -> Vec<Command> {
    codes
        .iter()
        .flat_map(|code| update(model, key(*code)))
        .collect()
}

fn type_text(model: &mut Model, text: &str) -> Vec<Command> {
    text.chars()
        .flat_map(|c| update(model, key(KeyCode::Char(c))))
        .collect()
}

fn select_db(model: &mut Model) {
    model.select_key(Some(ItemKey::Group("db".into())));
    assert_eq!(model.selected_key(), Some(ItemKey::Group("db".into())));
}

fn healthy_model() -> Model {
    let mut model = model(80, 24, ColorMode::Indexed256, true, false);
    for snapshot in fixtures::healthy_history(90) {
        update(&mut model, Msg::Snapshot(snapshot));
    }
    model
}

/// A console on a source and its target (the demo's view): failover actions are possible.
fn pair_model() -> Model {
    let mut model = model(80, 24, ColorMode::Indexed256, true, false);
    for mut snapshot in fixtures::healthy_history(90) {
        let pair = fixtures::site_pair();
        snapshot.appliance = pair.appliance;
        snapshot.replicas = pair.replicas;
        snapshot.groups = pair.groups;
        update(&mut model, Msg::Snapshot(snapshot));
    }
    model
}

fn model_with(
    snapshot: ferry_appliance::control::StatusSnapshot,
    unicode: bool,
    mode: ColorMode,
) -> Model {
    let mut model = model(80, 24, mode, unicode, false);
    update(&mut model, Msg::Snapshot(snapshot));
    model
}

fn alerts_model(unicode: bool, mode: ColorMode) -> Model {
    let mut model = model(80, 24, mode, unicode, false);
    update(&mut model, Msg::Snapshot(fixtures::with_alerts()));
    model
}

#[test]
fn overview_healthy() {
    let model = healthy_model();
    insta::assert_snapshot!(render(&model).backend());
}

#[test]
fn overview_with_alerts_sorts_problems_first() {
    let model = alerts_model(true, ColorMode::Indexed256);
    let terminal = render(&model);
    insta::assert_snapshot!(terminal.backend());
    // The worst group comes first, the worst disk first in it.
    let rows: Vec<String> = (0..24)
        .map(|y| {
            (0..80)
                .map(|x| terminal.backend().buffer()[(x, y)].symbol().to_string())
                .collect()
        })
        .collect();
    let first_group = rows.iter().position(|row| row.contains("db (3)")).unwrap();
    let web_group = rows.iter().position(|row| row.contains("web (2)")).unwrap();
    assert!(
        first_group < web_group,
        "db has the RPO breach and must come first:\n{}",
        rows.join("\n")
    );
    assert!(rows[first_group + 1].contains("db1/vda") || rows[first_group + 1].contains("db1/vdb"));
}

#[test]
fn overview_problems_only_hides_healthy_disks() {
    let mut model = alerts_model(true, ColorMode::Indexed256);
    press(&mut model, &[KeyCode::Char('!')]);
    assert!(model.problems_only);
    let terminal = render(&model);
    let text = format!("{}", terminal.backend());
    assert!(
        !text.contains("web2/vda"),
        "web2/vda is healthy (initial sync):\n{text}"
    );
    assert!(
        text.contains("web1/vda") && text.contains("db1/vda"),
        "{text}"
    );
    press(&mut model, &[KeyCode::Esc]);
    assert!(!model.problems_only);
}

#[test]
fn overview_no_color_ascii() {
    let model = alerts_model(false, ColorMode::Never);
    let terminal = render(&model);
    insta::assert_snapshot!(terminal.backend());
    // Not one cell carries a colour: every state is in the text.
    let buffer = terminal.backend().buffer();
    for cell in buffer.content() {
        assert_eq!(cell.fg, Color::Reset, "coloured cell {:?}", cell);
        assert_eq!(cell.bg, Color::Reset, "coloured cell {:?}", cell);
        assert!(
            cell.symbol().is_ascii(),
            "non-ASCII glyph {:?}",
            cell.symbol()
        );
    }
}

#[test]
fn detail_of_a_disk_in_initial_sync() {
    let mut model = healthy_model();
    model.screen = Screen::Detail(ItemKey::Disk {
        machine: "web2".into(),
        name: "vda".into(),
    });
    insta::assert_snapshot!(render(&model).backend());
}

#[test]
fn detail_of_a_group_with_recovery_points() {
    let mut model = healthy_model();
    select_db(&mut model);
    press(&mut model, &[KeyCode::Enter]);
    assert_eq!(model.screen, Screen::Detail(ItemKey::Group("db".into())));
    insta::assert_snapshot!(render(&model).backend());
}

#[test]
fn help_screen() {
    let mut model = healthy_model();
    press(&mut model, &[KeyCode::Char('?')]);
    assert_eq!(model.screen, Screen::Help);
    insta::assert_snapshot!(render(&model).backend());
}

#[test]
fn failover_confirmation_dialog() {
    let mut model = pair_model();
    select_db(&mut model);
    press(&mut model, &[KeyCode::Char('F')]);
    let dialog = model.dialog.as_ref().expect("F opens the failover dialog");
    assert_eq!(dialog.group, "db");
    assert_eq!(
        dialog.focus,
        Focus::Cancel,
        "dangerous dialogs start on Cancel"
    );
    insta::assert_snapshot!(render(&model).backend());
}

#[test]
fn too_small_screen() {
    let mut model = healthy_model();
    update(
        &mut model,
        Msg::Resize {
            width: 60,
            height: 15,
        },
    );
    insta::assert_snapshot!(render(&model).backend());
}

#[test]
fn disconnected_keeps_the_last_status_and_says_so() {
    let mut model = healthy_model();
    update(
        &mut model,
        Msg::Disconnected(
            "cannot connect to the control socket /run/ferry/control.sock: Connection refused"
                .into(),
        ),
    );
    let text = format!("{}", render(&model).backend());
    assert!(text.contains("DISCONNECTED"), "{text}");
    assert!(
        text.contains("db1/vda"),
        "the last status stays on screen:\n{text}"
    );
    update(&mut model, Msg::Snapshot(fixtures::healthy()));
    assert!(!format!("{}", render(&model).backend()).contains("DISCONNECTED"));
}

#[test]
fn every_screen_and_every_row_detail_renders_at_80x24_without_panicking() {
    // A smoke check over every screen and the detail of every row: nothing panics.
    let mut model = alerts_model(true, ColorMode::TrueColor);
    for screen in [Screen::Overview, Screen::Help, Screen::Actions] {
        model.screen = screen;
        render(&model);
    }
    for index in 0..model.rows.len() {
        model.selected = index;
        press(&mut model, &[KeyCode::Enter]);
        render(&model);
        press(&mut model, &[KeyCode::Esc]);
    }
}

// ---- update() behaviour -------------------------------------------------------------------

fn open_failover(model: &mut Model) {
    assert_eq!(
        model.action_refusal(ferry_tui::model::DialogAction::Failover, "db"),
        None
    );
    select_db(model);
    press(model, &[KeyCode::Char('F')]);
    assert!(model.dialog.is_some());
}

#[test]
fn failover_needs_the_typed_group_name() {
    let mut model = pair_model();
    open_failover(&mut model);
    // Enter on the initial focus (Cancel) cancels.
    assert!(press(&mut model, &[KeyCode::Enter]).is_empty());
    assert!(model.dialog.is_none());

    open_failover(&mut model);
    // Tab: Cancel -> Confirm; Enter without the name is refused and moves focus to the input.
    let commands = press(&mut model, &[KeyCode::Tab, KeyCode::Enter]);
    assert!(commands.is_empty(), "{commands:?}");
    let dialog = model.dialog.as_ref().unwrap();
    assert_eq!(dialog.focus, Focus::Input);
    assert!(dialog
        .error
        .as_deref()
        .unwrap()
        .contains("type the group's name"));

    // A wrong name is refused too.
    type_text(&mut model, "web");
    assert!(press(&mut model, &[KeyCode::Tab, KeyCode::Tab, KeyCode::Enter]).is_empty());
    assert!(model.dialog.is_some());

    // The right name, typed, then Tab to Confirm (Input -> Cancel -> Confirm).
    model.dialog.as_mut().unwrap().input.clear();
    model.dialog.as_mut().unwrap().focus = Focus::Input;
    type_text(&mut model, "db");
    // Enter in the name field does not confirm.
    assert!(press(&mut model, &[KeyCode::Enter]).is_empty());
    let commands = press(&mut model, &[KeyCode::Tab, KeyCode::Tab, KeyCode::Enter]);
    assert_eq!(
        commands,
        vec![Command::Send {
            id: 1,
            request: Request::Failover {
                group: "db".into(),
                point: Some(fixtures::db_point_id(0)),
                test: false,
                at_unix_ms: None,
                planned: false,
                materialize_dir: None
            }
        }]
    );
    assert!(model.dialog.is_none());
    assert_eq!(model.ledger.len(), 1);
}

#[test]
fn failover_picker_chooses_an_older_point() {
    let mut model = pair_model();
    open_failover(&mut model);
    model.dialog.as_mut().unwrap().focus = Focus::Points;
    press(&mut model, &[KeyCode::Down, KeyCode::Down]);
    model.dialog.as_mut().unwrap().focus = Focus::Input;
    type_text(&mut model, "db");
    let commands = press(&mut model, &[KeyCode::Tab, KeyCode::Tab, KeyCode::Enter]);
    assert_eq!(
        commands,
        vec![Command::Send {
            id: 1,
            request: Request::Failover {
                group: "db".into(),
                point: Some(fixtures::db_point_id(2)),
                test: false,
                at_unix_ms: None,
                planned: false,
                materialize_dir: None
            }
        }]
    );
}

#[test]
fn a_pasted_newline_cannot_confirm() {
    let mut model = pair_model();
    open_failover(&mut model);
    model.dialog.as_mut().unwrap().focus = Focus::Input;
    assert!(update(&mut model, Msg::Paste("db\n".into())).is_empty());
    let dialog = model.dialog.as_ref().unwrap();
    assert_eq!(
        dialog.input, "db",
        "control characters are dropped from pastes"
    );
    assert_eq!(dialog.focus, Focus::Input);
}

#[test]
fn esc_cancels_any_dialog_and_sends_nothing() {
    // Every action key, in the state that allows it.
    let cases = [
        (fixtures::site_pair(), vec!['r', 'b', 't', 'F']),
        (fixtures::test_failover(), vec!['r', 'c']),
    ];
    for (snapshot, actions) in cases {
        let mut model = model_with(snapshot, true, ColorMode::Indexed256);
        for action in actions {
            select_db(&mut model);
            press(&mut model, &[KeyCode::Char(action)]);
            assert!(model.dialog.is_some(), "{action} opens a dialog");
            assert_eq!(model.dialog.as_ref().unwrap().focus, Focus::Cancel);
            assert!(press(&mut model, &[KeyCode::Esc]).is_empty());
            assert!(model.dialog.is_none());
        }
        assert!(model.ledger.is_empty());
    }
    let mut model = model_with(fixtures::failed_over(), true, ColorMode::Indexed256);
    for (group, action) in [("web", 'R'), ("db", 'B')] {
        model.select_key(Some(ItemKey::Group(group.into())));
        press(&mut model, &[KeyCode::Char(action)]);
        assert!(
            model.dialog.is_some(),
            "{action} opens a dialog for {group}"
        );
        press(&mut model, &[KeyCode::Esc]);
    }
}

/// Keys the group's state (or this appliance's role) forbids open no dialog and say why.
#[test]
fn actions_the_state_forbids_say_why() {
    let cases: [(ferry_appliance::control::StatusSnapshot, &str, char, &str); 8] = [
        (
            fixtures::healthy(),
            "db",
            'F',
            "failover runs on the target appliance",
        ),
        (
            fixtures::healthy(),
            "db",
            't',
            "failover runs on the target appliance",
        ),
        (
            fixtures::site_pair(),
            "db",
            'c',
            "cleanup ends a test failover, and group db is protected",
        ),
        (
            fixtures::site_pair(),
            "db",
            'R',
            "reprotect follows a failover",
        ),
        (
            fixtures::site_pair(),
            "db",
            'B',
            "failback needs a reprotected group",
        ),
        (
            fixtures::test_failover(),
            "db",
            'F',
            "a test failover of group db is running: c cleans it up first",
        ),
        (
            fixtures::failed_over(),
            "web",
            'r',
            "group web is failed-over: its source no longer replicates",
        ),
        (
            fixtures::failed_over(),
            "web",
            't',
            "group web is failed-over already",
        ),
    ];
    for (snapshot, group, action, reason) in cases {
        let mut model = model_with(snapshot, true, ColorMode::Indexed256);
        model.select_key(Some(ItemKey::Group(group.into())));
        let commands = press(&mut model, &[KeyCode::Char(action)]);
        assert!(
            commands.is_empty() && model.dialog.is_none(),
            "{action} on {group}"
        );
        let toast = &model.toast.as_ref().expect("a toast says why").text;
        assert!(toast.contains(reason), "{action} on {group}: {toast}");
    }
    // A group whose every point is unusable offers no failover at all.
    let mut snapshot = fixtures::site_pair();
    for group in &mut snapshot.groups {
        for point in &mut group.recovery_points {
            point.usable = false;
        }
    }
    let mut model = model_with(snapshot, true, ColorMode::Indexed256);
    select_db(&mut model);
    press(&mut model, &[KeyCode::Char('t')]);
    assert!(model.dialog.is_none());
    assert!(model
        .toast
        .as_ref()
        .unwrap()
        .text
        .contains("no usable recovery point"));
}

#[test]
fn failover_picker_offers_only_usable_points_with_a_preview() {
    let mut model = pair_model();
    select_db(&mut model);
    press(&mut model, &[KeyCode::Char('t')]);
    let dialog = model.dialog.as_ref().unwrap();
    assert!(dialog.points.iter().all(|point| point.usable));
    assert_eq!(
        dialog.points.len(),
        5,
        "the unusable newest point is left out"
    );
    assert_eq!(dialog.points[0].id, fixtures::db_point_id(0));
    let text = format!("{}", render(&model).backend());
    assert!(text.contains("data-loss window 42s"), "{text}");
    assert!(text.contains("crash-consistent (one write order"), "{text}");
    assert!(text.contains("db1, db2 (3 disks)"), "{text}");
    assert!(text.contains("1 unusable not offered"), "{text}");
    insta::assert_snapshot!(render(&model).backend());
}

#[test]
fn overview_of_a_site_pair_in_test_failover() {
    let model = model_with(fixtures::test_failover(), true, ColorMode::Indexed256);
    let text = format!("{}", render(&model).backend());
    assert!(text.contains("◇ test-failover"), "{text}");
    insta::assert_snapshot!(render(&model).backend());
}

#[test]
fn overview_failed_over_and_reprotecting_no_color_ascii() {
    let model = model_with(fixtures::failed_over(), false, ColorMode::Never);
    let terminal = render(&model);
    let text = format!("{}", terminal.backend());
    assert!(text.contains("> failed-over"), "{text}");
    assert!(text.contains("< reprotecting"), "{text}");
    for cell in terminal.backend().buffer().content() {
        assert_eq!(cell.fg, Color::Reset);
        assert!(cell.symbol().is_ascii(), "{:?}", cell.symbol());
    }
    insta::assert_snapshot!(terminal.backend());
}

#[test]
fn detail_of_a_group_in_test_failover_shows_its_exports() {
    let mut model = model_with(fixtures::test_failover(), true, ColorMode::Indexed256);
    select_db(&mut model);
    press(&mut model, &[KeyCode::Enter]);
    let text = format!("{}", render(&model).backend());
    assert!(text.contains("test failover exports at point"), "{text}");
    assert!(text.contains("nbd+unix:///db1/vda?socket="), "{text}");
    assert!(text.contains("unusable: waiting for source-c"), "{text}");
    assert!(
        text.contains("c cleanup"),
        "the footer offers cleanup: {text}"
    );
    assert!(
        !text.contains("F failover"),
        "no failover during a test: {text}"
    );
    insta::assert_snapshot!(render(&model).backend());
}

#[test]
fn a_failover_answer_lists_its_exports_in_the_ledger() {
    use ferry_appliance::control::Response;
    let mut model = pair_model();
    select_db(&mut model);
    press(&mut model, &[KeyCode::Char('t'), KeyCode::Tab]);
    let commands = press(&mut model, &[KeyCode::Enter]);
    let [Command::Send { id, request }] = commands.as_slice() else {
        panic!("{commands:?}")
    };
    assert!(
        matches!(request, Request::Failover { test: true, .. }),
        "{request:?}"
    );
    let snapshot = fixtures::test_failover();
    let group = snapshot.groups.iter().find(|g| g.name == "db").unwrap();
    let point = group
        .recovery_points
        .iter()
        .find(|p| p.id == fixtures::db_point_id(0))
        .unwrap()
        .clone();
    update(
        &mut model,
        Msg::ActionResult {
            id: *id,
            result: Ok(Response::Failover {
                group: "db".into(),
                point,
                test: true,
                exports: group.exports.clone(),
                definitions: vec!["/var/lib/ferry/failover/db/db1.xml".into()],
            }),
        },
    );
    let toast = &model.toast.as_ref().unwrap().text;
    assert!(toast.contains("test failover up at point #"), "{toast}");
    assert!(toast.contains("3 exports"), "{toast}");
    press(&mut model, &[KeyCode::Char('L')]);
    let text = format!("{}", render(&model).backend());
    assert!(
        text.contains("db1/vdb nbd+unix:///db1/vdb?socket="),
        "{text}"
    );
    assert!(
        text.contains("machine /var/lib/ferry/failover/db/db1.xml"),
        "{text}"
    );
    insta::assert_snapshot!(render(&model).backend());
}

#[test]
fn a_point_created_answer_names_the_point() {
    use ferry_appliance::control::{PointConsistency, RecoveryPointStatus, Response};
    let mut model = pair_model();
    select_db(&mut model);
    press(&mut model, &[KeyCode::Char('r'), KeyCode::Tab]);
    let commands = press(&mut model, &[KeyCode::Enter]);
    let [Command::Send { id, .. }] = commands.as_slice() else {
        panic!("{commands:?}")
    };
    update(
        &mut model,
        Msg::ActionResult {
            id: *id,
            result: Ok(Response::PointCreated {
                group: "db".into(),
                point: RecoveryPointStatus {
                    id: fixtures::TIME_UNIX_MS,
                    time_unix_ms: fixtures::TIME_UNIX_MS,
                    consistency: PointConsistency::Crash,
                    usable: true,
                    unusable_reason: None,
                },
            }),
        },
    );
    let toast = &model.toast.as_ref().unwrap().text;
    assert_eq!(
        toast,
        &format!(
            "done: crash-consistent recovery point of group db: cut point #{} at 14:05:03 (crash)",
            fixtures::TIME_UNIX_MS
        )
    );
}

#[test]
fn readonly_hides_every_action() {
    let mut model = model(80, 24, ColorMode::Indexed256, true, true);
    update(&mut model, Msg::Snapshot(fixtures::healthy()));
    for action in ['p', 'r', 'b', 't', 'c', 'F', 'R', 'B'] {
        model.selected = 1;
        let commands = press(&mut model, &[KeyCode::Char(action)]);
        assert!(commands.is_empty(), "{action} sent {commands:?}");
        assert!(model.dialog.is_none(), "{action} opened a dialog");
    }
    assert!(model.toast.as_ref().unwrap().text.contains("read-only"));
    model.screen = Screen::Help;
    let help = format!("{}", render(&model).backend());
    assert!(!help.contains("FAILOVER"), "{help}");
    assert!(help.contains("read-only"), "{help}");
}

#[test]
fn pause_is_one_key_and_resume_follows_the_state() {
    let mut model = alerts_model(true, ColorMode::Indexed256);
    let paused_row = model
        .rows
        .iter()
        .position(|row| {
            model.row_key(*row)
                == Some(ItemKey::Disk {
                    machine: "db2".into(),
                    name: "vda".into(),
                })
        })
        .unwrap();
    model.selected = paused_row;
    let commands = press(&mut model, &[KeyCode::Char('p')]);
    let Command::Send { request, .. } = &commands[0] else {
        panic!("{commands:?}")
    };
    assert!(
        matches!(request, Request::Resume { .. }),
        "db2/vda is paused, so p resumes: {request:?}"
    );

    let healthy_row = model
        .rows
        .iter()
        .position(|row| {
            model.row_key(*row)
                == Some(ItemKey::Disk {
                    machine: "db1".into(),
                    name: "vda".into(),
                })
        })
        .unwrap();
    model.selected = healthy_row;
    let commands = press(&mut model, &[KeyCode::Char('p')]);
    let Command::Send { id, request } = commands[0].clone() else {
        panic!("{commands:?}")
    };
    assert!(matches!(request, Request::Pause { .. }));
    assert!(model
        .toast
        .as_ref()
        .unwrap()
        .text
        .starts_with("sent: pause db1/vda"));

    // The appliance's answer is shown as it is, refusals included.
    update(
        &mut model,
        Msg::ActionResult {
            id,
            result: Err("not supported yet: pause".into()),
        },
    );
    assert!(model
        .toast
        .as_ref()
        .unwrap()
        .text
        .contains("not supported yet: pause"));
}

#[test]
fn recovery_point_and_bandwidth_dialogs_send_their_requests() {
    let mut model = healthy_model();
    select_db(&mut model);
    press(&mut model, &[KeyCode::Char('r')]);
    // Kind is first in Tab order after Cancel/Confirm wrap: Cancel -> Confirm -> Kind.
    press(&mut model, &[KeyCode::Tab, KeyCode::Tab, KeyCode::Right]);
    assert!(model.dialog.as_ref().unwrap().app_consistent);
    let commands = press(&mut model, &[KeyCode::Tab, KeyCode::Tab, KeyCode::Enter]);
    assert_eq!(
        commands,
        vec![Command::Send {
            id: 1,
            request: Request::CreateRecoveryPoint {
                group: "db".into(),
                app_consistent: true
            }
        }]
    );

    press(&mut model, &[KeyCode::Char('b'), KeyCode::BackTab]);
    assert_eq!(model.dialog.as_ref().unwrap().focus, Focus::Input);
    type_text(&mut model, "abc");
    assert!(
        press(&mut model, &[KeyCode::Enter]).is_empty(),
        "not a number"
    );
    for _ in 0..3 {
        press(&mut model, &[KeyCode::Backspace]);
    }
    type_text(&mut model, "50");
    let commands = press(&mut model, &[KeyCode::Enter]);
    assert_eq!(
        commands,
        vec![Command::Send {
            id: 2,
            request: Request::SetBandwidth {
                bytes_per_s: Some(50_000_000)
            }
        }]
    );
}

#[test]
fn navigation_keys_move_and_quit() {
    let mut model = healthy_model();
    assert_eq!(model.selected, 0);
    press(&mut model, &[KeyCode::Char('j'), KeyCode::Down]);
    assert_eq!(model.selected, 2);
    press(&mut model, &[KeyCode::Char('k')]);
    assert_eq!(model.selected, 1);
    press(&mut model, &[KeyCode::Char('G')]);
    assert_eq!(model.selected, model.rows.len() - 1);
    press(&mut model, &[KeyCode::Tab]);
    assert_eq!(model.selected, 0, "Tab wraps to the first group");
    press(&mut model, &[KeyCode::Char('/')]);
    type_text(&mut model, "web2");
    press(&mut model, &[KeyCode::Enter]);
    assert_eq!(model.rows.len(), 2, "the web group header and web2/vda");
    assert_eq!(
        press(&mut model, &[KeyCode::Char('q')]),
        vec![Command::Quit]
    );
    assert_eq!(
        update(
            &mut model,
            Msg::Key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL))
        ),
        vec![Command::Quit]
    );
}

#[test]
fn selection_follows_the_item_across_snapshots() {
    let mut model = healthy_model();
    let target = ItemKey::Disk {
        machine: "db2".into(),
        name: "vda".into(),
    };
    model.select_key(Some(target.clone()));
    // In the alerts snapshot db2/vda moves (paused disks sort above healthy ones).
    update(&mut model, Msg::Snapshot(fixtures::with_alerts()));
    assert_eq!(model.selected_key(), Some(target));
}

#[test]
fn freeze_holds_the_screen_until_released() {
    let mut model = healthy_model();
    press(&mut model, &[KeyCode::Char('z')]);
    update(&mut model, Msg::Snapshot(fixtures::with_alerts()));
    assert!(model.alerts.is_empty(), "frozen: the new snapshot waits");
    press(&mut model, &[KeyCode::Char('z')]);
    assert!(!model.alerts.is_empty());
}
