//! The operator console's frame cost at 200 disks (issue 6): one frame = `update` with a new
//! status snapshot (history, groups, alerts, rows) + `view` into a `TestBackend`, the same work
//! the console does per snapshot over ssh minus the terminal write. The baseline, measured in the
//! same run, is an empty frame (`Terminal::draw` with nothing drawn: buffer reset + diff).
//!
//! Run: `cargo bench --bench tui_frame`. Figures go to benches/RESULTS.md, "## Console".

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use ferry_tui::fixtures;
use ferry_tui::model::{ItemKey, Screen};
use ferry_tui::{update, view, ColorMode, Model, Msg, Options, Theme};
use ratatui::backend::TestBackend;
use ratatui::Terminal;

const DISKS: usize = 200;

/// A console that has already seen ten minutes of snapshots, so the history rings are full and
/// pushing a sample also evicts one, as in a long-running session.
fn warmed_model(width: u16, height: u16) -> Model {
    let options = Options {
        readonly: false,
        theme: Theme::new(ColorMode::Indexed256, true),
        endpoint: "/run/ferry/ferry.sock".to_string(),
    };
    let mut model = Model::new(options, width, height);
    for step in 0..ferry_tui::model::HISTORY_SAMPLES_MAX as u64 {
        update(&mut model, Msg::Snapshot(fixtures::large(DISKS, step)));
    }
    model
}

fn frame_cost(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("console_frame_200_disks");
    for (name, width, height, detail) in [
        ("overview_80x24", 80u16, 24u16, false),
        ("overview_200x60", 200, 60, false),
        ("detail_200x60", 200, 60, true),
    ] {
        let mut model = warmed_model(width, height);
        if detail {
            model.screen = Screen::Detail(ItemKey::Disk {
                machine: "vm050".into(),
                name: "vda".into(),
            });
        }
        let mut terminal = Terminal::new(TestBackend::new(width, height)).expect("test backend");
        let mut step = ferry_tui::model::HISTORY_SAMPLES_MAX as u64;
        group.bench_function(format!("update_and_view_{name}"), |bench| {
            bench.iter_batched(
                || {
                    step += 1;
                    fixtures::large(DISKS, step)
                },
                |snapshot| {
                    update(&mut model, Msg::Snapshot(snapshot));
                    terminal.draw(|frame| view(&model, frame)).expect("draw");
                },
                BatchSize::SmallInput,
            );
        });
        group.bench_function(format!("view_only_{name}"), |bench| {
            bench.iter(|| {
                terminal.draw(|frame| view(&model, frame)).expect("draw");
            });
        });
        group.bench_function(format!("baseline_empty_frame_{name}"), |bench| {
            bench.iter(|| {
                terminal.draw(|_frame| {}).expect("draw");
            });
        });
    }
    group.finish();
}

criterion_group!(benches, frame_cost);
criterion_main!(benches);
