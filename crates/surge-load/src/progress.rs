//! Live progress while a run goes: a bar on a terminal, a plain line every five seconds
//! otherwise (logs, CI).

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::engine::Run;
use crate::report::ms;

pub struct Progress {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    /// Shows the progress of `run` on stderr, against its planned length.
    pub fn start(run: Arc<Run>, planned: Duration) -> Progress {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let terminal = std::io::stderr().is_terminal();
        let task = tokio::spawn(async move {
            let bar = terminal.then(|| bar(planned));
            let every = if terminal { Duration::from_millis(250) } else { Duration::from_secs(5) };
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => break,
                }
                let line = status_line(&run);
                match &bar {
                    Some(bar) => {
                        bar.set_position(run.start.elapsed().as_millis() as u64);
                        bar.set_message(line);
                    }
                    None => eprintln!("{line}"),
                }
            }
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
        });
        Progress { stop, task }
    }

    pub async fn finish(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

fn bar(planned: Duration) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(planned.as_millis() as u64), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template("{elapsed:>4} [{bar:24}] {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar
}

fn status_line(run: &Run) -> String {
    let elapsed = run.start.elapsed().as_secs_f64();
    let live = run.live();
    let rate = live.answered as f64 / elapsed.max(f64::EPSILON);
    format!(
        "{elapsed:5.1}s  sent {}  {rate:.0}/s  errors {}  last 5 s: p50 {} p99 {}",
        run.sent(),
        live.errors,
        ms(live.recent_p50.as_secs_f64() * 1e3),
        ms(live.recent_p99.as_secs_f64() * 1e3)
    )
}
