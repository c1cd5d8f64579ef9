//! The progress bar of `ferry bench` (indicatif, on stderr) and its log lines. On a terminal the
//! bar shows the scenario, the step and the step's own progress; when stderr is not a terminal
//! there is no bar, and log lines go to stderr as they are.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    bar: ProgressBar,
    terminal: bool,
}

impl Progress {
    /// A bar of `steps` steps, drawn only when `terminal`.
    pub fn new(terminal: bool, steps: u64) -> Progress {
        let bar = if terminal {
            ProgressBar::with_draw_target(Some(steps), ProgressDrawTarget::stderr())
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {prefix} {wide_msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress { bar, terminal }
    }

    /// A new scenario starts.
    pub fn scenario(&self, number: usize, title: &str) {
        self.bar.set_prefix(format!("scenario {number}"));
        self.bar.set_message(title.to_owned());
        if !self.terminal {
            eprintln!("ferry bench: scenario {number}: {title}");
        }
    }

    /// A step of the current scenario starts.
    pub fn step(&self, what: &str) {
        self.bar.inc(1);
        self.bar.set_message(what.to_owned());
        if !self.terminal {
            // A log (CI, a pipe) shows where a slow run spends its time.
            eprintln!("  · {what}");
        }
    }

    /// Progress within the current step (e.g. bytes replicated), shown after its name.
    pub fn detail(&self, what: &str) {
        self.bar.set_message(what.to_owned());
    }

    pub fn log(&self, line: &str) {
        if self.terminal {
            self.bar.println(line);
        } else {
            eprintln!("{line}");
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
