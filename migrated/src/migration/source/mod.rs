//! The source side of a migration: the state machine that migrated on the guest's current
//! host drives, one task per migration, through the phases of [`super::record::Phase`] (see
//! the sequence diagram in [`super`]).
//!
//! Each phase is written to the store before its action, except the steps of the guest's
//! pause: `handed-over`, `flipping`, `flipped` and `resuming` are published without a write, so
//! that no fsync is part of the pause. Recovery from `precopy`, the phase recorded before them,
//! reads the leases as theirs would: a flip that happened (the destination's, or ours) shows as
//! the destination holding every volume, and the migration goes on to resume it; anything else
//! takes the abort path, whose group revoke is refused once the destination is primary
//! anywhere. The hand-over is learnt from a long poll of the source VMM's phase. The flip is
//! the destination's: it makes it as soon as its VMM holds the whole state and then resumes the
//! guest ([`super::destination`]); `flipping` here takes the outcome from a long poll of the
//! destination's record started with pre-copy (no request to the destination, nor a TCP or
//! TLS handshake, while the guest is paused), and ends the guest here only once storaged shows
//! the destination holding every volume. A destination that does not tell within the peer
//! timeout is asked (`POST /v1/incoming/{id}/complete`); one that does not answer that gets
//! the same group flip from here (conditional on this host holding every volume at the epochs
//! recorded in `created`) and then a call to resume. Before `flipped`
//! every failure aborts: the source resumes only once storaged confirmed, with a group revoke,
//! that the destination can no longer become primary; if storaged shows the destination
//! primary on every volume instead, the destination won and the migration goes on (the source
//! stays paused and has the destination resume). When storaged does not answer, the source
//! reads the leases again and retries instead of guessing; the guest stays paused meanwhile.
//! From `flipped` on the guest may only continue on the destination.
//!
//! Failures are [`SourceError`]s until they become the record's `error` text and a log line
//! (in [`Source::finish`]); the refusals of [`start`] are answered to the API.
//!
//! Files: this one drives the phases; `abort.rs` holds the ways out (the abort path, the
//! destination fenced off, the flips taken back, the failure left to the operator); `error.rs`
//! says what went wrong.

mod abort;
mod error;

pub use abort::request_abort;
pub use error::SourceError;

use crate::agent::{Agent, AgentError};
use crate::api::{IncomingRequest, MigrateRequest, ReleaseOutcome};
use crate::client::MigratedClient;
use crate::instance::{InstanceRecord, InstanceState};
use crate::migration::leases::{self, Holding};
use crate::migration::record::{MigrationRecord, Phase, Progress, Role};
use abort::AbortEnd;
use std::sync::Arc;
use std::time::{Duration, Instant};
use storaged_client::api::{GroupFlipRequest, LeaseState};
use storaged_client::rest::StoragedApi;
use vmhop_common::error::chain as error_chain;
use vmhop_common::http::{HttpError, Prepared};
use vmm_api::migration::{Phase as VmmPhase, ResumeMode, SendParams};

/// The longest wait of one long poll of the source VMM's phase (it answers as soon as the
/// phase changes, so the hand-over is seen when it happens): the progress, the operator's
/// abort and the destination are checked at least this often.
const POLL: Duration = Duration::from_millis(200);
/// Pause between two calls to a source VMM whose API failed.
const VMM_RETRY: Duration = Duration::from_millis(50);
/// How long the live source VMM's API may fail to answer before the migration gives up.
const VMM_SILENCE: Duration = Duration::from_secs(5);
/// How often the destination is checked during pre-copy.
const PEER_CHECK: Duration = Duration::from_secs(1);
/// Pause between two attempts to have the destination resume.
const RESUME_RETRY: Duration = Duration::from_millis(500);

/// Starts migrating instance `name` (answers once the migration is recorded).
pub async fn start(
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
    agent.instance_here(name)?;
    let id = format!("{name}.{}.{}", agent.cfg.host_id, crate::now_ms());
    let mut claimed = false;
    let inst = agent
        .update_instance(name, |r| {
            claimed = r.state == InstanceState::Running && r.migration.is_none();
            if claimed {
                r.state = InstanceState::Migrating;
                r.migration = Some(id.clone());
            }
        })
        .await?;
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
    if let Err(e) = agent.put_migration(rec.clone()).await {
        let _ = agent
            .update_instance(name, |r| {
                r.state = InstanceState::Running;
                r.migration = None;
            })
            .await;
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
    /// The destination's record once the migration ended there, asked for from the start of
    /// pre-copy (see [`Self::open_ahead`]).
    outcome: Option<Outcome>,
    /// The connection for the call to the destination that follows the flip from here,
    /// opened likewise for a guest without storaged volumes.
    resume_conn: Option<Opening>,
}

/// A connection being opened ahead of the call that will use it.
type Opening = tokio::task::JoinHandle<Result<Prepared, HttpError>>;

/// The long polls of the destination's record until the migration ended there.
type Outcome = tokio::task::JoinHandle<Result<MigrationRecord, HttpError>>;

/// The longest wait of one long poll of the destination's record.
const OUTCOME_WAIT: Duration = Duration::from_secs(30);

/// The connection `opening` opened, if it did.
async fn opened(opening: Option<Opening>) -> Option<Prepared> {
    opening?.await.ok()?.ok()
}

impl Drop for Source {
    fn drop(&mut self) {
        // The long polls serve this task only.
        if let Some(outcome) = &self.outcome {
            outcome.abort();
        }
    }
}

impl Source {
    fn new(agent: Arc<Agent>, rec: &MigrationRecord) -> Source {
        Source {
            peer: agent.peer(&rec.destination, &rec.peer_addr),
            leases: agent.storaged(),
            agent,
            id: rec.id.clone(),
            started: Instant::now(),
            paused_at: None,
            flip_ms: 0,
            outcome: None,
            resume_conn: None,
        }
    }

    /// Starts, when pre-copy starts, what the guest's pause will wait for at the destination:
    /// the long polls of its record until the migration ended there (the destination flips
    /// and resumes on its own), or, for a guest without storaged volumes, the connection of the
    /// call to resume. Either way no TCP or TLS handshake, nor a request to the destination,
    /// takes CPU from the VMMs and the flip while the guest is paused. A connection that failed
    /// to open is opened again by its call; one that the server closed in the meantime takes
    /// no request, which then goes on a new connection.
    fn open_ahead(&mut self, rec: &MigrationRecord) {
        if rec.volumes.is_empty() {
            if self.resume_conn.is_none() {
                let peer = self.peer.clone();
                self.resume_conn = Some(tokio::spawn(async move { peer.prepare().await }));
            }
            return;
        }
        if self.outcome.is_none() {
            let peer = self
                .peer
                .with_timeout(OUTCOME_WAIT + crate::client::PEER_TIMEOUT);
            let id = rec.id.clone();
            self.outcome = Some(tokio::spawn(async move {
                let mut conn = peer.prepare().await.ok();
                loop {
                    let dest = peer
                        .incoming_ended_on(conn.take(), &id, OUTCOME_WAIT)
                        .await?;
                    if dest.phase.is_terminal() {
                        return Ok(dest);
                    }
                }
            }));
        }
    }

    /// The destination's record once the migration ended there, if the long polls of
    /// [`Self::open_ahead`] have it within the peer timeout.
    async fn outcome(&mut self) -> Option<MigrationRecord> {
        let task = self.outcome.take()?;
        let stop = task.abort_handle();
        let patience = Duration::from_millis(self.agent.cfg.peer_timeout_ms);
        match tokio::time::timeout(patience, task).await {
            Ok(Ok(Ok(dest))) => Some(dest),
            _ => {
                stop.abort();
                None
            }
        }
    }

    fn rec(&self) -> Result<MigrationRecord, AgentError> {
        self.agent.migration(&self.id)
    }

    fn inst(&self) -> Result<InstanceRecord, AgentError> {
        self.agent.instance(&self.rec()?.instance)
    }

    /// Records `phase` (durably) before the caller acts on it.
    async fn set(
        &self,
        phase: Phase,
        note: impl Into<String>,
    ) -> Result<MigrationRecord, AgentError> {
        self.modify(|r| r.step(phase, note)).await
    }

    async fn modify(
        &self,
        f: impl FnOnce(&mut MigrationRecord),
    ) -> Result<MigrationRecord, AgentError> {
        self.agent.update_migration(&self.id, f).await
    }

    async fn run(mut self) {
        let outcome = self.drive().await;
        self.finish(outcome).await;
    }

    /// Ends the task: a failure before the flip aborts, after it fails for the operator. An
    /// abort that finds the destination the winner drives the migration on to its end.
    async fn finish(mut self, mut outcome: Result<(), SourceError>) {
        while let Err(err) = outcome {
            let reason = error_chain(&err);
            let phase = self.rec().map(|r| r.phase).unwrap_or(Phase::Failed);
            if phase.past_point_of_no_return() {
                if !matches!(err, SourceError::DestinationAbandoned(_)) {
                    return self.fail(&reason).await;
                }
                // Nobody can run the guest but this host: take the volumes back.
                if let Err(e) = self.take_back(&reason).await {
                    return self.fail_abort(&reason, e).await;
                }
            }
            if phase.is_terminal() || self.abort(&reason).await == AbortEnd::Done {
                return;
            }
            outcome = self.drive().await;
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
            Phase::Created | Phase::Preparing => Err(SourceError::Restarted(rec.phase)),
            Phase::Precopy | Phase::HandedOver | Phase::Flipping => {
                // Did the flip happen before the restart (or the destination take over)? The
                // steps of the pause are not written: `precopy` may be the last one recorded.
                if self.holding(&rec).await != Holding::Destination {
                    return Err(SourceError::Restarted(rec.phase));
                }
                let note = format!("migrated restarted during {}", rec.phase);
                self.flipped(format!("{note}: the destination holds every volume"))
                    .await?;
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

    /// Who holds the guest's volumes, read until storaged answers (each failed read is noted
    /// in the log, the first also in the record: the guest waits paused).
    async fn holding(&self, rec: &MigrationRecord) -> Holding {
        let views = leases::read_until_known(&self.leases, &rec.volumes, |n, e| async move {
            self.waiting_for_storaged(n, "reading the leases", &e).await
        })
        .await;
        Holding::of(&views, &rec.destination)
    }

    /// Records that a decision waits for storaged (`attempt` from 1; the record hears of the
    /// first failure, the log of every one).
    async fn waiting_for_storaged(&self, attempt: u32, what: &str, e: &HttpError) {
        let error = error_chain(e);
        tracing::warn!(migration = %self.id, attempt, error = %error,
            "{what}: storaged did not answer; the guest stays paused, retrying");
        if attempt == 1 {
            let _ = self.modify(|r| {
                r.note(format!(
                    "{what}: storaged did not answer ({error}); the guest stays paused until it does"
                ))
            }).await;
        }
    }

    /// Records that the destination holds every volume: the migration is past the flip.
    async fn flipped(&self, note: String) -> Result<MigrationRecord, AgentError> {
        self.modify(|r| {
            r.flipped = r.volumes.clone();
            r.step(Phase::Flipped, note);
        })
        .await
    }

    async fn drive(&mut self) -> Result<(), SourceError> {
        loop {
            let rec = self.rec()?;
            if self.agent.abort_requested(&self.id) && rec.phase.abortable() {
                return Err(SourceError::AbortRequested);
            }
            match rec.phase {
                Phase::Created => self.check(&rec).await?,
                Phase::Preparing => self.prepare(&rec).await?,
                Phase::Precopy => self.precopy(&rec).await?,
                Phase::HandedOver => {
                    self.set(Phase::Flipping, "flipping the leases").await?;
                }
                Phase::Flipping => self.flip(&rec).await?,
                Phase::Flipped => {
                    self.set(Phase::Resuming, "resuming the destination")
                        .await?;
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
        // The flip is conditional on this host holding every volume at these epochs.
        let views = self
            .leases
            .leases_of(&rec.volumes)
            .await
            .map_err(SourceError::Leases)?;
        let epochs = leases::primary_epochs(&views, &self.agent.cfg.host_id)
            .map_err(|(volume, state)| SourceError::NotPrimary { volume, state })?;
        self.modify(|r| {
            r.destination = host.host_id.clone();
            r.epochs = epochs;
            r.step(Phase::Preparing, "destination reachable, source VMM ready");
        })
        .await?;
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
            epochs: rec.epochs.clone(),
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
        })
        .await?;
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
            // In TLS the destination VMM proves the host that the destination agent is.
            destination_host: self.agent.cfg.tls.as_ref().map(|_| rec.destination.clone()),
        })
        .await
        .map_err(SourceError::Vmm)?;
        self.open_ahead(rec);
        let timeout = Duration::from_millis(self.agent.cfg.peer_timeout_ms);
        let mut peer_ok = Instant::now();
        let mut peer_checked = Instant::now();
        let mut vmm_failing: Option<Instant> = None;
        let mut phase = VmmPhase::Precopy;
        loop {
            if self.agent.abort_requested(&rec.id) {
                return Err(SourceError::AbortRequested);
            }
            match vmm.migration_change(phase, POLL).await {
                Ok(st) => {
                    vmm_failing = None;
                    phase = st.phase;
                    let progress = Progress::of(&st, self.started.elapsed());
                    self.agent.set_progress(&rec.id, progress);
                    match st.phase {
                        VmmPhase::Stopcopy => {
                            self.paused_at.get_or_insert_with(Instant::now);
                            self.stopping().await?;
                        }
                        VmmPhase::HandedOver | VmmPhase::Completed => {
                            self.paused_at.get_or_insert_with(Instant::now);
                            self.stopping().await?;
                            let seen_us = crate::now_us();
                            // Not durable, like `handed-over` (see `stopping`).
                            self.agent.update_migration_in_memory(&self.id, |r| {
                                r.figures.bytes_sent = st.bytes_sent;
                                r.figures.timeline.handed_over_at_us = seen_us;
                                r.note(format!(
                                    "source paused, destination holds the state ({} iterations, {} bytes)",
                                    st.iteration, st.bytes_sent
                                ));
                                r.step(Phase::Flipping, "flipping the leases");
                            }).await?;
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
                    tokio::time::sleep(VMM_RETRY).await;
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
        }
    }

    /// The source VMM stops the guest for the hand-over: publishes `handed-over`, once. Not
    /// written: a restarted migrated that finds `precopy` asks storaged whether the flip
    /// happened before it decides, as it would from `handed-over`. Published before the
    /// hand-over completed it is still right: no flip happens before the hand-over, and the
    /// recovery that finds no flip is the abort path (the destination is fenced off at storaged
    /// before the source resumes).
    async fn stopping(&self) -> Result<(), SourceError> {
        if self.rec()?.phase == Phase::Precopy {
            self.agent
                .update_migration_in_memory(&self.id, |r| {
                    r.step(
                        Phase::HandedOver,
                        "the source VMM stops the guest for the hand-over; the flip may follow",
                    )
                })
                .await?;
        }
        Ok(())
    }

    /// flipping: the destination flips every volume to itself and runs the guest, as soon as
    /// its VMM holds the whole state (see [`super::destination`]); this takes the outcome from
    /// the long polls started with pre-copy, or asks for it ([`Self::completed_there`]). A
    /// destination that gave up takes the abort path (storaged decides there whether it won
    /// after all). One that does not answer, or knows no such call, gets the flip from here
    /// instead ([`Self::flip_here`]).
    async fn flip(&mut self, rec: &MigrationRecord) -> Result<(), SourceError> {
        if rec.volumes.is_empty() {
            return self.flip_here(rec).await;
        }
        // Asked for only when the long polls did not tell: the destination completes (or
        // says why not) on this call as well.
        let answer = match self.outcome().await {
            Some(dest) => Ok(dest),
            None => self.peer.complete_incoming(&rec.id).await,
        };
        let why = match answer {
            Ok(dest) if dest.phase == Phase::Completed => {
                return self.completed_there(rec, dest).await
            }
            Ok(dest) if dest.phase.is_terminal() => {
                let why = dest.error.unwrap_or_else(|| dest.phase.to_string());
                return Err(SourceError::DestinationGaveUp(why));
            }
            Ok(dest) => format!("it answered {}", dest.phase),
            Err(e) if leases::refused(&e) => {
                return Err(SourceError::DestinationGaveUp(error_chain(&e)))
            }
            Err(e) => error_chain(&e),
        };
        tracing::warn!(migration = %rec.id, reason = %why,
            "the destination did not complete the migration; flipping the leases from here");
        let _ = self
            .modify(|r| {
                r.note(format!(
                    "the destination did not complete the migration ({why}): flipping the leases from here"
                ))
            })
            .await;
        self.flip_here(rec).await
    }

    /// The destination says that it flipped every volume and runs the guest (`dest`, its
    /// record): once storaged confirms that the destination holds every volume, the migration
    /// is past the flip, with the destination's figures of it.
    async fn completed_there(
        &mut self,
        rec: &MigrationRecord,
        dest: MigrationRecord,
    ) -> Result<(), SourceError> {
        // A peer's word alone does not end the guest here.
        if self.holding(rec).await != Holding::Destination {
            return Err(SourceError::DestinationClaims);
        }
        let notes: Vec<String> = dest
            .steps
            .iter()
            .filter(|s| s.note.contains(": lease flipped to "))
            .map(|s| s.note.clone())
            .collect();
        let t = dest.figures.timeline;
        self.agent
            .update_migration_in_memory(&self.id, |r| {
                for n in notes {
                    r.note(n);
                }
                r.figures.flip_ms = dest.figures.flip_ms;
                r.figures.timeline.handed_over_at_us = t.handed_over_at_us;
                r.figures.timeline.flipped_at_us = t.flipped_at_us;
                r.flipped = r.volumes.clone();
                r.step(
                    Phase::Flipped,
                    "the destination flipped every volume to itself",
                );
            })
            .await?;
        self.agent
            .update_migration_in_memory(&self.id, |r| {
                r.step(Phase::Resuming, "the destination resumed the guest")
            })
            .await?;
        self.ran_there(&dest).await
    }

    /// The flip from here: every volume's lease goes to the destination, in one group flip
    /// conditional on this host holding each at the recorded epoch. A refusal or a lost answer
    /// is read back: the destination primary everywhere means the flip happened (ours, or its
    /// own).
    async fn flip_here(&mut self, rec: &MigrationRecord) -> Result<(), SourceError> {
        let t = Instant::now();
        let volumes = leases::named(&rec.volumes, &rec.epochs).ok_or(SourceError::NoEpochs)?;
        let req = GroupFlipRequest {
            from: self.agent.cfg.host_id.clone(),
            to: rec.destination.clone(),
            volumes,
            migration: Some(rec.id.clone()),
        };
        let mut flipped_notes = Vec::new();
        let note = if rec.volumes.is_empty() {
            "no storaged volume to flip".to_string()
        } else {
            match self.leases.flip_group(&req).await {
                Ok(report) => {
                    for (v, rep) in &report.volumes {
                        flipped_notes.push(format!(
                            "volume {v}: lease flipped to {} (epoch {}, {} us)",
                            rec.destination, rep.epoch, rep.total_us
                        ));
                    }
                    "every lease belongs to the destination".to_string()
                }
                Err(e) => {
                    let _ = self
                        .modify(|r| {
                            r.note(format!(
                                "the flip failed ({}): reading the leases back",
                                error_chain(&e)
                            ))
                        })
                        .await;
                    match self.holding(rec).await {
                        Holding::Destination => {
                            "the destination holds every volume (the flip's answer was lost, or it took them over)".to_string()
                        }
                        _ if leases::refused(&e) => return Err(SourceError::FlipRefused(e)),
                        _ => return Err(SourceError::FlipUnconfirmed(e)),
                    }
                }
            }
        };
        let flipped_us = crate::now_us();
        self.flip_ms += t.elapsed().as_millis() as u64;
        let flip_ms = self.flip_ms;
        // Not durable while the guest waits: a crash before the next durable write leaves
        // `precopy` recorded, and its recovery reads the leases back: the destination
        // holding every volume is this same `flipped`, and the migration goes on to resume it.
        // Only these notes would be lost. The destination may resume as soon as it reads this
        // record (it asks every `WATCH`), which is right: the leases are its.
        self.agent
            .update_migration_in_memory(&self.id, |r| {
                for n in flipped_notes {
                    r.note(n);
                }
                r.figures.flip_ms = flip_ms;
                r.figures.timeline.flipped_at_us = flipped_us;
                r.flipped = r.volumes.clone();
                r.step(Phase::Flipped, note);
            })
            .await?;
        self.agent
            .update_migration_in_memory(&self.id, |r| {
                r.step(Phase::Resuming, "resuming the destination")
            })
            .await?;
        Ok(())
    }

    /// resuming: the destination runs the guest. Retried: there is no way back from here; the
    /// source gives up (for the operator) only once the destination stopped answering.
    async fn resume_destination(&mut self, rec: &MigrationRecord) -> Result<(), SourceError> {
        let patience = Duration::from_millis(self.agent.cfg.peer_timeout_ms.max(1000) * 6);
        let mut deadline = Instant::now() + patience;
        let mut conn = opened(self.resume_conn.take()).await;
        let resumed = loop {
            match self.peer.resume_incoming_on(conn.take(), &rec.id).await {
                Ok(dest) => break dest,
                Err(err) => {
                    // Has the destination given the migration up for good (its VMM gone)? One
                    // that answers and has not is still at it (its own flip may wait for
                    // storaged): only silence counts towards the deadline.
                    if let Ok(d) = self.peer.migration(&rec.id).await {
                        if d.record.phase == Phase::Aborted {
                            let why = d.record.error.unwrap_or_default();
                            return Err(SourceError::DestinationAbandoned(why));
                        }
                        if !d.record.phase.is_terminal() {
                            deadline = Instant::now() + patience;
                        }
                    }
                    if Instant::now() > deadline {
                        return Err(SourceError::ResumeUnconfirmed(err));
                    }
                    tracing::warn!(migration = %rec.id, error = %error_chain(&err),
                        "resume at the destination failed; retrying");
                    tokio::time::sleep(RESUME_RETRY).await;
                }
            }
        };
        self.ran_there(&resumed).await
    }

    /// The destination runs the guest (`resumed`, its record): its figures go into the record,
    /// which moves on to cleanup.
    async fn ran_there(&self, resumed: &MigrationRecord) -> Result<(), SourceError> {
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
            r.figures.timeline.paused_at_us = resumed.figures.timeline.paused_at_us;
            r.figures.timeline.resumed_at_us = resumed.figures.timeline.resumed_at_us;
            r.step(Phase::Cleanup, "the destination runs the guest");
        })
        .await?;
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
        self.agent
            .update_instance(&inst.name, |r| {
                r.state = InstanceState::MigratedAway;
                r.migration = None;
                r.exit = Some(format!("migrated to {to}"));
            })
            .await?;
        let total = crate::now_ms().saturating_sub(rec.started_ms);
        self.modify(|r| {
            r.figures.total_ms = total;
            r.step(Phase::Completed, format!("the guest runs on {to} only"));
        })
        .await?;
        Ok(())
    }

    /// With the source VMM confirmed gone, ends this host's deactivated lease on every volume:
    /// storaged refuses a deactivated host for good, so without this the guest could never
    /// come back here. A failure is recorded and left to the operator (`storaged lease revoke`).
    async fn release_deactivated(&self, rec: &MigrationRecord) {
        let me = &self.agent.cfg.host_id;
        let released = crate::release::release(
            &self.agent,
            &rec.instance,
            &rec.volumes,
            Some(LeaseState::Deactivated),
        )
        .await;
        for r in released {
            let note = match r.outcome {
                ReleaseOutcome::Released => {
                    format!("volume {}: deactivated lease of {me} released", r.volume)
                }
                _ => format!("volume {}: {r}", r.volume),
            };
            let _ = self.modify(|m| m.note(note)).await;
        }
    }
}
