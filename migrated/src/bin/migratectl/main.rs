//! `migratectl`: the operator's command line for migrated.
//!
//! ```text
//! migratectl [--socket PATH | --host ADDR [--token-file FILE] [--tls-dir DIR [--server-name ID]]]
//!            [--json] hosts
//! migratectl instances | show NAME | run CONFIG.toml | stop NAME | rm NAME
//! migratectl migrate NAME --to HOST [--downtime-ms N] [--max-iterations N] [--throttle]
//! migratectl migrations [ID]
//! migratectl abort ID [--no-wait]
//! migratectl console NAME
//! ```
//! Talks to the local migrated's Unix socket by default, or to any migrated's REST address
//! with `--host`. `--json` prints the API's JSON instead of text (errors too, as
//! `{"error": ...}` on stdout, and on stderr as always). The exit status says how it ended (see `exit`): 0 done, 1 failed,
//! 2 usage, 3 migration aborted, 4 migrated unreachable.
//!
//! Files: this one parses the command line and runs the commands; `follow.rs` follows a
//! migration (progress, Ctrl-C); `show.rs` prints tables and summaries; `console.rs` attaches
//! the terminal to a guest's serial console.

mod console;
mod follow;
mod show;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use follow::{follow, Followed};
use migrated::api::{MigrateRequest, MigrationInfo};
use migrated::client::MigratedClient;
use migrated::config::InstanceConfig;
use migrated::migration::record::{MigrationParams, Phase};
use serde::Serialize;
use show::{print_hosts, print_instances, summary, utc};
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
    /// Print JSON (an error too, as `{"error": "..."}` on stdout).
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
    /// This host and whether it reaches storaged (where the leases are), and its peers and
    /// whether they answer.
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
    /// Stop a guest, then release this host's leases on its storaged volumes (so that it can
    /// start on another host); a lease storaged did not release is named with the command that
    /// releases it later. On a guest that ended already, releases its leases.
    Stop {
        /// Instance name.
        name: String,
    },
    /// Attach the terminal to a guest's serial console (raw mode on a terminal); Ctrl-] or the
    /// end of stdin detaches, the guest goes on. Local host only (not with --host).
    Console {
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
    if let (Cmd::Console { name }, Some(host)) = (&cli.cmd, &cli.host) {
        eprintln!(
            "migratectl: the console needs the local host: the serial socket of {name} is a file \
             on the guest's host; run `migratectl console {name}` there, not with --host {host}"
        );
        return Ok(exit::USAGE);
    }
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
            let how = r.record.exit.as_deref().unwrap_or("stopped");
            println!("{} stopped ({how})", r.record.name);
            for l in &r.leases {
                println!("  volume {}: {l}", l.volume);
            }
        })
        .map(ok),
        Cmd::Console { name } => {
            let rec = c.instance(&name).await?;
            if rec.state.is_terminal() {
                let how = rec.exit.as_deref().and_then(|e| e.lines().next());
                let how = how.unwrap_or("no VMM runs");
                anyhow::bail!("{name} is {} ({how}): no console", rec.state.words());
            }
            let socket = rec.serial_socket.clone();
            let ended =
                tokio::task::spawn_blocking(move || console::attach(&name, &socket)).await??;
            match ended {
                console::Ended::Detached => {
                    eprintln!("\ndetached from the console of {}", rec.name)
                }
                console::Ended::Closed => {
                    eprintln!("\nthe console of {} closed (its VMM ended)", rec.name)
                }
            }
            Ok(exit::OK)
        }
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
