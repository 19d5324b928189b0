//! Following a migration until it ends: the progress shown while it runs (a bar on a
//! terminal, plain lines otherwise) and the operator's Ctrl-C (abort it, or detach from it).

use anyhow::Result;
use migrated::api::MigrationInfo;
use migrated::client::MigratedClient;
use migrated::migration::record::Phase;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use crate::show::mib;

/// How following a migration ended.
pub enum Followed {
    /// It reached a terminal phase.
    Ended(Box<MigrationInfo>),
    /// The operator stopped following it (Ctrl-C, then "detach"); it goes on.
    Detached,
}

/// Polls the migration until it ends, showing its progress (see [`Progress`]). With `ask`,
/// Ctrl-C asks whether to abort the migration or to detach from it (when stdin is not a
/// terminal it detaches).
pub async fn follow(
    c: &MigratedClient,
    id: &str,
    memory: u64,
    quiet: bool,
    ask: bool,
) -> Result<Followed> {
    let mut shown = Progress::new(memory, quiet);
    let mut failures = 0;
    let mut interrupts = std::pin::pin!(interrupts());
    loop {
        let m = match c.migration(id).await {
            Ok(m) => {
                failures = 0;
                m
            }
            Err(e) => {
                failures += 1;
                if failures > 50 {
                    shown.finish();
                    return Err(anyhow::Error::new(e)
                        .context(format!("lost contact with migrated while following {id}")));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        shown.update(&m);
        if m.record.phase.is_terminal() {
            shown.finish();
            return Ok(Followed::Ended(Box::new(m)));
        }
        let interrupted = tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => false,
            _ = interrupts.as_mut().next_interrupt(), if ask => true,
        };
        if interrupted {
            shown.suspend();
            match ask_abort_or_detach(id).await {
                Choice::Abort => match c.abort(id).await {
                    Ok(_) => eprintln!("migration {id}: abort requested; waiting for it to end"),
                    Err(e) => eprintln!("migration {id}: the abort was refused: {e}"),
                },
                Choice::Detach => {
                    shown.finish();
                    eprintln!(
                        "detached: migration {id} goes on; `migratectl migrations {id}` shows it, \
                         `migratectl abort {id}` aborts it"
                    );
                    return Ok(Followed::Detached);
                }
            }
        }
    }
}

/// The Ctrl-Cs the process receives.
fn interrupts() -> Interrupts {
    Interrupts(tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok())
}

struct Interrupts(Option<tokio::signal::unix::Signal>);

impl Interrupts {
    async fn next_interrupt(self: std::pin::Pin<&mut Self>) {
        match &mut self.get_mut().0 {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    }
}

/// What the operator chose after Ctrl-C.
enum Choice {
    Abort,
    Detach,
}

async fn ask_abort_or_detach(id: &str) -> Choice {
    if !std::io::stdin().is_terminal() {
        return Choice::Detach;
    }
    eprint!("\nmigration {id}: [a]bort it (the guest stays here) or [d]etach (it goes on)? [d] ");
    let _ = std::io::stderr().flush();
    let answer = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|_| line)
    })
    .await;
    match answer {
        Ok(Ok(line)) if line.trim().eq_ignore_ascii_case("a") => Choice::Abort,
        Ok(Ok(line)) if line.trim().eq_ignore_ascii_case("abort") => Choice::Abort,
        _ => Choice::Detach,
    }
}

/// How a migration's progress is shown: a bar over the guest's memory when stdout and stderr
/// are terminals; else a plain line on stderr whenever the phase or the pass changes, and at
/// most once a second otherwise; nothing with `--json`.
enum Progress {
    Quiet,
    Bar {
        bar: indicatif::ProgressBar,
        memory: u64,
    },
    Lines {
        memory: u64,
        last: Option<(String, u64)>,
        printed: std::time::Instant,
    },
}

impl Progress {
    fn new(memory: u64, quiet: bool) -> Progress {
        if quiet {
            return Progress::Quiet;
        }
        if !(std::io::stdout().is_terminal() && std::io::stderr().is_terminal()) {
            return Progress::Lines {
                memory,
                last: None,
                printed: std::time::Instant::now(),
            };
        }
        let bar = indicatif::ProgressBar::new(memory.max(1));
        let style = indicatif::ProgressStyle::with_template(
            "{spinner} {elapsed:>4} [{bar:30}] {percent:>3}% {msg}",
        )
        .expect("the template is valid")
        .progress_chars("=> ");
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(100));
        Progress::Bar { bar, memory }
    }

    fn update(&mut self, m: &MigrationInfo) {
        match self {
            Progress::Quiet => {}
            Progress::Bar { bar, memory } => {
                if let Some(p) = &m.progress {
                    bar.set_position(memory.saturating_sub(p.bytes_remaining));
                }
                bar.set_message(status(m, *memory).text);
            }
            Progress::Lines {
                memory,
                last,
                printed,
            } => {
                let st = status(m, *memory);
                let key = (st.phase.clone(), st.pass);
                let changed = last.as_ref() != Some(&key);
                if changed || printed.elapsed() >= Duration::from_secs(1) {
                    eprintln!("{:>3}% {}", st.percent, st.text);
                    *last = Some(key);
                    *printed = std::time::Instant::now();
                }
            }
        }
    }

    /// Hides the bar while the operator is asked something.
    fn suspend(&self) {
        if let Progress::Bar { bar, .. } = self {
            bar.disable_steady_tick();
        }
    }

    fn finish(&mut self) {
        if let Progress::Bar { bar, .. } = self {
            bar.finish_and_clear();
        }
        *self = Progress::Quiet;
    }
}

/// One reading of a migration's progress, as shown.
struct Status {
    phase: String,
    pass: u64,
    percent: u64,
    text: String,
}

/// The migration's phase (the VMM's during pre-copy), the pre-copy pass, how much of the
/// guest's `memory` has reached the destination, the rate so far, the guest's dirty rate and
/// the time left.
fn status(m: &MigrationInfo, memory: u64) -> Status {
    let phase = match (&m.progress, m.record.phase) {
        (Some(p), Phase::Precopy) => p.vmm_phase.to_string(),
        (_, phase) => phase.to_string(),
    };
    let Some(p) = &m.progress else {
        let note = m.record.steps.last().map(|s| s.note.as_str()).unwrap_or("");
        let percent = match m.record.phase {
            Phase::Created | Phase::Preparing | Phase::Precopy => 0,
            _ => 100,
        };
        return Status {
            text: format!("{phase:<12} {note}"),
            phase,
            pass: 0,
            percent,
        };
    };
    let done = memory.saturating_sub(p.bytes_remaining);
    let percent = (done as u128 * 100)
        .checked_div(u128::from(memory))
        .unwrap_or(0) as u64;
    let rate = p.bytes_sent as f64 / (p.elapsed_ms.max(1) as f64 / 1000.0);
    let eta = p
        .eta_ms
        .map(|e| format!("{:.1} s", e as f64 / 1000.0))
        .unwrap_or_else(|| "?".into());
    Status {
        text: format!(
            "{phase:<12} pass {:>2}  {:>10}/s  dirty {:>10}/s  {:>10} left  ETA {eta}",
            p.iteration + 1,
            mib(rate as u64),
            mib(p.dirty_rate_bytes_per_sec),
            mib(p.bytes_remaining),
        ),
        phase,
        pass: p.iteration,
        percent: percent.min(100),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use migrated::migration::record::{
        MigrationParams, MigrationRecord, Progress as Figures, Role,
    };

    #[test]
    fn the_status_counts_the_memory_at_the_destination() {
        let mut record = MigrationRecord::new(
            "vm1.a.1".into(),
            "vm1".into(),
            Role::Source,
            MigrationParams::default(),
            Vec::new(),
        );
        record.phase = Phase::Precopy;
        let progress = Figures {
            vmm_phase: vmm_api::migration::Phase::Precopy,
            iteration: 1,
            bytes_sent: 96 << 20,
            bytes_remaining: 16 << 20,
            dirty_rate_bytes_per_sec: 8 << 20,
            expected_downtime_ms: 40,
            eta_ms: Some(1500),
            elapsed_ms: 1000,
        };
        let m = MigrationInfo {
            record,
            progress: Some(progress),
        };
        let st = status(&m, 64 << 20);
        assert_eq!(st.percent, 75);
        assert_eq!((st.phase.as_str(), st.pass), ("precopy", 1));
        for part in [
            "pass  2",
            "96.0 MiB/s",
            "dirty    8.0 MiB/s",
            "16.0 MiB left",
            "ETA 1.5 s",
        ] {
            assert!(st.text.contains(part), "{part:?} in {:?}", st.text);
        }
        let mut done = m.clone();
        done.record.phase = Phase::Completed;
        done.progress = None;
        assert_eq!(status(&done, 64 << 20).percent, 100);
    }
}
