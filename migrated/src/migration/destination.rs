//! The destination side of a migration: start the VMM in incoming mode, follow it until it
//! holds the whole state and then take the leases and run the guest here, watch the source
//! meanwhile, or abort.
//!
//! The flip is the destination's: once its VMM holds the whole state (the source committed to
//! the hand-over), [`follow`] makes the group flip of every volume to this host, conditional on
//! the source holding each at the epochs it recorded when the migration began, and resumes the
//! guest, without waiting for the source's word (so that the guest's pause holds no round trip
//! to the source). storaged decides a race with a source that aborts at the same moment: the
//! source's group revoke of our standby leases moves those epochs (and is refused once we are
//! primary). A refused flip abandons the migration here; an unanswered one is read back:
//! primary on every volume, the guest resumes here; else retried. The source learns the
//! outcome from a long poll of this record (`GET /v1/incoming/{id}?wait_ms=`), or from
//! [`complete`] (`POST /v1/incoming/{id}/complete`), which waits for the same decision, or
//! makes it. A guest without storaged volumes has no arbiter: it resumes only on
//! the source's word (`POST /v1/incoming/{id}/resume`, also what a source that flipped itself
//! sends).
//!
//! The watch asks the source for its record every [`WATCH`]: if the source aborted (or is
//! rolling back before our VMM holds the whole state), the incoming VMM is ended; if the source
//! passed the flip, the guest resumes here. If the source stays silent for `peer_timeout_ms`, or
//! stays that long in its flip, the destination decides alone: a VMM that holds the whole state
//! completes here as above, anything earlier is abandoned.
//!
//! An abandoned migration leaves no standby lease of this host behind: once the incoming VMM is
//! gone they are revoked, retried until storaged answers ([`crate::release`]).
//!
//! Failures and the reasons to abandon are [`DestinationError`]s until they become the record's
//! `error` text, a log line or an API answer.

use crate::agent::{Agent, AgentError};
use crate::api::{ErrorKind, IncomingReady, IncomingRequest};
use crate::instance::{InstanceRecord, InstanceState};
use crate::migration::leases::{self, Holding};
use crate::migration::record::{MigrationRecord, Phase, Role};
use crate::vmm_process::IncomingFrom;
use std::sync::Arc;
use std::time::{Duration, Instant};
use storaged_client::api::GroupFlipRequest;
use thiserror::Error;
use vmhop_common::error::chain as error_chain;
use vmhop_common::http::{HttpError, Prepared};
use vmm_api::client::VmmError;
use vmm_api::migration::Phase as VmmPhase;

/// Interval of the watch of the source.
const WATCH: Duration = Duration::from_millis(500);
/// The longest wait of one long poll of the incoming VMM's phase (it answers as soon as the
/// phase changes, so the hand-over is seen when it happens).
const POLL: Duration = Duration::from_millis(200);
/// Pause between two calls to an incoming VMM whose API failed.
const VMM_RETRY: Duration = Duration::from_millis(50);

/// Why an incoming migration was refused, could not resume, or was abandoned here.
#[derive(Debug, Error)]
pub enum DestinationError {
    /// The agent refused (an instance of that name runs here, an invalid guest) or its records
    /// failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// A migration of that id is recorded here already.
    #[error("migration {0} is known here already")]
    Known(String),
    /// No port is free for the incoming VMM's stream.
    #[error("no free migration port")]
    NoPort(#[source] std::io::Error),
    /// No incoming migration of that id here.
    #[error("incoming migration {0} not found")]
    NotIncoming(String),
    /// The migration was abandoned here: it cannot resume any more.
    #[error("migration {id} was abandoned here: {reason}")]
    Abandoned {
        /// The migration.
        id: String,
        /// Its recorded reason.
        reason: String,
    },
    /// The guest runs here already: too late to abort.
    #[error("migration {0}: the guest already runs here")]
    Resumed(String),
    /// A call to the incoming VMM failed.
    #[error("the incoming VMM")]
    Vmm(#[source] VmmError),
    /// The source asked for the abort.
    #[error("the source asked to abort")]
    AbortRequested,
    /// The source rolled back or aborted (its recorded reason).
    #[error("the source aborted: {0}")]
    SourceAborted(String),
    /// The source stopped answering.
    #[error("source {host} lost")]
    SourceLost {
        /// Source host id.
        host: String,
        /// Cause.
        #[source]
        source: HttpError,
    },
    /// storaged refused to flip the volumes here: the source kept them (or took them back).
    #[error("flip refused: the volumes stay with the source")]
    TakeOverRefused(#[source] HttpError),
    /// Asked to complete before the incoming VMM holds the whole state.
    #[error("the incoming VMM does not hold the whole state")]
    NoState,
    /// The source sent no lease epochs: without them no take-over can be conditional.
    #[error("no lease epochs from the source: the volumes cannot be taken over")]
    NoEpochs,
    /// The incoming VMM exited while the state arrived.
    #[error("the incoming VMM exited")]
    VmmExited,
    /// The incoming VMM was not running when migrated started again.
    #[error("the incoming VMM is gone")]
    VmmGone,
}

impl DestinationError {
    /// What kind of failure this is, for the API's answer.
    pub fn kind(&self) -> ErrorKind {
        match self {
            DestinationError::Agent(e) => e.kind(),
            DestinationError::NoPort(_) => ErrorKind::BadRequest,
            DestinationError::NotIncoming(_) => ErrorKind::NotFound,
            DestinationError::Known(_)
            | DestinationError::Abandoned { .. }
            | DestinationError::Resumed(_)
            | DestinationError::AbortRequested
            | DestinationError::SourceAborted(_)
            | DestinationError::NoState => ErrorKind::Conflict,
            DestinationError::Vmm(_)
            | DestinationError::SourceLost { .. }
            | DestinationError::TakeOverRefused(_)
            | DestinationError::NoEpochs
            | DestinationError::VmmExited
            | DestinationError::VmmGone => ErrorKind::BadGateway,
        }
    }
}

/// Serialises resume and abort of incoming migrations (API calls and the watch).
static DECIDE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `POST /v1/incoming`: records the instance and the migration, starts the VMM in incoming
/// mode and answers with its stream address once its API answers.
pub async fn prepare(
    agent: &Arc<Agent>,
    req: IncomingRequest,
) -> Result<IncomingReady, DestinationError> {
    agent.check_new_instance(&req.config)?;
    let name = req.config.name.clone();
    if agent.migration(&req.migration).is_ok() {
        return Err(DestinationError::Known(req.migration));
    }
    let port = free_port(agent.cfg.migration_ip).map_err(DestinationError::NoPort)?;
    let stream_addr = std::net::SocketAddr::new(agent.cfg.migration_ip, port).to_string();
    let mut mig = MigrationRecord {
        source: req.source.clone(),
        destination: agent.cfg.host_id.clone(),
        peer_addr: req.source_addr.clone(),
        stream_addr: Some(stream_addr.clone()),
        ..MigrationRecord::new(
            req.migration.clone(),
            name.clone(),
            Role::Destination,
            req.params,
            req.config.volumes(),
        )
    };
    mig.epochs = req.epochs.clone();
    mig.step(
        Phase::Preparing,
        format!("starting the incoming VMM on {stream_addr}"),
    );
    agent.put_migration(mig.clone()).await?;
    let mut rec = InstanceRecord::new(req.config, &agent.cfg.state_dir, InstanceState::Incoming);
    rec.migration = Some(mig.id.clone());
    rec.incoming = Some(stream_addr.clone());
    agent.put_instance(rec.clone()).await?;
    let from = IncomingFrom {
        addr: &stream_addr,
        source: &req.source,
    };
    if let Err(e) = agent.start_vmm(&rec, Some(from)).await {
        mig.error = Some(error_chain(&e));
        mig.step(Phase::Aborted, "the incoming VMM did not start");
        let _ = agent.put_migration(mig).await;
        return Err(e.into());
    }
    mig.step(Phase::Precopy, "incoming VMM ready");
    agent.put_migration(mig.clone()).await?;
    tokio::spawn(watch(agent.clone(), mig.id.clone()));
    tokio::spawn(follow(agent.clone(), mig.id.clone()));
    Ok(IncomingReady {
        host: agent.cfg.host_id.clone(),
        stream_addr,
    })
}

/// Picks a free TCP port on `ip` for the destination VMM. The port is released before the VMM
/// binds it; a collision makes the VMM fail to start and the migration abort cleanly.
fn free_port(ip: std::net::IpAddr) -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind((ip, 0))?;
    Ok(l.local_addr()?.port())
}

/// `GET /v1/incoming/{id}`: the record of an incoming migration.
pub fn incoming(agent: &Agent, id: &str) -> Result<MigrationRecord, DestinationError> {
    let mig = agent.migration(id)?;
    if mig.role != Role::Destination {
        return Err(DestinationError::NotIncoming(id.to_string()));
    }
    Ok(mig)
}

/// `POST /v1/incoming/{id}/resume`: the leases are ours (the source flipped them); the guest
/// runs here.
pub async fn resume(agent: &Arc<Agent>, id: &str) -> Result<MigrationRecord, DestinationError> {
    let _d = DECIDE.lock().await;
    resume_locked(agent, id).await
}

/// `POST /v1/incoming/{id}/complete`: the source handed the guest over; answers once the guest
/// runs here (the leases flipped here first, if [`follow`] has not done it already), or why
/// it cannot.
pub async fn complete(agent: &Arc<Agent>, id: &str) -> Result<MigrationRecord, DestinationError> {
    let _d = DECIDE.lock().await;
    complete_locked(agent, id, None, None).await
}

/// Follows the incoming VMM until it holds the whole state, then completes the migration here
/// ([`complete_locked`]). The connection to storaged for the flip is opened now, so that the
/// guest's pause holds no TCP or TLS handshake. A guest without storaged volumes waits for the
/// source's word instead (nothing would arbitrate a race with the source's abort).
async fn follow(agent: Arc<Agent>, id: String) {
    let Ok(rec) = agent.migration(&id) else {
        return;
    };
    if rec.volumes.is_empty() {
        return;
    }
    let Ok(inst) = agent.instance(&rec.instance) else {
        return;
    };
    let api = agent.storaged();
    let opening = tokio::spawn(async move { api.prepare().await });
    let vmm = agent.vmm(&inst);
    let mut phase = VmmPhase::Idle;
    let seen_us = loop {
        match agent.migration(&id) {
            Ok(r) if !r.phase.is_terminal() => {}
            _ => return,
        }
        match vmm.migration_change(phase, POLL).await {
            Ok(st) if st.phase == VmmPhase::HandedOver => break crate::now_us(),
            // Resumed (by an earlier run of migrated), or failed: the watch decides.
            Ok(st) if st.phase.is_final() => return,
            Ok(st) => phase = st.phase,
            Err(_) if !inst.vmm_alive() => return,
            Err(_) => tokio::time::sleep(VMM_RETRY).await,
        }
    };
    let conn = opening.await.ok().and_then(Result::ok);
    let _d = DECIDE.lock().await;
    if let Err(e) = complete_locked(&agent, &id, conn, Some(seen_us)).await {
        tracing::warn!(migration = %id, error = %error_chain(&e),
            "the incoming VMM holds the whole state, but the guest does not run here");
    }
}

/// The incoming VMM holds the whole state: flips every volume here (unless done already) and
/// runs the guest; a refused flip abandons the migration. `seen_us`: when the caller saw the
/// VMM take the hand-over (else its phase is asked for here). The caller holds [`DECIDE`].
async fn complete_locked(
    agent: &Arc<Agent>,
    id: &str,
    conn: Option<Prepared>,
    seen_us: Option<u64>,
) -> Result<MigrationRecord, DestinationError> {
    let mig = incoming(agent, id)?;
    if let Some(answer) = over(&mig) {
        return answer;
    }
    if mig.flipped.len() != mig.volumes.len() {
        let seen_us = match seen_us {
            Some(t) => t,
            None => {
                // The VMM must hold the whole state, or run the guest already (migrated
                // crashed after the resume, which came after the flip).
                let state = vmm_phase(agent, &mig).await;
                if !matches!(state, Some(VmmPhase::HandedOver | VmmPhase::Completed)) {
                    return Err(DestinationError::NoState);
                }
                crate::now_us()
            }
        };
        let t = Instant::now();
        let notes = match take_over(agent, &mig, conn).await {
            Ok(notes) => notes,
            Err(e @ DestinationError::TakeOverRefused(_)) => {
                abort_locked(agent, id, &error_chain(&e)).await?;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let (flipped_us, flip_ms) = (crate::now_us(), t.elapsed().as_millis() as u64);
        // Not durable while the guest waits: a crash before the record's next durable write
        // finds the flip again (refused, its epochs moved, and read back as ours).
        agent
            .update_migration_in_memory(id, |r| {
                r.note("the incoming VMM holds the whole state: every volume flipped here");
                for n in notes {
                    r.note(n);
                }
                r.figures.timeline.handed_over_at_us = seen_us;
                r.flipped = r.volumes.clone();
                r.figures.flip_ms = flip_ms;
                r.figures.timeline.flipped_at_us = flipped_us;
            })
            .await?;
    }
    resume_locked(agent, id).await
}

/// The answer about an incoming migration that is over: its record once the guest runs here,
/// why not once it was abandoned; `None` while undecided.
fn over(mig: &MigrationRecord) -> Option<Result<MigrationRecord, DestinationError>> {
    match mig.phase {
        Phase::Completed => Some(Ok(mig.clone())),
        Phase::Aborted | Phase::Failed => Some(Err(DestinationError::Abandoned {
            id: mig.id.clone(),
            reason: mig.error.clone().unwrap_or_default(),
        })),
        _ => None,
    }
}

/// Runs the guest here; the caller holds [`DECIDE`] and the leases are this host's.
async fn resume_locked(agent: &Arc<Agent>, id: &str) -> Result<MigrationRecord, DestinationError> {
    let mig = incoming(agent, id)?;
    if let Some(answer) = over(&mig) {
        return answer;
    }
    // Not durable before the VMM runs the guest: `resuming` in memory is what keeps an abort
    // out (under `DECIDE`). After a crash the record shows the phase before it with the guest
    // maybe running; the restarted watch then sees the source past its flip and resumes again
    // (a no-op on a running VM); the source, past its flip, can no longer abort.
    agent
        .update_migration_in_memory(id, |r| r.step(Phase::Resuming, "resuming the guest"))
        .await?;
    let inst = agent.instance(&mig.instance)?;
    if let Err(e) = agent.vmm(&inst).resume().await {
        if !inst.vmm_alive() {
            // The guest's state went with its VMM: nothing can resume here any more. Saying so
            // lets the source take the volumes back and run the guest again.
            let why = error_chain(&DestinationError::VmmGone);
            abort_locked(agent, id, &why).await?;
            return Err(DestinationError::Abandoned {
                id: id.to_string(),
                reason: why,
            });
        }
        return Err(DestinationError::Vmm(e));
    }
    let resumed = vmm_resumed(agent, &inst).await;
    agent
        .update_instance(&inst.name, |r| {
            r.state = InstanceState::Running;
            r.migration = None;
            r.incoming = None;
        })
        .await?;
    Ok(agent
        .update_migration(id, |r| {
            r.figures.vmm_downtime_ms = resumed.downtime_ms;
            r.figures.vmm_downtime_us = resumed.downtime_us;
            r.figures.timeline.paused_at_us = resumed.paused_at_us;
            r.figures.timeline.resumed_at_us = resumed.resumed_at_us;
            r.step(Phase::Completed, "the guest runs here");
        })
        .await?)
}

/// How long to wait for the resumed VMM to report its figures.
const FIGURES_WAIT: Duration = Duration::from_secs(5);

/// The figures of the resumed VMM (it reports its downtime once its vCPUs ran); zeros if it
/// does not tell in time (the figures are informative, the guest runs either way).
async fn vmm_resumed(agent: &Agent, inst: &InstanceRecord) -> vmm_api::migration::MigrationStatus {
    let vmm = agent.vmm(inst).with_timeout(Duration::from_secs(2));
    let deadline = Instant::now() + FIGURES_WAIT;
    while Instant::now() < deadline {
        match vmm
            .migration_change(VmmPhase::HandedOver, FIGURES_WAIT)
            .await
        {
            Ok(s) if s.phase == VmmPhase::Completed => return s,
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    Default::default()
}

/// `POST /v1/incoming/{id}/abort`: ends the incoming VMM for `reason` (refused once the guest
/// runs here).
pub async fn abort(
    agent: &Arc<Agent>,
    id: &str,
    reason: &DestinationError,
) -> Result<MigrationRecord, DestinationError> {
    let _d = DECIDE.lock().await;
    abort_locked(agent, id, &error_chain(reason)).await
}

/// Abandons the migration with `reason` as its recorded error; the caller holds [`DECIDE`].
async fn abort_locked(
    agent: &Arc<Agent>,
    id: &str,
    reason: &str,
) -> Result<MigrationRecord, DestinationError> {
    let mig = incoming(agent, id)?;
    let vmm_alive = agent.instance(&mig.instance).is_ok_and(|i| i.vmm_alive());
    match mig.phase {
        Phase::Aborted | Phase::Failed => return Ok(mig),
        // A resume may have taken; without a VMM it cannot have.
        Phase::Completed => return Err(DestinationError::Resumed(id.to_string())),
        Phase::Resuming if vmm_alive => return Err(DestinationError::Resumed(id.to_string())),
        _ => {}
    }
    if let Ok(inst) = agent.instance(&mig.instance) {
        if inst.migration.as_deref() == Some(id) {
            agent.end_vmm(&inst).await;
            agent
                .update_instance(&inst.name, |r| {
                    if r.state == InstanceState::Incoming || r.state == InstanceState::Failed {
                        r.state = InstanceState::Stopped;
                    }
                    r.migration = None;
                    r.exit = Some(format!("incoming migration abandoned: {reason}"));
                })
                .await?;
            // The standby leases the VMM held serve nobody now; storaged would keep them
            // until its standby expiry. Released here, or once storaged answers again.
            if !inst.vmm_alive() {
                crate::release::release_standby_later(
                    agent.clone(),
                    inst.name.clone(),
                    mig.volumes.clone(),
                );
            }
        }
    }
    Ok(agent
        .update_migration(id, |r| {
            r.error = Some(reason.to_string());
            r.step(Phase::Aborted, reason.to_string());
        })
        .await?)
}

/// Re-attaches to an incoming migration after a restart of migrated.
pub fn resume_after_restart(agent: Arc<Agent>, rec: MigrationRecord) {
    tokio::spawn(async move {
        let alive = agent
            .instance(&rec.instance)
            .map(|i| i.vmm_alive())
            .unwrap_or(false);
        if alive {
            tokio::spawn(follow(agent.clone(), rec.id.clone()));
            watch(agent, rec.id).await;
        } else if let Err(e) = abort(&agent, &rec.id, &DestinationError::VmmGone).await {
            tracing::warn!(migration = %rec.id, error = %error_chain(&e),
                "abandoning an incoming migration after a restart");
        }
    });
}

/// Watches the source until the migration ends here.
async fn watch(agent: Arc<Agent>, id: String) {
    let Ok(rec) = agent.migration(&id) else {
        return;
    };
    let peer = agent
        .peer(&rec.source, &rec.peer_addr)
        .with_timeout(Duration::from_secs(2));
    let timeout = Duration::from_millis(agent.cfg.peer_timeout_ms);
    let mut heard = Instant::now();
    let mut flipping_since: Option<Instant> = None;
    loop {
        tokio::time::sleep(WATCH).await;
        let Ok(rec) = agent.migration(&id) else {
            return;
        };
        if rec.phase.is_terminal() {
            return;
        }
        let vmm_alive = agent
            .instance(&rec.instance)
            .map(|i| i.vmm_alive())
            .unwrap_or(false);
        if !vmm_alive {
            let _ = abort(&agent, &id, &DestinationError::VmmExited).await;
            return;
        }
        match peer.migration(&id).await {
            Ok(info) => {
                let src = info.record;
                heard = Instant::now();
                // Rolling back, the source may still find that we won: once our VMM holds the
                // whole state we wait for its word (or for storaged's, in a take-over).
                let gave_up = src.phase == Phase::Aborted
                    || (src.phase == Phase::RollingBack && !holds_the_state(&agent, &rec).await);
                if gave_up {
                    let why = DestinationError::SourceAborted(src.error.unwrap_or_default());
                    let _ = abort(&agent, &id, &why).await;
                    return;
                }
                let since = match src.phase {
                    Phase::Flipping => *flipping_since.get_or_insert_with(Instant::now),
                    _ => {
                        flipping_since = None;
                        Instant::now()
                    }
                };
                if since.elapsed() > timeout && holds_the_state(&agent, &rec).await {
                    tracing::warn!(migration = %id,
                        "the source is stuck in its flip: making the same flip");
                    let why = "the source did not complete its flip in time";
                    take_over_or_abort(&agent, &rec, why).await;
                    return;
                }
                let all_flipped = src.flipped.len() == src.volumes.len();
                if src.phase.past_point_of_no_return()
                    || (src.phase == Phase::Failed && all_flipped && !src.volumes.is_empty())
                {
                    if let Err(e) = resume(&agent, &id).await {
                        tracing::warn!(migration = %id, error = %error_chain(&e),
                            "resuming after the source flipped");
                    }
                }
            }
            Err(source) if heard.elapsed() > timeout => {
                let host = rec.source.clone();
                let why = error_chain(&DestinationError::SourceLost { host, source });
                take_over_or_abort(&agent, &rec, &why).await;
                return;
            }
            Err(_) => {}
        }
    }
}

/// The incoming VMM's migration phase, if it answers.
async fn vmm_phase(agent: &Agent, rec: &MigrationRecord) -> Option<VmmPhase> {
    let inst = agent.instance(&rec.instance).ok()?;
    agent.vmm(&inst).migration().await.ok().map(|s| s.phase)
}

/// Whether this host's incoming VMM holds the whole state (the source handed it over).
async fn holds_the_state(agent: &Agent, rec: &MigrationRecord) -> bool {
    vmm_phase(agent, rec).await == Some(VmmPhase::HandedOver)
}

/// The source is gone or stuck (`why`): complete here if the whole state arrived and storaged
/// lets us take the volumes over, else give up.
async fn take_over_or_abort(agent: &Arc<Agent>, rec: &MigrationRecord, why: &str) {
    let _d = DECIDE.lock().await;
    if !holds_the_state(agent, rec).await {
        if let Err(e) = abort_locked(agent, &rec.id, why).await {
            tracing::warn!(migration = %rec.id, error = %error_chain(&e), "abandoning");
        }
        return;
    }
    tracing::warn!(migration = %rec.id, reason = %why,
        "the source is lost after the hand-over: completing here");
    // The VMM's phase was just read (under `DECIDE`): not asked again.
    if let Err(e) = complete_locked(agent, &rec.id, None, Some(crate::now_us())).await {
        tracing::error!(migration = %rec.id, error = %error_chain(&e),
            "completing after the source was lost");
    }
}

/// Flips every volume here with the group flip conditional on the source's recorded epochs
/// (the first attempt on `conn` when there is one); a refusal or a lost answer is read back
/// (primary on every volume is success, whoever flipped). Retried while storaged does not
/// answer. Returns the notes for the record: storaged's report of each volume's flip.
async fn take_over(
    agent: &Arc<Agent>,
    rec: &MigrationRecord,
    mut conn: Option<Prepared>,
) -> Result<Vec<String>, DestinationError> {
    let me = &agent.cfg.host_id;
    if rec.volumes.is_empty() {
        return Ok(Vec::new());
    }
    let volumes = leases::named(&rec.volumes, &rec.epochs).ok_or(DestinationError::NoEpochs)?;
    let req = GroupFlipRequest {
        from: rec.source.clone(),
        to: me.clone(),
        volumes,
        migration: Some(rec.id.clone()),
    };
    let api = agent.storaged();
    loop {
        let failed = match api.flip_group_on(conn.take(), &req).await {
            Ok(report) => {
                return Ok(report
                    .volumes
                    .iter()
                    .map(|(v, rep)| {
                        format!(
                            "volume {v}: lease flipped to {me} (epoch {}, {} us)",
                            rep.epoch, rep.total_us
                        )
                    })
                    .collect())
            }
            Err(e) => e,
        };
        let error = error_chain(&failed);
        tracing::warn!(migration = %rec.id, error = %error,
            "flipping the leases here failed; reading them back");
        let _ = agent
            .update_migration(&rec.id, |r| {
                r.note(format!(
                    "the flip failed ({error}): reading the leases back"
                ))
            })
            .await;
        let views = leases::read_until_known(&api, &rec.volumes, |attempt, e| {
            tracing::warn!(migration = %rec.id, attempt, error = %error_chain(&e),
                "reading the leases: storaged did not answer; retrying");
            std::future::ready(())
        })
        .await;
        match Holding::of(&views, me) {
            Holding::Destination => return Ok(vec!["every volume is this host's".to_string()]),
            _ if leases::refused(&failed) => {
                return Err(DestinationError::TakeOverRefused(failed));
            }
            _ => tokio::time::sleep(leases::RETRY).await,
        }
    }
}
