//! `migratectl`: the operator's command line for migrated.
//!
//! ```text
//! migratectl [--socket PATH | --host ADDR [--token-file FILE] [--tls-dir DIR [--server-name ID]]]
//!            [--json] hosts
//! migratectl instances | show NAME | run CONFIG.toml | stop NAME
//! migratectl migrate NAME --to HOST [--downtime-ms N] [--max-iterations N] [--throttle]
//! migratectl migrations [ID]
//! ```
//! Talks to the local migrated's Unix socket by default, or to any migrated's REST address
//! with `--host`. `--json` prints the API's JSON instead of text; exit status 1 on any
//! failure (including a migration that aborted).

use anyhow::{bail, Context, Result};
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
use vmhop_common::http::{HttpTls, Target};
use vmhop_common::tls::HostTls;
use vmhop_common::token::Token;

#[derive(Parser)]
#[command(
    name = "migratectl",
    version,
    about = "Run and migrate guests through migrated"
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

fn main() -> Result<()> {
    vmhop_common::man::generate_if_asked(Cli::command);
    let cli = Cli::parse();
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

async fn run(cli: Cli, c: MigratedClient) -> Result<()> {
    let json = cli.json;
    match cli.cmd {
        Cmd::Hosts => output(json, &c.hosts().await?, |h| print_hosts(h)),
        Cmd::Instances => output(json, &c.instances().await?, |l| print_instances(l)),
        Cmd::Show { name } => print_json(&c.instance(&name).await?),
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
        }
        Cmd::Stop { name } => output(json, &c.stop(&name).await?, |r| {
            let how = r.exit.as_deref().unwrap_or("stopped");
            println!("{} stopped ({how})", r.name)
        }),
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
            let rec = c.migrate(&name, &req).await?;
            if no_wait {
                return output(json, &rec, |r| println!("migration {} started", r.id));
            }
            let done = follow(&c, &rec.id, json).await?;
            output(json, &done, |m| summary(&m.record))?;
            if done.record.phase != Phase::Completed {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Migrations { id: Some(id) } => output(json, &c.migration(&id).await?, |m| {
            summary(&m.record);
            for s in &m.record.steps {
                println!("  {} {:<12} {}", s.at_ms, s.phase, s.note);
            }
        }),
        Cmd::Migrations { id: None } => output(json, &c.migrations().await?, |all| {
            for MigrationInfo { record: r, .. } in all {
                println!(
                    "{:<40} {:<12} {} -> {}",
                    r.id, r.phase, r.source, r.destination
                );
            }
        }),
    }
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

/// Polls the migration until it ends, drawing the progress line.
async fn follow(c: &MigratedClient, id: &str, quiet: bool) -> Result<MigrationInfo> {
    let tty = std::io::stderr().is_terminal();
    let mut last = String::new();
    let mut failures = 0;
    loop {
        let m = match c.migration(id).await {
            Ok(m) => {
                failures = 0;
                m
            }
            Err(e) => {
                failures += 1;
                if failures > 50 {
                    bail!("lost contact with migrated while following {id}: {e}");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if !quiet {
            let line = progress_line(&m);
            if line != last {
                if tty {
                    eprint!("\r\x1b[2K{line}");
                } else {
                    eprintln!("{line}");
                }
                let _ = std::io::stderr().flush();
                last = line;
            }
        }
        if m.record.phase.is_terminal() {
            if tty && !quiet {
                eprintln!();
            }
            return Ok(m);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn progress_line(m: &MigrationInfo) -> String {
    let phase = m.record.phase;
    match &m.progress {
        Some(p) => format!(
            "{phase:<12} vmm {:<11} iteration {:>3}  {:>10} left  dirty {:>8}/s  ETA {}  ({:.1} s)",
            p.vmm_phase,
            p.iteration,
            mib(p.bytes_remaining),
            mib(p.dirty_rate_bytes_per_sec),
            p.eta_ms
                .map(|e| format!("{:.1} s", e as f64 / 1000.0))
                .unwrap_or_else(|| "?".into()),
            p.elapsed_ms as f64 / 1000.0
        ),
        None => format!(
            "{phase:<12} {}",
            m.record.steps.last().map(|s| s.note.as_str()).unwrap_or("")
        ),
    }
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
