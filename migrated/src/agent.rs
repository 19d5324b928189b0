//! The agent's shared state: configuration, the durable store, the instance and migration
//! records (always written to the store before they change in memory), the clients of the
//! VMMs, the peers and storaged, and the lifecycle of the guests and of the VMM processes
//! behind them: run, stop, watch (the steps on one process are in [`crate::vmm_process`]).
//!
//! Every change of a record is one structured event line (target `migrated::state`).

use crate::api::{ErrorKind, HostInfo, StopAnswer};
use crate::client::MigratedClient;
use crate::config::{AgentConfig, ConfigError, InstanceConfig};
use crate::disk_backend::{self, DiskBackendError};
use crate::instance::{proc_start_time, InstanceRecord, InstanceState};
use crate::migration::record::{MigrationRecord, Progress, Role};
use crate::store::{Store, StoreError};
use crate::vmm_process::{
    kill_pid, log_tail, prepare_work_dir, spawn_vmm, vhost_user_disks, vmm_config, IncomingFrom,
    VmmProcessError,
};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use storaged_client::rest::StoragedApi;
use thiserror::Error;
use vmm_api::client::VmmClient;
use vmm_api::config::LeaseMode;

/// How long a new VMM may take to answer on its API socket.
pub const VMM_START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a VMM gets to exit after `POST /v1/vm/shutdown` before SIGTERM, then SIGKILL.
pub const VMM_STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Interval of the liveness poll of adopted VMMs.
const ADOPTED_POLL: Duration = Duration::from_millis(250);

/// An operation the agent refused or could not complete.
#[derive(Debug, Error)]
pub enum AgentError {
    /// No instance of that name on this host.
    #[error("instance {0} not found")]
    NoInstance(String),
    /// No migration of that id on this host.
    #[error("migration {0} not found")]
    NoMigration(String),
    /// The instance left this host by a migration: the operator asked the wrong host.
    #[error("{name} now runs on {host} ({addr})")]
    MovedAway {
        /// The instance.
        name: String,
        /// The host it migrated to.
        host: String,
        /// That host's REST address.
        addr: String,
    },
    /// An instance of that name still has a VMM here.
    #[error("instance {name} already exists here ({})", .state.words())]
    InstanceExists {
        /// The instance.
        name: String,
        /// Its state.
        state: InstanceState,
    },
    /// A migration owns the instance: it cannot be stopped now.
    #[error("instance {name} is {}: a migration owns it", .state.words())]
    Migrating {
        /// The instance.
        name: String,
        /// Its state.
        state: InstanceState,
    },
    /// The instance still has (or may have) a VMM here: it cannot be removed.
    #[error("instance {name} is {}: stop it first (only an instance whose VMM is gone can be removed)", .state.words())]
    Active {
        /// The instance.
        name: String,
        /// Its state.
        state: InstanceState,
    },
    /// The guest's description is invalid.
    #[error("invalid request")]
    Invalid(#[from] ConfigError),
    /// The state store failed.
    #[error("state store")]
    Store(#[from] StoreError),
    /// A VMM process could not be managed.
    #[error("VMM process")]
    VmmProcess(#[from] VmmProcessError),
    /// A vhost-user disk backend could not be started.
    #[error("vhost-user disk backend")]
    DiskBackend(#[from] DiskBackendError),
}

impl AgentError {
    /// What kind of failure this is, for the API's answer.
    pub fn kind(&self) -> ErrorKind {
        match self {
            AgentError::NoInstance(_) | AgentError::NoMigration(_) => ErrorKind::NotFound,
            AgentError::InstanceExists { .. }
            | AgentError::MovedAway { .. }
            | AgentError::Migrating { .. }
            | AgentError::Active { .. } => ErrorKind::Conflict,
            AgentError::Invalid(_) => ErrorKind::BadRequest,
            AgentError::VmmProcess(_) | AgentError::DiskBackend(_) => ErrorKind::BadGateway,
            AgentError::Store(_) => ErrorKind::Internal,
        }
    }
}

/// The agent.
pub struct Agent {
    /// Settings.
    pub cfg: AgentConfig,
    store: Store,
    instances: Records<InstanceRecord>,
    migrations: Records<MigrationRecord>,
    progress: Mutex<HashMap<String, Progress>>,
    /// Migrations an operator asked to abort (`POST /v1/migrations/{id}/abort`).
    aborts: Mutex<std::collections::HashSet<String>>,
    /// The Prometheus metrics (`GET /metrics`).
    pub metrics: crate::metrics::Metrics,
    /// Told whenever a migration record ended (published terminal), for [`Agent::ended`].
    ended: tokio::sync::watch::Sender<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The records of one kind in memory, by key (an instance's name, a migration's id). A
/// change is saved (durably) and then published, one change at a time (the writer lock, held
/// across the commit), so readers never see a record the store does not hold and two changes
/// never interleave; readers take only the map's lock, which no commit holds.
struct Records<T> {
    map: Mutex<BTreeMap<String, T>>,
    writer: tokio::sync::Mutex<()>,
    /// A record's key.
    key: fn(&T) -> &str,
    /// The error for a key with no record.
    missing: fn(String) -> AgentError,
}

impl<T: Clone> Records<T> {
    fn new(all: Vec<T>, key: fn(&T) -> &str, missing: fn(String) -> AgentError) -> Records<T> {
        let map = all.into_iter().map(|r| (key(&r).to_string(), r)).collect();
        Records {
            map: Mutex::new(map),
            writer: tokio::sync::Mutex::new(()),
            key,
            missing,
        }
    }

    fn get(&self, key: &str) -> Result<T, AgentError> {
        let rec = lock(&self.map).get(key).cloned();
        rec.ok_or_else(|| (self.missing)(key.to_string()))
    }

    fn all(&self) -> Vec<T> {
        lock(&self.map).values().cloned().collect()
    }

    /// Makes `rec`, saved already, what readers see.
    fn publish(&self, rec: T) {
        lock(&self.map).insert((self.key)(&rec).to_string(), rec);
    }

    /// Saves `rec` with `save`, then publishes it.
    async fn put(
        &self,
        mut rec: T,
        save: impl AsyncFnOnce(&mut T) -> Result<(), AgentError>,
    ) -> Result<(), AgentError> {
        let _one = self.writer.lock().await;
        save(&mut rec).await?;
        self.publish(rec);
        Ok(())
    }

    /// Changes record `key` with `f`, saves it with `save`, then publishes it; returns it.
    async fn update(
        &self,
        key: &str,
        f: impl FnOnce(&mut T),
        save: impl AsyncFnOnce(&mut T) -> Result<(), AgentError>,
    ) -> Result<T, AgentError> {
        let _one = self.writer.lock().await;
        let mut rec = self.get(key)?;
        f(&mut rec);
        save(&mut rec).await?;
        self.publish(rec.clone());
        Ok(rec)
    }
}

fn log_instance(r: &InstanceRecord) {
    tracing::info!(target: "migrated::state", event = "instance", instance = %r.name,
        state = ?r.state, pid = ?r.pid, migration = ?r.migration, exit = ?r.exit,
        "instance {} is {:?}", r.name, r.state);
}

fn log_migration(r: &MigrationRecord) {
    let note = r.steps.last().map(|s| s.note.as_str()).unwrap_or("");
    tracing::info!(target: "migrated::state", event = "migration", migration = %r.id,
        instance = %r.instance, role = ?r.role, phase = ?r.phase, source = %r.source,
        destination = %r.destination, flipped = ?r.flipped, error = ?r.error, note = %note,
        "migration {} {:?}", r.id, r.phase);
}

impl Agent {
    /// Opens the state directory and loads the records (no process is touched yet; see
    /// [`crate::recovery`]).
    pub fn open(cfg: AgentConfig) -> Result<Arc<Agent>, AgentError> {
        std::fs::create_dir_all(cfg.state_dir.join("instances")).map_err(|e| {
            AgentError::VmmProcess(VmmProcessError::WorkDir(cfg.state_dir.clone(), e))
        })?;
        let store = Store::open(&cfg.state_dir.join("state.redb"))?;
        let instances = Records::new(store.instances()?, |r| &r.name, AgentError::NoInstance);
        let migrations = Records::new(store.migrations()?, |r| &r.id, AgentError::NoMigration);
        Ok(Arc::new(Agent {
            cfg,
            store,
            instances,
            migrations,
            progress: Mutex::new(HashMap::new()),
            aborts: Mutex::new(Default::default()),
            metrics: crate::metrics::Metrics::new(),
            ended: tokio::sync::watch::Sender::new(()),
        }))
    }

    // ----- records -----

    /// Writes an instance record durably, then publishes it.
    pub async fn put_instance(&self, rec: InstanceRecord) -> Result<(), AgentError> {
        let save = async |r: &mut InstanceRecord| self.save_instance(r).await;
        self.instances.put(rec, save).await
    }

    /// Changes an instance record with `f`, durably, then publishes it.
    pub async fn update_instance(
        &self,
        name: &str,
        f: impl FnOnce(&mut InstanceRecord),
    ) -> Result<InstanceRecord, AgentError> {
        let save = async |r: &mut InstanceRecord| self.save_instance(r).await;
        self.instances.update(name, f, save).await
    }

    async fn save_instance(&self, rec: &mut InstanceRecord) -> Result<(), AgentError> {
        rec.updated_ms = crate::now_ms();
        self.store.put_instance(rec).await?;
        log_instance(rec);
        Ok(())
    }

    /// One instance.
    pub fn instance(&self, name: &str) -> Result<InstanceRecord, AgentError> {
        self.instances.get(name)
    }

    /// Every instance.
    pub fn instances(&self) -> Vec<InstanceRecord> {
        self.instances.all()
    }

    /// Where instance `name` went when it last left this host by a completed migration: the
    /// destination's host id and REST address.
    pub fn moved_to(&self, name: &str) -> Option<(String, String)> {
        self.migrations()
            .into_iter()
            .filter(|m| m.instance == name && m.role == Role::Source)
            .filter(|m| m.phase == crate::migration::record::Phase::Completed)
            .max_by_key(|m| m.started_ms)
            .map(|m| (m.destination, m.peer_addr))
    }

    /// Instance `name` as an operator's request about it here sees it: an instance that left
    /// this host by a migration (migrated away, or forgotten since) is an error that names the
    /// host it went to.
    pub fn instance_here(&self, name: &str) -> Result<InstanceRecord, AgentError> {
        let found = self.instance(name);
        let gone = match &found {
            Ok(r) => r.state == InstanceState::MigratedAway,
            Err(e) => matches!(e, AgentError::NoInstance(_)),
        };
        match (gone, self.moved_to(name)) {
            (true, Some((host, addr))) => Err(AgentError::MovedAway {
                name: name.to_string(),
                host,
                addr,
            }),
            _ => found,
        }
    }

    /// Forgets an instance whose VMM is gone (stopped, exited, lost, migrated away, failed):
    /// its record, then its work directory (logs included). Refused while a VMM may run for
    /// it or a migration owns it. Returns the record as it was.
    pub async fn remove_instance(&self, name: &str) -> Result<InstanceRecord, AgentError> {
        let _one = self.instances.writer.lock().await;
        let rec = self.instances.get(name)?;
        if !rec.state.is_terminal() || rec.migration.is_some() || rec.vmm_alive() {
            return Err(AgentError::Active {
                name: rec.name,
                state: rec.state,
            });
        }
        self.store.delete_instance(name).await?;
        lock(&self.instances.map).remove(name);
        if let Err(e) = std::fs::remove_dir_all(&rec.work_dir) {
            tracing::warn!(instance = %name, dir = %rec.work_dir.display(), error = %e,
                "removing the instance's directory");
        }
        tracing::info!(target: "migrated::state", event = "removed", instance = %name,
            "instance {name} removed");
        Ok(rec)
    }

    /// Writes a migration record durably, then publishes it.
    pub async fn put_migration(&self, rec: MigrationRecord) -> Result<(), AgentError> {
        let save = async |r: &mut MigrationRecord| self.save_migration(r).await;
        let ended = rec.phase.is_terminal();
        self.migrations.put(rec, save).await?;
        if ended {
            self.ended.send_replace(());
        }
        Ok(())
    }

    /// Migration `id` once it ended here, or as it is after `wait` (a long poll).
    pub async fn ended(&self, id: &str, wait: Duration) -> Result<MigrationRecord, AgentError> {
        let deadline = tokio::time::Instant::now() + wait;
        // Subscribed before the record is read: an end published after the read wakes it.
        let mut ended = self.ended.subscribe();
        loop {
            let rec = self.migration(id)?;
            if rec.phase.is_terminal() {
                return Ok(rec);
            }
            match tokio::time::timeout_at(deadline, ended.changed()).await {
                Ok(Ok(())) => {}
                _ => return self.migration(id),
            }
        }
    }

    /// Changes a migration record with `f`, durably, then publishes it.
    pub async fn update_migration(
        &self,
        id: &str,
        f: impl FnOnce(&mut MigrationRecord),
    ) -> Result<MigrationRecord, AgentError> {
        let mut ended_before = false;
        let change = |r: &mut MigrationRecord| {
            ended_before = r.phase.is_terminal();
            f(r)
        };
        let save = async |r: &mut MigrationRecord| self.save_migration(r).await;
        let rec = self.migrations.update(id, change, save).await?;
        if rec.phase.is_terminal() && !ended_before {
            self.metrics.migration_ended(&rec);
            self.ended.send_replace(());
        }
        Ok(rec)
    }

    /// Changes a migration record with `f` and publishes it (the API, the log and the fault
    /// points see it) without writing the store: for the steps of the guest's pause that a
    /// crash may lose because recovery reads storaged instead (the caller says why). The next
    /// durable write ([`Self::update_migration`]) carries them. Never for a terminal phase.
    pub async fn update_migration_in_memory(
        &self,
        id: &str,
        f: impl FnOnce(&mut MigrationRecord),
    ) -> Result<MigrationRecord, AgentError> {
        let announce = async |r: &mut MigrationRecord| {
            debug_assert!(!r.phase.is_terminal(), "a terminal phase is always durable");
            self.announce_migration(r);
            Ok(())
        };
        self.migrations.update(id, f, announce).await
    }

    async fn save_migration(&self, rec: &mut MigrationRecord) -> Result<(), AgentError> {
        self.store.put_migration(rec).await?;
        self.announce_migration(rec);
        Ok(())
    }

    /// What follows a change of a migration record: its log line, the fault point of its
    /// phase, and, once it ended, its live progress and abort request dropped.
    fn announce_migration(&self, rec: &MigrationRecord) {
        log_migration(rec);
        if vmhop_common::faults::is_armed() {
            let role = match rec.role {
                Role::Source => "source",
                Role::Destination => "destination",
            };
            vmhop_common::faults::point(&format!("{role}.{}", rec.phase.as_str()));
        }
        if rec.phase.is_terminal() {
            lock(&self.progress).remove(&rec.id);
            lock(&self.aborts).remove(&rec.id);
        }
    }

    /// One migration.
    pub fn migration(&self, id: &str) -> Result<MigrationRecord, AgentError> {
        self.migrations.get(id)
    }

    /// Every migration.
    pub fn migrations(&self) -> Vec<MigrationRecord> {
        self.migrations.all()
    }

    /// This host's summary (`GET /v1/host`).
    pub fn host_info(&self) -> HostInfo {
        HostInfo {
            host_id: self.cfg.host_id.clone(),
            listen: self.cfg.listen.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            active_instances: self
                .instances()
                .iter()
                .filter(|i| !i.state.is_terminal())
                .count(),
            active_migrations: self
                .migrations()
                .iter()
                .filter(|m| !m.phase.is_terminal())
                .count(),
        }
    }

    /// Notes that an operator asked to abort migration `id` (its source task acts on it).
    pub fn request_abort(&self, id: &str) {
        lock(&self.aborts).insert(id.to_string());
    }

    /// Whether an operator asked to abort migration `id`.
    pub fn abort_requested(&self, id: &str) -> bool {
        lock(&self.aborts).contains(id)
    }

    /// Publishes live progress.
    pub fn set_progress(&self, id: &str, p: Progress) {
        lock(&self.progress).insert(id.to_string(), p);
    }

    /// Live progress of a running migration.
    pub fn progress(&self, id: &str) -> Option<Progress> {
        lock(&self.progress).get(id).cloned()
    }

    /// A client of the peer migrated `host` at `addr`, with the cluster's token; in TLS the
    /// peer must prove `host` (or, when that is not known, the IP address of `addr`).
    pub fn peer(&self, host: &str, addr: &str) -> MigratedClient {
        let tls = self.cfg.tls.as_ref().map(|t| {
            let name = match host {
                "" => addr.rsplit_once(':').map_or(addr, |(h, _)| h),
                h => h,
            };
            t.peers
                .with_server(name.trim_start_matches('[').trim_end_matches(']'))
        });
        MigratedClient::peer(addr, self.cfg.token.as_ref(), tls)
    }

    /// A client of storaged's REST API (the leases).
    pub fn storaged(&self) -> StoragedApi {
        StoragedApi::new(&self.cfg.storaged_api, self.cfg.storaged_token.clone())
    }

    /// A client for an instance's VMM API.
    pub fn vmm(&self, rec: &InstanceRecord) -> VmmClient {
        VmmClient::new(&rec.api_socket)
    }

    // ----- VMM processes -----

    /// Spawns the VMM of `rec` (already recorded as starting or incoming), records its pid,
    /// watches it, and waits for its API. On failure the instance is marked failed.
    pub async fn start_vmm(
        self: &Arc<Self>,
        rec: &InstanceRecord,
        incoming: Option<IncomingFrom<'_>>,
    ) -> Result<InstanceRecord, AgentError> {
        let lease = if incoming.is_some() {
            LeaseMode::Standby
        } else {
            LeaseMode::Primary
        };
        let result = self.spawn_and_wait(rec, incoming, lease).await;
        if let Err(e) = &result {
            let why = vmhop_common::error::chain(e);
            let _ = self
                .update_instance(&rec.name, |r| {
                    r.state = InstanceState::Failed;
                    r.exit = Some(why);
                })
                .await;
            if let Ok(r) = self.instance(&rec.name) {
                if r.vmm_alive() {
                    kill_pid(&r, libc::SIGKILL);
                }
            }
        }
        result
    }

    async fn spawn_and_wait(
        self: &Arc<Self>,
        rec: &InstanceRecord,
        incoming: Option<IncomingFrom<'_>>,
        lease: LeaseMode,
    ) -> Result<InstanceRecord, AgentError> {
        let vm = vmm_config(rec, &self.cfg, lease);
        let config_path = prepare_work_dir(rec, &vm)?;
        // The disks served outside the VMM listen before the VMM connects to them.
        disk_backend::start(
            &self.cfg.vhost_user_binary,
            rec,
            &vhost_user_disks(rec),
            &self.cfg,
            lease,
        )
        .await?;
        let child = match spawn_vmm(&self.cfg, rec, &config_path, incoming) {
            Ok(c) => c,
            Err(e) => {
                disk_backend::stop_all(&rec.work_dir).await;
                return Err(e.into());
            }
        };
        let pid = child.id().unwrap_or(0);
        let start = proc_start_time(pid);
        let rec = self
            .update_instance(&rec.name, |r| {
                r.pid = Some(pid);
                r.pid_start = start;
                r.exit = None;
            })
            .await?;
        let me = self.clone();
        let name = rec.name.clone();
        tokio::spawn(async move {
            let mut child = child;
            let status = match child.wait().await {
                Ok(s) => s.to_string(),
                Err(e) => format!("wait failed: {e}"),
            };
            me.on_vmm_exit(&name, pid, status).await;
            me.end_disk_backends(&name, pid).await;
        });
        self.wait_api(&rec).await?;
        Ok(rec)
    }

    /// Polls the VMM's API until it answers, failing early when the process is gone.
    async fn wait_api(&self, rec: &InstanceRecord) -> Result<(), AgentError> {
        let deadline = Instant::now() + VMM_START_TIMEOUT;
        let vmm = self.vmm(rec).with_timeout(Duration::from_secs(5));
        loop {
            if vmm.info().await.is_ok() {
                return Ok(());
            }
            if !rec.vmm_alive() {
                // Let the exit watcher record the status first, for the message.
                let status = wait_exit_status(self, &rec.name).await;
                return Err(VmmProcessError::EarlyExit {
                    status,
                    log: log_tail(&rec.log, 2000),
                }
                .into());
            }
            if Instant::now() > deadline {
                return Err(VmmProcessError::ApiTimeout(VMM_START_TIMEOUT).into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Records the end of the VMM `pid` of `name` (if the record still refers to it).
    pub async fn on_vmm_exit(&self, name: &str, pid: u32, status: String) {
        let res = self
            .update_instance(name, |r| {
                if r.pid != Some(pid) {
                    return;
                }
                r.exit = Some(status.clone());
                r.state = match r.state {
                    InstanceState::Stopping => InstanceState::Stopped,
                    InstanceState::Incoming => InstanceState::Failed,
                    s if s.is_terminal() => s,
                    _ => InstanceState::Exited,
                };
            })
            .await;
        if let Err(e) = res {
            tracing::error!(instance = %name, error = %vmhop_common::error::chain(&e),
                "recording the VMM's exit");
        }
    }

    /// Ends the VMM of `rec` and waits until it is gone.
    pub async fn end_vmm(&self, rec: &InstanceRecord) {
        if !rec.vmm_alive() {
            return;
        }
        let vmm = self.vmm(rec).with_timeout(Duration::from_secs(10));
        let _ = vmm.shutdown().await;
        for sig in [None, Some(libc::SIGTERM), Some(libc::SIGKILL)] {
            if let Some(sig) = sig {
                kill_pid(rec, sig);
            }
            let deadline = Instant::now() + VMM_STOP_TIMEOUT;
            while rec.vmm_alive() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if !rec.vmm_alive() {
                return;
            }
            tracing::warn!(instance = %rec.name, pid = ?rec.pid, "VMM still running; signalling");
        }
    }

    /// Watches a VMM that is not our child by polling its pid and start time.
    pub fn watch_adopted(self: &Arc<Self>, rec: &InstanceRecord) {
        let me = self.clone();
        let rec = rec.clone();
        tokio::spawn(async move {
            while rec.vmm_alive() {
                tokio::time::sleep(ADOPTED_POLL).await;
            }
            let pid = rec.pid.unwrap_or(0);
            me.on_vmm_exit(
                &rec.name,
                pid,
                "exited (status unknown: adopted after a restart)".into(),
            )
            .await;
            me.end_disk_backends(&rec.name, pid).await;
        });
    }

    /// Ends the vhost-user disk backends of `name` once its VMM `pid` exited (unless another
    /// VMM of the instance started since).
    async fn end_disk_backends(&self, name: &str, pid: u32) {
        if let Ok(r) = self.instance(name) {
            if r.pid == Some(pid) {
                disk_backend::stop_all(&r.work_dir).await;
            }
        }
    }

    /// Refuses an invalid guest, or one whose name an instance with a VMM here has.
    pub fn check_new_instance(&self, config: &InstanceConfig) -> Result<(), AgentError> {
        config.validate()?;
        match self.instances.get(&config.name) {
            Ok(r) if !r.state.is_terminal() => Err(AgentError::InstanceExists {
                name: r.name.clone(),
                state: r.state,
            }),
            _ => Ok(()),
        }
    }

    /// Starts a guest on this host.
    pub async fn run(
        self: &Arc<Self>,
        config: InstanceConfig,
    ) -> Result<InstanceRecord, AgentError> {
        self.check_new_instance(&config)?;
        let rec = InstanceRecord::new(config, &self.cfg.state_dir, InstanceState::Starting);
        self.put_instance(rec.clone()).await?;
        self.start_vmm(&rec, None).await?;
        self.update_instance(&rec.name, |r| r.state = InstanceState::Running)
            .await
    }

    /// Stops a guest: API shutdown, then SIGTERM, then SIGKILL, each with a deadline. Once its
    /// VMM (and its disk backends) are gone, this host's leases on its storaged volumes are
    /// released, so that it can start on another host; what storaged did not take is reported
    /// with the command that releases it later. A guest stopped or ended already has only its
    /// leases released.
    pub async fn stop(self: &Arc<Self>, name: &str) -> Result<StopAnswer, AgentError> {
        let rec = self.instance_here(name)?;
        match rec.state {
            InstanceState::Running | InstanceState::Starting | InstanceState::Stopping => {}
            s if s.is_terminal() => return Ok(self.release_leases(rec).await),
            state => {
                return Err(AgentError::Migrating {
                    name: name.to_string(),
                    state,
                })
            }
        }
        let rec = self
            .update_instance(name, |r| r.state = InstanceState::Stopping)
            .await?;
        self.end_vmm(&rec).await;
        let rec = self
            .update_instance(name, |r| {
                if !r.state.is_terminal() {
                    r.state = InstanceState::Stopped;
                }
                if r.exit.is_none() {
                    r.exit = Some("stopped".into());
                }
            })
            .await?;
        Ok(self.release_leases(rec).await)
    }

    /// Releases this host's leases of the stopped or ended instance `rec`, unless its VMM
    /// still runs (it could not be ended).
    async fn release_leases(&self, rec: InstanceRecord) -> StopAnswer {
        if rec.vmm_alive() {
            return StopAnswer {
                record: rec,
                leases: Vec::new(),
            };
        }
        // The disks served outside the VMM hold leases too: they end first.
        disk_backend::stop_all(&rec.work_dir).await;
        let leases = crate::release::release(self, &rec.name, &rec.config.volumes(), None).await;
        StopAnswer {
            record: rec,
            leases,
        }
    }
}

/// Waits briefly for the exit watcher to record the status of `name`'s VMM.
async fn wait_exit_status(agent: &Agent, name: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        if let Ok(r) = agent.instance(name) {
            if let Some(e) = r.exit {
                return e;
            }
        }
        if Instant::now() > deadline {
            return "exited".into();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::InstanceConfig;

    fn config(dir: &std::path::Path) -> AgentConfig {
        AgentConfig {
            host_id: "a".into(),
            state_dir: dir.join("state"),
            listen: "127.0.0.1:7070".parse().unwrap(),
            socket: dir.join("m.sock"),
            storaged_api: "127.0.0.1:1".into(),
            storaged_nbd: "127.0.0.1:1".into(),
            vmm_binary: "/nonexistent".into(),
            vhost_user_binary: "/nonexistent".into(),
            migration_ip: "127.0.0.1".parse().unwrap(),
            peer_timeout_ms: 500,
            peers: BTreeMap::new(),
            ready_file: None,
            token: None,
            storaged_token: None,
            storaged_token_file: None,
            log_json: false,
            tls_dir: None,
            tls: None,
            storaged_name: None,
        }
    }

    /// A commit that cannot finish (another writer holds the database) holds up neither the
    /// runtime's one thread nor the readers: they see the record as the store has it.
    #[tokio::test(flavor = "current_thread")]
    async fn a_commit_waits_off_the_runtime_and_readers_do_not_wait_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let agent = Agent::open(config(dir.path())).unwrap();
        let rec = InstanceRecord::new(
            InstanceConfig::for_tests("vm1"),
            dir.path(),
            InstanceState::Running,
        );
        agent.put_instance(rec).await.unwrap();

        let (held_tx, held) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let db = agent.store.db();
        let holder = std::thread::spawn(move || {
            let txn = db.begin_write().unwrap();
            held_tx.send(()).unwrap();
            // Until the test says so (or, should the runtime be stuck, a while: the test then
            // fails instead of hanging).
            let _ = released.recv_timeout(Duration::from_secs(60));
            drop(txn);
        });
        held.recv().unwrap();

        let update = tokio::spawn({
            let agent = agent.clone();
            async move { agent.update_instance("vm1", |r| r.pid = Some(42)).await }
        });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!update.is_finished());
        assert_eq!(agent.instance("vm1").unwrap().pid, None);

        release.send(()).unwrap();
        let rec = update.await.unwrap().unwrap();
        assert_eq!(rec.pid, Some(42));
        assert_eq!(agent.instance("vm1").unwrap().pid, Some(42));
        holder.join().unwrap();
    }

    /// Migration `vm1.a.1` of `vm1` (one volume) in `role`, at pre-copy since `why`.
    fn precopy(
        role: crate::migration::record::Role,
        why: &str,
    ) -> crate::migration::record::MigrationRecord {
        let mut rec = crate::migration::record::MigrationRecord::new(
            "vm1.a.1".into(),
            "vm1".into(),
            role,
            Default::default(),
            vec!["v1".into()],
        );
        rec.step(crate::migration::record::Phase::Precopy, why);
        rec
    }

    /// The long poll of a migration's end: answers when the record ends (not at a change of
    /// phase before), or with the record as it is once the wait is over.
    #[tokio::test(flavor = "current_thread")]
    async fn a_long_poll_answers_when_the_migration_ended() {
        use crate::migration::record::{Phase, Role};
        let dir = tempfile::tempdir().unwrap();
        let agent = Agent::open(config(dir.path())).unwrap();
        let rec = precopy(Role::Destination, "incoming VMM ready");
        agent.put_migration(rec).await.unwrap();

        let r = agent.ended("vm1.a.1", Duration::ZERO).await.unwrap();
        assert_eq!(r.phase, Phase::Precopy);

        let waiting = tokio::spawn({
            let agent = agent.clone();
            async move { agent.ended("vm1.a.1", Duration::from_secs(600)).await }
        });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        agent
            .update_migration_in_memory("vm1.a.1", |r| r.step(Phase::Resuming, "resuming"))
            .await
            .unwrap();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiting.is_finished(), "a change of phase is not the end");
        agent
            .update_migration("vm1.a.1", |r| r.step(Phase::Completed, "runs here"))
            .await
            .unwrap();
        let r = waiting.await.unwrap().unwrap();
        assert_eq!(r.phase, Phase::Completed);
        // Ended already: at once.
        let r = agent
            .ended("vm1.a.1", Duration::from_secs(600))
            .await
            .unwrap();
        assert_eq!(r.phase, Phase::Completed);
    }

    /// A step published in memory is what readers see, but not what the store holds until
    /// the next durable write, which carries it.
    #[tokio::test]
    async fn steps_in_memory_reach_the_store_with_the_next_durable_write() {
        use crate::migration::record::{Phase, Role};
        let dir = tempfile::tempdir().unwrap();
        let agent = Agent::open(config(dir.path())).unwrap();
        let rec = precopy(Role::Source, "streaming");
        agent.put_migration(rec).await.unwrap();
        let stored = |agent: &Agent| agent.store.migrations().unwrap().remove(0);

        agent
            .update_migration_in_memory("vm1.a.1", |r| r.step(Phase::HandedOver, "handed over"))
            .await
            .unwrap();
        assert_eq!(agent.migration("vm1.a.1").unwrap().phase, Phase::HandedOver);
        assert_eq!(stored(&agent).phase, Phase::Precopy);

        agent
            .update_migration("vm1.a.1", |r| r.step(Phase::Flipping, "flipping"))
            .await
            .unwrap();
        let on_disk = stored(&agent);
        assert_eq!(on_disk.phase, Phase::Flipping);
        let phases: Vec<Phase> = on_disk.steps.iter().map(|s| s.phase).collect();
        assert_eq!(phases, [Phase::Precopy, Phase::HandedOver, Phase::Flipping]);
        assert_eq!(on_disk, agent.migration("vm1.a.1").unwrap());
    }
}
