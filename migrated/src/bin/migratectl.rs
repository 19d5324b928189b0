//! `migratectl`: the operator's command line for migrated.
//!
//! ```text
//! migratectl [--socket PATH | --host ADDR [--token-file FILE] [--tls-dir DIR [--server-name ID]]]
//!            [--json] hosts
//! migratectl instances | show NAME | run CONFIG.toml | stop NAME | rm NAME
//! migratectl migrate NAME --to HOST [--downtime-ms N] [--max-iterations N] [--throttle]
//! migratectl migrations [ID]
//! ```
//! migratectl abort ID [--no-wait]
//! Talks to the local migrated's Unix socket by default, or to any migrated's REST address
//! with `--host`. `--json` prints the API's JSON instead of text (errors too, as
//! `{"error": ...}` on stdout, and on stderr as always). The exit status says how it ended (see `exit`): 0 done, 1 failed,
//! 2 usage, 3 migration aborted, 4 migrated unreachable.

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use migrated::api::{HostEntry, MigrateRequest, MigrationInfo};
use migrated::client::MigratedClient;
use migrated::config::InstanceConfig;
use migrated::instance::InstanceRecord;
use migrated::migration::record::{MigrationParams, MigrationRecord, Phase};
use serde::Serialize;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;
use vmhop_common::http::{HttpError, HttpTls, Target};
use vmhop_common::tls::HostTls;
use vmhop_common::token::Token;

#[derive(Parser)]
#[command(
    name = "migratectl",
    version,
    about = "Run and migrate guests through migrated",
    after_help = EXIT_STATUS_HELP
)]
struct Cli {
    /// The local migrated's Unix socket.
    #[arg(long, env = "MIGRATED_SOCKET", default_value = migrated::config::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// A migrated's REST address instead of the local socket.
    #[arg(long, env = "MIGRATED_HOST")]
    host: Option<String>,
    /// With --host: the file with the cluster's token (the socket needs none).
    #[arg(long, env = "MIGRATED_TOKEN_FILE", requires = "host")]
    token_file: Option<PathBuf>,
    /// With --host: a TLS directory (`storaged pki host`) whose certificate this call presents,
    /// for a migrated that serves in mutual TLS.
    #[arg(long, env = "MIGRATED_TLS_DIR", requires = "host")]
    tls_dir: Option<PathBuf>,
    /// With --tls-dir: the host id the migrated's certificate must prove [default: the IP
    /// address of --host].
    #[arg(long, requires = "tls_dir")]
    server_name: Option<String>,
    /// Print JSON.
    #[arg(long, global = true)]
    json: bool,
    /// Seconds to wait for an answer (starting a guest waits for its VMM).
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// This host and its peers, and whether they answer.
    Hosts,
    /// The instances this host knows.
    Instances,
    /// One instance.
    Show {
        /// Instance name.
        name: String,
    },
    /// Start a guest from a TOML description (name, kernel, cmdline, memory_mib, vcpus, disks).
    Run {
        /// The guest's TOML file.
        config: PathBuf,
    },
    /// Stop a guest.
    Stop {
        /// Instance name.
        name: String,
    },
    /// Forget a guest whose VMM is gone here (stopped, exited, lost, failed, migrated away):
    /// its record and its directory, logs included.
    Rm {
        /// Instance name.
        name: String,
    },
    /// Move a running guest to another host, showing progress, then the figures.
    Migrate {
        /// Instance name.
        name: String,
        /// Destination host id (a peer of this migrated) or its REST address.
        #[arg(long)]
        to: String,
        /// Longest pause the guest may see.
        #[arg(long, default_value_t = MigrationParams::default().downtime_ms)]
        downtime_ms: u64,
        /// Pre-copy iterations before giving up on convergence.
        #[arg(long, default_value_t = MigrationParams::default().max_iterations)]
        max_iterations: u32,
        /// Slow the guest down if it does not converge.
        #[arg(long)]
        throttle: bool,
        /// Return once the migration started.
        #[arg(long)]
        no_wait: bool,
    },
    /// Abort a migration at its source host (like virsh domjobabort): the guest goes on running
    /// there. Possible until the leases flip; waits until the migration has ended.
    Abort {
        /// Migration id (`migratectl migrations`).
        id: String,
        /// Return once the abort was asked for.
        #[arg(long)]
        no_wait: bool,
    },
    /// Migrations this host took part in, or one of them.
    Migrations {
        /// Migration id.
        id: Option<String>,
    },
}

fn print_json<T: Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// The exit statuses, documented in `--help` and the README.
mod exit {
    /// The command did what it was asked (`migrate`: the migration completed; `abort`: the
    /// migration was aborted).
    pub const OK: u8 = 0;
    /// The migration failed, or migrated refused or could not do what was asked.
    pub const FAILED: u8 = 1;
    /// The command line is wrong (clap's status for usage errors).
    pub const USAGE: u8 = 2;
    /// `migrate`: the migration was aborted (by an operator, or because it could not
    /// complete); the guest runs on the source.
    pub const ABORTED: u8 = 3;
    /// migrated could not be reached (its socket or address), or stopped answering.
    pub const UNREACHABLE: u8 = 4;
}

const EXIT_STATUS_HELP: &str = "Exit status:
  0  done (migrate: the migration completed; abort: the migration was aborted)
  1  failed: the migration failed, or migrated refused or failed the request
  2  usage: the command line is wrong
  3  aborted (migrate): the migration was aborted, the guest runs on the source
  4  unreachable: migrated could not be reached, or stopped answering";

fn main() -> std::process::ExitCode {
    vmhop_common::man::generate_if_asked(Cli::command);
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let usage = e.use_stderr();
            let _ = e.print();
            return std::process::ExitCode::from(if usage { exit::USAGE } else { exit::OK });
        }
    };
    let json = cli.json;
    match start(cli) {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            let message = e.chain().map(cause).collect::<Vec<_>>().join(": ");
            if json {
                println!("{}", serde_json::json!({ "error": message }));
            }
            eprintln!("migratectl: {message}");
            std::process::ExitCode::from(status_of(&e))
        }
    }
}

/// One cause of an error as the operator reads it: what migrated answered, without the HTTP
/// status (its kind is in the exit status).
fn cause(c: &(dyn std::error::Error + 'static)) -> String {
    match c.downcast_ref::<HttpError>() {
        Some(HttpError::Status { message, .. }) => message.clone(),
        _ => c.to_string(),
    }
}

/// The exit status of a failed command: unreachable when migrated could not be reached.
fn status_of(e: &anyhow::Error) -> u8 {
    let unreachable = e
        .chain()
        .filter_map(|c| c.downcast_ref::<HttpError>())
        .any(HttpError::is_unreachable);
    if unreachable {
        exit::UNREACHABLE
    } else {
        exit::FAILED
    }
}

fn start(cli: Cli) -> Result<u8> {
    let target = match &cli.host {
        Some(h) => Target::Tcp(h.clone()),
        None => Target::Unix(cli.socket.clone()),
    };
    let token = cli.token_file.as_deref().map(Token::load).transpose()?;
    let tls = match (&cli.tls_dir, &cli.host) {
        (Some(dir), Some(host)) => {
            let certs = HostTls::load(dir).with_context(|| format!("{}", dir.display()))?;
            let name = match &cli.server_name {
                Some(n) => n.clone(),
                None => host
                    .rsplit_once(':')
                    .map_or(host.as_str(), |(h, _)| h)
                    .to_string(),
            };
            Some(HttpTls::new(&certs, name)?)
        }
        _ => None,
    };
    let client = MigratedClient::new(target, Duration::from_secs(cli.timeout_secs), token, tls);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(cli, client))
}

async fn run(cli: Cli, c: MigratedClient) -> Result<u8> {
    let json = cli.json;
    run_cmd(cli.cmd, json, c).await
}

async fn run_cmd(cmd: Cmd, json: bool, c: MigratedClient) -> Result<u8> {
    match cmd {
        Cmd::Hosts => output(json, &c.hosts().await?, |h| print_hosts(h)).map(ok),
        Cmd::Instances => output(json, &c.instances().await?, |l| print_instances(l)).map(ok),
        Cmd::Show { name } => print_json(&c.instance(&name).await?).map(ok),
        Cmd::Run { config } => {
            let cfg = InstanceConfig::load(&config)
                .with_context(|| format!("reading {}", config.display()))?;
            output(json, &c.run(&cfg).await?, |r| {
                println!(
                    "{} running (pid {}), serial {}, API {}",
                    r.name,
                    r.pid.unwrap_or(0),
                    r.serial_socket.display(),
                    r.api_socket.display()
                )
            })
            .map(ok)
        }
        Cmd::Rm { name } => output(json, &c.remove(&name).await?, |r| {
            println!("{} removed (it was {})", r.name, r.state)
        })
        .map(ok),
        Cmd::Stop { name } => output(json, &c.stop(&name).await?, |r| {
            let how = r.exit.as_deref().unwrap_or("stopped");
            println!("{} stopped ({how})", r.name)
        })
        .map(ok),
        Cmd::Migrate {
            name,
            to,
            downtime_ms,
            max_iterations,
            throttle,
            no_wait,
        } => {
            let req = MigrateRequest {
                to,
                params: MigrationParams {
                    downtime_ms,
                    max_iterations,
                    throttle,
                },
            };
            let memory = c.instance(&name).await?.config.memory_mib << 20;
            let rec = c.migrate(&name, &req).await?;
            if no_wait {
                output(json, &rec, |r| println!("migration {} started", r.id))?;
                return Ok(exit::OK);
            }
            let done = match follow(&c, &rec.id, memory, json, true).await? {
                Followed::Ended(m) => m,
                Followed::Detached => return Ok(exit::OK),
            };
            output(json, &done, |m| summary(&m.record))?;
            Ok(match done.record.phase {
                Phase::Completed => exit::OK,
                Phase::Aborted => exit::ABORTED,
                _ => exit::FAILED,
            })
        }
        Cmd::Abort { id, no_wait } => {
            let rec = c.abort(&id).await?;
            if no_wait {
                output(json, &rec, |r| {
                    println!("migration {}: abort requested", r.id)
                })?;
                return Ok(exit::OK);
            }
            if !json {
                eprintln!("migration {id}: abort requested; waiting for it to end");
            }
            let done = match follow(&c, &id, 0, true, false).await? {
                Followed::Ended(m) => m,
                Followed::Detached => return Ok(exit::OK),
            };
            output(json, &done, |m| summary(&m.record))?;
            Ok(match done.record.phase {
                Phase::Aborted => exit::OK,
                _ => exit::FAILED,
            })
        }
        Cmd::Migrations { id: Some(id) } => output(json, &c.migration(&id).await?, |m| {
            summary(&m.record);
            for s in &m.record.steps {
                let since = s.at_ms.saturating_sub(m.record.started_ms) as f64 / 1000.0;
                println!(
                    "  {}  +{since:>7.3} s  {:<12} {}",
                    utc(s.at_ms),
                    s.phase,
                    s.note
                );
            }
        })
        .map(ok),
        Cmd::Migrations { id: None } => output(json, &c.migrations().await?, |all| {
            println!(
                "{:<40} {:<12} {:<24} {:<20} {:<20}",
                "ID", "PHASE", "STARTED", "SOURCE", "DESTINATION"
            );
            for MigrationInfo { record: r, .. } in all {
                println!(
                    "{:<40} {:<12} {:<24} {:<20} {:<20}",
                    r.id,
                    r.phase,
                    utc(r.started_ms),
                    r.source,
                    r.destination
                );
            }
        })
        .map(ok),
    }
}

/// A command that succeeded.
fn ok(_: ()) -> u8 {
    exit::OK
}

/// Prints `v` as JSON with `--json`, else as `text` writes it for a person.
fn output<T: Serialize>(json: bool, v: &T, text: impl FnOnce(&T)) -> Result<()> {
    if json {
        return print_json(v);
    }
    text(v);
    Ok(())
}

fn print_hosts(hosts: &[HostEntry]) {
    println!(
        "{:<16} {:<22} {:<12} {:>9}",
        "HOST", "ADDRESS", "STATUS", "INSTANCES"
    );
    for h in hosts {
        let status = match (h.local, h.reachable) {
            (true, _) => "this host",
            (false, true) => "up",
            (false, false) => "unreachable",
        };
        let n = h
            .info
            .as_ref()
            .map(|i| i.active_instances.to_string())
            .unwrap_or_else(|| "-".into());
        println!("{:<16} {:<22} {:<12} {:>9}", h.host_id, h.addr, status, n);
    }
}

fn print_instances(list: &[InstanceRecord]) {
    println!(
        "{:<16} {:<14} {:>8} {:>7} {:>5}  DISKS",
        "NAME", "STATE", "PID", "MEM", "VCPUS"
    );
    for r in list {
        let disks: Vec<String> = r
            .config
            .disks
            .iter()
            .map(|d| match (&d.volume, &d.path) {
                (Some(v), _) => format!("volume:{v}"),
                (_, Some(p)) => p.display().to_string(),
                _ => "?".into(),
            })
            .collect();
        println!(
            "{:<16} {:<14} {:>8} {:>7} {:>5}  {}",
            r.name,
            r.state,
            r.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            format!("{}M", r.config.memory_mib),
            r.config.vcpus,
            disks.join(",")
        );
    }
}

/// How following a migration ended.
enum Followed {
    /// It reached a terminal phase.
    Ended(Box<MigrationInfo>),
    /// The operator stopped following it (Ctrl-C, then "detach"); it goes on.
    Detached,
}

/// Polls the migration until it ends, showing its progress (see [`Progress`]). With `ask`,
/// Ctrl-C asks whether to abort the migration or to detach from it (when stdin is not a
/// terminal it detaches).
async fn follow(
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

/// `ms` since the Unix epoch as a UTC time: `2026-12-03 19:55:40.267Z`.
fn utc(ms: u64) -> String {
    let (secs, milli) = (ms / 1000, ms % 1000);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Days since 1970-01-01 to a date of the proleptic Gregorian calendar (Howard Hinnant's
    // civil_from_days).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {h:02}:{m:02}:{s:02}.{milli:03}Z")
}

fn summary(r: &MigrationRecord) {
    println!(
        "migration {} of {}: {} -> {}: {}",
        r.id, r.instance, r.source, r.destination, r.phase
    );
    if let Some(e) = &r.error {
        println!("  reason: {e}");
    }
    if r.phase == Phase::Completed {
        let f = &r.figures;
        println!(
            "  total {} ms, downtime {:.1} ms, flip {} ms, {} sent",
            f.total_ms,
            if f.vmm_downtime_us > 0 {
                f.vmm_downtime_us as f64 / 1000.0
            } else {
                f.downtime_ms as f64
            },
            f.flip_ms,
            mib(f.bytes_sent)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use migrated::migration::record::{Progress as Figures, Role};

    #[test]
    fn times_read_as_utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00.000Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00.000Z");
        assert_eq!(utc(1_796_327_740_267), "2026-12-03 19:55:40.267Z");
    }

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
