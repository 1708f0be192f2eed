//! Renders run events: indicatif bars per running stage on a terminal, plain
//! timestamped lines otherwise (cron and CI logs). Everything goes to stderr;
//! stdout is for summaries and JSON.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use swift_engine::report::{Reporter, StageReport, StageStatus};

/// The reporter for this process's stderr.
pub struct Terminal {
    bars: Option<MultiProgress>,
    running: Mutex<HashMap<String, ProgressBar>>,
}

/// Bars on a terminal (unless `TERM=dumb`), lines elsewhere.
pub fn for_terminal() -> Arc<Terminal> {
    let tty = std::io::stderr().is_terminal() && std::env::var("TERM").map_or(true, |t| t != "dumb");
    let bars = tty.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10)));
    Arc::new(Terminal { bars, running: Mutex::default() })
}

impl Terminal {
    /// Clears any bar left over.
    pub fn finish(&self) {
        for (_, bar) in self.running.lock().expect("reporter lock").drain() {
            bar.finish_and_clear();
        }
    }

    fn line(&self, text: &str) {
        match &self.bars {
            Some(bars) => {
                let _ = bars.println(text);
            }
            None => {
                let now = humantime::format_rfc3339_seconds(SystemTime::now());
                eprintln!("{now} {text}");
            }
        }
    }
}

impl Reporter for Terminal {
    fn stage_started(&self, stage: &str, kind: &str) {
        match &self.bars {
            Some(bars) => {
                let bar = bars.add(ProgressBar::new_spinner());
                bar.set_style(
                    ProgressStyle::with_template("{spinner} {prefix:.bold} {wide_msg} {elapsed}")
                        .expect("valid template")
                        .tick_chars("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏ "),
                );
                bar.set_prefix(format!("{stage} ({kind})"));
                bar.enable_steady_tick(Duration::from_millis(200));
                self.running.lock().expect("reporter lock").insert(stage.to_string(), bar);
            }
            None => self.line(&format!("{stage} ({kind}): started")),
        }
    }

    fn stage_progress(&self, stage: &str, done: u64, total: u64, message: &str) {
        if let Some(bar) = self.running.lock().expect("reporter lock").get(stage) {
            if total > 0 {
                bar.set_message(format!("{message} {done}/{total} ({:.0}%)", done as f64 * 100.0 / total as f64));
            } else {
                bar.set_message(message.to_string());
            }
        }
    }

    fn stage_finished(&self, report: &StageReport) {
        if let Some(bar) = self.running.lock().expect("reporter lock").remove(&report.name) {
            bar.finish_and_clear();
        }
        let what = match report.status {
            StageStatus::Ran => format!("ran in {}", crate::commands::seconds(report.seconds)),
            StageStatus::Cached => "cached".to_string(),
            StageStatus::WouldRun => "would run".to_string(),
            StageStatus::Failed => format!("FAILED: {}", report.error.as_deref().unwrap_or("unknown error")),
            StageStatus::Skipped => format!("skipped ({})", report.error.as_deref().unwrap_or("not selected")),
            StageStatus::Queued | StageStatus::Running => format!("{} as Slurm job {}", report.status.as_str(), report.job.as_deref().unwrap_or("?")),
        };
        self.line(&format!("{} ({}): {what}", report.name, report.kind));
    }

    fn note(&self, message: &str) {
        self.line(message);
    }
}
