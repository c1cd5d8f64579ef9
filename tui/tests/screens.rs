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
    let mut model = healthy_model();
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
    select_db(model);
    press(model, &[KeyCode::Char('F')]);
    assert!(model.dialog.is_some());
}

#[test]
fn failover_needs_the_typed_group_name() {
    let mut model = healthy_model();
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
                point: Some(104),
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
    let mut model = healthy_model();
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
                point: Some(102),
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
    let mut model = healthy_model();
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
    let mut model = healthy_model();
    for action in ['r', 'b', 't', 'c', 'F', 'R', 'B'] {
        select_db(&mut model);
        press(&mut model, &[KeyCode::Char(action)]);
        assert!(model.dialog.is_some(), "{action} opens a dialog");
        assert_eq!(model.dialog.as_ref().unwrap().focus, Focus::Cancel);
        assert!(press(&mut model, &[KeyCode::Esc]).is_empty());
        assert!(model.dialog.is_none());
    }
    assert!(model.ledger.is_empty());
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
