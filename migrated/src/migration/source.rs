//! The source side of a migration: the state machine that migrated on the guest's current
//! host drives, one task per migration, through the phases of [`super::record::Phase`] (see
//! the sequence diagram in [`super`]).
//!
//! Each phase is written to the store before its action. Before `flipped` every failure
//! aborts: volumes already flipped are rolled back, the destination's standby leases are
//! revoked (so it can no longer take over), the destination is told to abort and the source
//! VMM resumes. From `flipped` on the guest may only continue on the destination.
//!
//! Failures are [`SourceError`]s until they become the record's `error` text and a log line
//! (in [`Source::finish`]); the refusals of [`start`] are answered to the API.

use crate::agent::{Agent, AgentError};
use crate::api::{ErrorKind, IncomingRequest, MigrateRequest};
use crate::client::MigratedClient;
use crate::instance::{InstanceRecord, InstanceState};
use crate::migration::record::{MigrationRecord, Phase, Progress, Role};
use std::sync::Arc;
use std::time::{Duration, Instant};
use storaged_client::api::{LeaseState, RollbackRequest};
use storaged_client::rest::StoragedApi;
use thiserror::Error;
use vmhop_common::error::chain as error_chain;
use vmhop_common::http::HttpError;
use vmm_api::client::VmmError;
use vmm_api::migration::{Phase as VmmPhase, ResumeMode, SendParams};

/// How often the source VMM's progress is read. The flip waits for the hand-over to be seen
/// here, with the guest paused: this interval is added to the downtime (up to its length).
const POLL: Duration = Duration::from_millis(5);
/// How long the live source VMM's API may fail to answer before the migration gives up.
const VMM_SILENCE: Duration = Duration::from_secs(5);
/// How often the destination is checked during pre-copy.
const PEER_CHECK: Duration = Duration::from_secs(1);
/// Pause between two attempts to have the destination resume.
const RESUME_RETRY: Duration = Duration::from_millis(500);

/// Why a migration was refused or did not complete at the source.
#[derive(Debug, Error)]
pub enum SourceError {
    /// The tuning asks for nothing.
    #[error("downtime_ms and max_iterations must be at least 1")]
    NoBudget,
    /// The destination is neither a configured peer nor an address.
    #[error("unknown host {to:?}: not a configured peer ({peers}) nor an address")]
    UnknownHost {
        /// What was asked for.
        to: String,
        /// The configured peers, comma-separated.
        peers: String,
    },
    /// The destination is this host.
    #[error("{0} is this host")]
    ThisHost(String),
    /// Only a running instance that no migration owns can migrate.
    #[error("instance {name} is {state:?}{}: only a running instance can migrate",
        .migration.as_ref().map(|m| format!(" (migration {m})")).unwrap_or_default())]
    NotRunning {
        /// The instance.
        name: String,
        /// Its state.
        state: InstanceState,
        /// The migration that owns it.
        migration: Option<String>,
    },
    /// The agent's records failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The destination's migrated did not answer.
    #[error("destination {host} ({addr}) unreachable")]
    Unreachable {
        /// Destination host id (empty when it was given as an address).
        host: String,
        /// Its REST address.
        addr: String,
        /// Cause.
        #[source]
        source: HttpError,
    },
    /// Another host answers at the destination's address.
    #[error("{addr} answers as host {answered}, not {expected}")]
    WrongHost {
        /// The address.
        addr: String,
        /// Who answered.
        answered: String,
        /// Who was expected.
        expected: String,
    },
    /// The source VMM is in another migration.
    #[error("the source VMM is already migrating (phase {0})")]
    VmmBusy(VmmPhase),
    /// A call to the source VMM failed.
    #[error("the source VMM")]
    Vmm(#[source] VmmError),
    /// The destination could not start its incoming VMM.
    #[error("destination {host} could not prepare")]
    PrepareFailed {
        /// Destination host id.
        host: String,
        /// Cause.
        #[source]
        source: HttpError,
    },
    /// The record reached pre-copy without the destination's stream address.
    #[error("no stream address")]
    NoStreamAddr,
    /// The source VMM reports that the stream failed or was aborted.
    #[error("the source VMM reports the stream {phase}: {reason}")]
    StreamFailed {
        /// The VMM's phase.
        phase: VmmPhase,
        /// The VMM's reason.
        reason: String,
    },
    /// The source VMM died or stopped answering.
    #[error("lost the source VMM")]
    VmmLost(#[source] VmmError),
    /// The destination abandoned the migration (its recorded reason).
    #[error("the destination gave up: {0}")]
    DestinationGaveUp(String),
    /// The destination stopped answering before any lease moved.
    #[error("destination {host} lost before the flip")]
    DestinationLost {
        /// Destination host id.
        host: String,
        /// Cause.
        #[source]
        source: HttpError,
    },
    /// storaged refused to flip a volume's lease to the destination.
    #[error("volume {volume}: flip refused")]
    FlipRefused {
        /// The volume.
        volume: String,
        /// Cause.
        #[source]
        source: HttpError,
    },
    /// The destination did not confirm that the guest runs there.
    #[error("the destination did not confirm the resume")]
    ResumeUnconfirmed(#[source] HttpError),
    /// The source VMM outlived its shutdown.
    #[error("the source VMM (pid {0:?}) did not end; its leases stay deactivated")]
    VmmStays(Option<u32>),
    /// migrated restarted in a phase from which the migration cannot go on.
    #[error("migrated restarted during {0:?}")]
    Restarted(Phase),
    /// migrated restarted during the flips and storaged did not tell which had happened.
    #[error("migrated restarted during {phase:?}; reading the leases")]
    LeasesUnknown {
        /// The phase.
        phase: Phase,
        /// Cause.
        #[source]
        source: HttpError,
    },
    /// A rollback was under way (its recorded reason).
    #[error("{0}")]
    RollingBack(String),
    /// Rolling a flipped volume back failed.
    #[error("then the rollback of volume {volume} failed")]
    RollbackFailed {
        /// The volume.
        volume: String,
        /// Cause.
        #[source]
        source: HttpError,
    },
    /// The destination took a volume over while the source aborted.
    #[error("but the destination holds volume {0}: the source cannot resume")]
    DestinationHolds(String),
}

impl SourceError {
    /// What kind of failure this is, for the API's answer.
    pub fn kind(&self) -> ErrorKind {
        match self {
            SourceError::NoBudget | SourceError::UnknownHost { .. } | SourceError::ThisHost(_) => {
                ErrorKind::BadRequest
            }
            SourceError::NotRunning { .. } | SourceError::VmmBusy(_) => ErrorKind::Conflict,
            SourceError::Agent(e) => e.kind(),
            SourceError::NoStreamAddr | SourceError::Restarted(_) | SourceError::RollingBack(_) => {
                ErrorKind::Internal
            }
            SourceError::Unreachable { .. }
            | SourceError::WrongHost { .. }
            | SourceError::Vmm(_)
            | SourceError::PrepareFailed { .. }
            | SourceError::StreamFailed { .. }
            | SourceError::VmmLost(_)
            | SourceError::DestinationGaveUp(_)
            | SourceError::DestinationLost { .. }
            | SourceError::FlipRefused { .. }
            | SourceError::ResumeUnconfirmed(_)
            | SourceError::VmmStays(_)
            | SourceError::LeasesUnknown { .. }
            | SourceError::RollbackFailed { .. }
            | SourceError::DestinationHolds(_) => ErrorKind::BadGateway,
        }
    }
}

/// Starts migrating instance `name` (answers once the migration is recorded).
pub fn start(
    agent: &Arc<Agent>,
    name: &str,
    req: MigrateRequest,
) -> Result<MigrationRecord, SourceError> {
    if req.params.max_iterations == 0 || req.params.downtime_ms == 0 {
        return Err(SourceError::NoBudget);
    }
    let (destination, peer_addr) = match agent.cfg.peers.get(&req.to) {
        Some(addr) => (req.to.clone(), addr.clone()),
        None if req.to.parse::<std::net::SocketAddr>().is_ok() => (String::new(), req.to.clone()),
        None => {
            let peers: Vec<&str> = agent.cfg.peers.keys().map(String::as_str).collect();
            return Err(SourceError::UnknownHost {
                to: req.to,
                peers: peers.join(", "),
            });
        }
    };
    if destination == agent.cfg.host_id {
        return Err(SourceError::ThisHost(destination));
    }
    let id = format!("{name}.{}.{}", agent.cfg.host_id, crate::now_ms());
    let mut claimed = false;
    let inst = agent.update_instance(name, |r| {
        claimed = r.state == InstanceState::Running && r.migration.is_none();
        if claimed {
            r.state = InstanceState::Migrating;
            r.migration = Some(id.clone());
        }
    })?;
    if !claimed {
        return Err(SourceError::NotRunning {
            name: name.to_string(),
            state: inst.state,
            migration: inst.migration,
        });
    }
    let mut rec = MigrationRecord {
        source: agent.cfg.host_id.clone(),
        destination,
        peer_addr,
        ..MigrationRecord::new(
            id,
            name.to_string(),
            Role::Source,
            req.params,
            inst.config.volumes(),
        )
    };
    rec.step(Phase::Created, format!("requested: to {}", req.to));
    if let Err(e) = agent.put_migration(rec.clone()) {
        let _ = agent.update_instance(name, |r| {
            r.state = InstanceState::Running;
            r.migration = None;
        });
        return Err(e.into());
    }
    let src = Source::new(agent.clone(), &rec);
    tokio::spawn(src.run());
    Ok(rec)
}

/// Picks up a source-side migration left unfinished by a previous run of migrated.
pub fn resume_after_restart(agent: Arc<Agent>, rec: MigrationRecord) {
    let src = Source::new(agent, &rec);
    tokio::spawn(src.recover());
}

/// The task that drives one migration.
struct Source {
    agent: Arc<Agent>,
    id: String,
    peer: MigratedClient,
    leases: StoragedApi,
    started: Instant,
    paused_at: Option<Instant>,
    flip_ms: u64,
}

impl Source {
    fn new(agent: Arc<Agent>, rec: &MigrationRecord) -> Source {
        Source {
            peer: agent.peer(&rec.peer_addr),
            leases: agent.storaged(),
            agent,
            id: rec.id.clone(),
            started: Instant::now(),
            paused_at: None,
            flip_ms: 0,
        }
    }

    fn rec(&self) -> Result<MigrationRecord, AgentError> {
        self.agent.migration(&self.id)
    }

    fn inst(&self) -> Result<InstanceRecord, AgentError> {
        self.agent.instance(&self.rec()?.instance)
    }

    /// Records `phase` (durably) before the caller acts on it.
    fn set(&self, phase: Phase, note: impl Into<String>) -> Result<MigrationRecord, AgentError> {
        self.modify(|r| r.step(phase, note))
    }

    fn modify(&self, f: impl FnOnce(&mut MigrationRecord)) -> Result<MigrationRecord, AgentError> {
        self.agent.update_migration(&self.id, f)
    }

    async fn run(mut self) {
        let outcome = self.drive().await;
        self.finish(outcome).await;
    }

    /// Ends the task: a failure before the flip aborts, after it fails for the operator.
    async fn finish(mut self, outcome: Result<(), SourceError>) {
        let Err(err) = outcome else { return };
        let reason = error_chain(&err);
        let phase = self.rec().map(|r| r.phase).unwrap_or(Phase::Failed);
        if phase.past_point_of_no_return() {
            self.fail(&reason);
        } else if phase != Phase::Aborted && phase != Phase::Failed {
            self.abort(&reason).await;
        }
    }

    async fn recover(mut self) {
        let outcome = self.recovered().await;
        self.finish(outcome).await;
    }

    /// Goes on from the recorded phase after a restart, or says why it cannot.
    async fn recovered(&mut self) -> Result<(), SourceError> {
        let rec = self.rec()?;
        match rec.phase {
            Phase::Created | Phase::Preparing | Phase::Precopy => {
                Err(SourceError::Restarted(rec.phase))
            }
            Phase::HandedOver | Phase::Flipping => {
                // Which leases did the destination get before the restart?
                let flipped = self.flipped_volumes(&rec).await.map_err(|source| {
                    SourceError::LeasesUnknown {
                        phase: rec.phase,
                        source,
                    }
                })?;
                let all = flipped.len() == rec.volumes.len();
                let _ = self.modify(|r| r.flipped = flipped);
                if !all {
                    return Err(SourceError::Restarted(rec.phase));
                }
                let note = format!("migrated restarted during {:?}", rec.phase);
                self.set(Phase::Flipped, format!("{note}: every lease had flipped"))?;
                self.drive().await
            }
            Phase::RollingBack => {
                Err(SourceError::RollingBack(rec.error.unwrap_or_else(|| {
                    error_chain(&SourceError::Restarted(rec.phase))
                })))
            }
            _ => self.drive().await,
        }
    }

    async fn flipped_volumes(&self, rec: &MigrationRecord) -> Result<Vec<String>, HttpError> {
        let mut out = Vec::new();
        for v in &rec.volumes {
            if self.leases.state_of(v, &rec.destination).await? == Some(LeaseState::Primary) {
                out.push(v.clone());
            }
        }
        Ok(out)
    }

    async fn drive(&mut self) -> Result<(), SourceError> {
        loop {
            let rec = self.rec()?;
            match rec.phase {
                Phase::Created => self.check(&rec).await?,
                Phase::Preparing => self.prepare(&rec).await?,
                Phase::Precopy => self.precopy(&rec).await?,
                Phase::HandedOver => {
                    self.set(Phase::Flipping, "flipping the leases")?;
                }
                Phase::Flipping => self.flip(&rec).await?,
                Phase::Flipped => {
                    self.set(Phase::Resuming, "resuming the destination")?;
                }
                Phase::Resuming => self.resume_destination(&rec).await?,
                Phase::Cleanup => return self.cleanup(&rec).await,
                Phase::RollingBack => {
                    return Err(SourceError::RollingBack(
                        rec.error.unwrap_or_else(|| "rolling back".into()),
                    ))
                }
                Phase::Completed | Phase::Aborted | Phase::Failed => return Ok(()),
            }
        }
    }

    /// created: the destination answers, and the source VMM can migrate.
    async fn check(&self, rec: &MigrationRecord) -> Result<(), SourceError> {
        let host = self
            .peer
            .host()
            .await
            .map_err(|source| SourceError::Unreachable {
                host: rec.destination.clone(),
                addr: rec.peer_addr.clone(),
                source,
            })?;
        if !rec.destination.is_empty() && host.host_id != rec.destination {
            return Err(SourceError::WrongHost {
                addr: rec.peer_addr.clone(),
                answered: host.host_id,
                expected: rec.destination.clone(),
            });
        }
        if host.host_id == self.agent.cfg.host_id {
            return Err(SourceError::ThisHost(rec.peer_addr.clone()));
        }
        let inst = self.inst()?;
        let status = self
            .agent
            .vmm(&inst)
            .migration()
            .await
            .map_err(SourceError::Vmm)?;
        if status.phase != VmmPhase::Idle && !status.phase.is_final() {
            return Err(SourceError::VmmBusy(status.phase));
        }
        self.modify(|r| {
            r.destination = host.host_id.clone();
            r.step(Phase::Preparing, "destination reachable, source VMM ready");
        })?;
        Ok(())
    }

    /// preparing: the destination starts its VMM in incoming mode.
    async fn prepare(&self, rec: &MigrationRecord) -> Result<(), SourceError> {
        let inst = self.inst()?;
        let req = IncomingRequest {
            migration: rec.id.clone(),
            source: self.agent.cfg.host_id.clone(),
            source_addr: self.agent.cfg.listen.to_string(),
            config: inst.config.clone(),
            params: rec.params,
        };
        let ready = self.peer.prepare_incoming(&req).await.map_err(|source| {
            SourceError::PrepareFailed {
                host: rec.destination.clone(),
                source,
            }
        })?;
        self.modify(|r| {
            r.stream_addr = Some(ready.stream_addr.clone());
            r.step(
                Phase::Precopy,
                format!("destination VMM listening on {}", ready.stream_addr),
            );
        })?;
        Ok(())
    }

    /// precopy: start the stream, follow it until the hand-over.
    async fn precopy(&mut self, rec: &MigrationRecord) -> Result<(), SourceError> {
        let inst = self.inst()?;
        let vmm = self.agent.vmm(&inst);
        let stream_addr = rec.stream_addr.clone().ok_or(SourceError::NoStreamAddr)?;
        vmm.send(&SendParams {
            destination: stream_addr,
            downtime_limit_ms: rec.params.downtime_ms,
            max_iterations: rec.params.max_iterations,
            throttle: rec.params.throttle,
            resume: ResumeMode::Wait,
        })
        .await
        .map_err(SourceError::Vmm)?;
        let timeout = Duration::from_millis(self.agent.cfg.peer_timeout_ms);
        let mut peer_ok = Instant::now();
        let mut peer_checked = Instant::now();
        let mut vmm_failing: Option<Instant> = None;
        loop {
            match vmm.migration().await {
                Ok(st) => {
                    vmm_failing = None;
                    let progress = Progress::of(&st, self.started.elapsed());
                    self.agent.set_progress(&rec.id, progress);
                    match st.phase {
                        VmmPhase::Stopcopy => {
                            self.paused_at.get_or_insert_with(Instant::now);
                        }
                        VmmPhase::HandedOver | VmmPhase::Completed => {
                            self.paused_at.get_or_insert_with(Instant::now);
                            self.modify(|r| {
                                r.figures.bytes_sent = st.bytes_sent;
                                r.step(
                                    Phase::HandedOver,
                                    format!(
                                        "source paused, destination holds the state ({} iterations, {} bytes)",
                                        st.iteration, st.bytes_sent
                                    ),
                                );
                            })?;
                            return Ok(());
                        }
                        VmmPhase::Failed | VmmPhase::Aborted => {
                            return Err(SourceError::StreamFailed {
                                phase: st.phase,
                                reason: st.error.unwrap_or_else(|| "no reason given".into()),
                            })
                        }
                        _ => {}
                    }
                }
                Err(err) => {
                    let since = *vmm_failing.get_or_insert_with(Instant::now);
                    if !inst.vmm_alive() || since.elapsed() > VMM_SILENCE {
                        return Err(SourceError::VmmLost(err));
                    }
                }
            }
            if peer_checked.elapsed() >= PEER_CHECK {
                peer_checked = Instant::now();
                match self.peer.with_timeout(timeout).incoming(&rec.id).await {
                    Ok(d) if matches!(d.phase, Phase::Aborted | Phase::Failed) => {
                        return Err(SourceError::DestinationGaveUp(d.error.unwrap_or_default()))
                    }
                    Ok(_) => peer_ok = Instant::now(),
                    Err(source) if peer_ok.elapsed() > timeout => {
                        return Err(SourceError::DestinationLost {
                            host: rec.destination.clone(),
                            source,
                        })
                    }
                    Err(_) => {}
                }
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// flipping: every volume's lease goes to the destination.
    async fn flip(&mut self, rec: &MigrationRecord) -> Result<(), SourceError> {
        let t = Instant::now();
        for v in &rec.volumes {
            if rec.flipped.contains(v) {
                continue;
            }
            let report = self
                .leases
                .flip_to(v, &rec.destination)
                .await
                .map_err(|source| SourceError::FlipRefused {
                    volume: v.clone(),
                    source,
                })?;
            self.modify(|r| {
                r.flipped.push(v.clone());
                r.note(format!(
                    "volume {v}: lease flipped to {} (epoch {}, {} us)",
                    rec.destination, report.epoch, report.total_us
                ));
            })?;
        }
        self.flip_ms += t.elapsed().as_millis() as u64;
        let flip_ms = self.flip_ms;
        self.modify(|r| {
            r.figures.flip_ms = flip_ms;
            r.step(Phase::Flipped, "every lease belongs to the destination");
        })?;
        Ok(())
    }

    /// resuming: the destination runs the guest. Retried: there is no way back from here.
    async fn resume_destination(&mut self, rec: &MigrationRecord) -> Result<(), SourceError> {
        let deadline =
            Instant::now() + Duration::from_millis(self.agent.cfg.peer_timeout_ms.max(1000) * 6);
        let resumed = loop {
            match self.peer.resume_incoming(&rec.id).await {
                Ok(dest) => break dest,
                Err(err) if Instant::now() > deadline => {
                    return Err(SourceError::ResumeUnconfirmed(err))
                }
                Err(err) => {
                    tracing::warn!(migration = %rec.id, error = %error_chain(&err),
                        "resume at the destination failed; retrying");
                    tokio::time::sleep(RESUME_RETRY).await;
                }
            }
        };
        // The destination VMM's measure (from the source's last vCPU pause) when it reports
        // one; else from the moment we saw the source paused.
        let downtime = match resumed.figures.vmm_downtime_us {
            0 => self
                .paused_at
                .map(|p| p.elapsed().as_millis() as u64)
                .unwrap_or(0),
            us => us.div_ceil(1000),
        };
        self.modify(|r| {
            r.figures.downtime_ms = downtime;
            r.figures.vmm_downtime_ms = resumed.figures.vmm_downtime_ms;
            r.figures.vmm_downtime_us = resumed.figures.vmm_downtime_us;
            r.step(Phase::Cleanup, "the destination runs the guest");
        })?;
        Ok(())
    }

    /// cleanup: the source VMM ends and its files go (the log stays).
    async fn cleanup(&self, rec: &MigrationRecord) -> Result<(), SourceError> {
        let inst = self.inst()?;
        self.agent.end_vmm(&inst).await;
        if inst.vmm_alive() {
            return Err(SourceError::VmmStays(inst.pid));
        }
        for f in ["api.sock", "serial.sock", "vm.toml", "vmm.pid"] {
            let _ = std::fs::remove_file(inst.work_dir.join(f));
        }
        self.release_deactivated(rec).await;
        let to = rec.destination.clone();
        self.agent.update_instance(&inst.name, |r| {
            r.state = InstanceState::MigratedAway;
            r.migration = None;
            r.exit = Some(format!("migrated to {to}"));
        })?;
        let total = crate::now_ms().saturating_sub(rec.started_ms);
        self.modify(|r| {
            r.figures.total_ms = total;
            r.step(Phase::Completed, format!("the guest runs on {to} only"));
        })?;
        Ok(())
    }

    /// With the source VMM confirmed gone, ends this host's deactivated lease on every volume:
    /// storaged refuses a deactivated host for good, so without this the guest could never
    /// come back here. A failure is recorded and left to the operator (`storaged lease revoke`).
    async fn release_deactivated(&self, rec: &MigrationRecord) {
        let me = &self.agent.cfg.host_id;
        for v in &rec.volumes {
            let outcome = match self.leases.state_of(v, me).await {
                Ok(Some(LeaseState::Deactivated)) => self
                    .leases
                    .revoke_host(v, me, Some(LeaseState::Deactivated))
                    .await
                    .map(|_| format!("volume {v}: deactivated lease of {me} released")),
                Ok(other) => Ok(format!(
                    "volume {v}: {me} holds {other:?}; nothing to release"
                )),
                Err(e) => Err(e),
            };
            let note = match outcome {
                Ok(note) => note,
                Err(e) => {
                    tracing::warn!(migration = %rec.id, volume = %v, error = %error_chain(&e),
                        "releasing the old host's deactivated lease");
                    format!(
                        "volume {v}: the deactivated lease of {me} stays (run `storaged lease revoke {v} --host {me}`): {}",
                        error_chain(&e)
                    )
                }
            };
            let _ = self.modify(|r| r.note(note));
        }
    }

    /// Past the point of no return and stuck: record it for the operator.
    fn fail(&self, reason: &str) {
        tracing::error!(migration = %self.id, reason = %reason,
            "migration failed after the leases flipped; the source stays paused");
        let _ = self.modify(|r| {
            r.error = Some(reason.to_string());
            r.step(Phase::Failed, reason.to_string());
        });
    }

    /// Like [`Source::fail`], when the abort for `reason` could not finish because of `then`.
    fn fail_abort(&self, reason: &str, then: SourceError) {
        self.fail(&format!("{reason}; {}", error_chain(&then)));
    }

    /// The abort path: roll back, fence the destination off, resume the source.
    async fn abort(&mut self, reason: &str) {
        let Ok(rec) = self.modify(|r| {
            r.error = Some(reason.to_string());
            r.step(Phase::RollingBack, reason.to_string());
        }) else {
            return;
        };
        for v in rec.flipped.iter().rev() {
            let undo = |view: storaged_client::api::LeaseView| RollbackRequest {
                epoch: view.epoch,
                primary: rec.destination.clone(),
            };
            let rolled = match self.leases.leases(v).await {
                Ok(view) => self.leases.rollback(v, &undo(view)).await,
                Err(e) => Err(e),
            };
            match rolled {
                Ok(rep) => {
                    let _ = self.modify(|r| {
                        r.flipped.retain(|f| f != v);
                        r.note(format!(
                            "volume {v}: lease rolled back (epoch {})",
                            rep.epoch
                        ));
                    });
                }
                Err(source) => {
                    let volume = v.clone();
                    return self.fail_abort(reason, SourceError::RollbackFailed { volume, source });
                }
            }
        }
        // The destination may not take over once we resume: end its standby leases, and make
        // sure we still hold every volume. The revoke is conditional, so a destination that
        // took a volume over at this very moment keeps it (and the source does not resume).
        for v in &rec.volumes {
            let refused = match self
                .leases
                .revoke_host(v, &rec.destination, Some(LeaseState::Standby))
                .await
            {
                Ok(_) => continue,
                Err(e) => e,
            };
            match self.leases.state_of(v, &rec.destination).await {
                Ok(Some(LeaseState::Primary)) => {
                    return self.fail_abort(reason, SourceError::DestinationHolds(v.clone()))
                }
                Ok(None | Some(LeaseState::Deactivated)) => {}
                Ok(Some(LeaseState::Standby)) => tracing::warn!(migration = %rec.id,
                    volume = %v, error = %error_chain(&refused),
                    "revoking the destination's standby lease"),
                Err(e) => tracing::warn!(migration = %rec.id, volume = %v,
                    error = %error_chain(&e), "reading the leases during the abort"),
            }
        }
        if let Err(e) = self.peer.abort_incoming(&rec.id).await {
            tracing::info!(migration = %rec.id, error = %error_chain(&e),
                "the destination did not take the abort (it may be gone)");
        }
        let Ok(inst) = self.inst() else { return };
        let vmm = self.agent.vmm(&inst);
        if let Err(e) = vmm.abort().await {
            tracing::debug!(migration = %rec.id, error = %error_chain(&e),
                "migration abort at the source VMM");
        }
        let resumed = vmm.resume().await;
        let alive = inst.vmm_alive();
        let _ = self.agent.update_instance(&inst.name, |r| {
            r.migration = None;
            if r.state == InstanceState::Migrating {
                r.state = if alive {
                    InstanceState::Running
                } else {
                    InstanceState::Exited
                };
            }
        });
        let note = match (alive, resumed) {
            (true, Ok(_)) => "the guest runs on the source".to_string(),
            (true, Err(e)) => format!("the source VMM did not resume: {}", error_chain(&e)),
            (false, _) => "the source VMM is gone".to_string(),
        };
        let _ = self.modify(|r| r.step(Phase::Aborted, note));
    }
}
