//! The ways out of a migration at the source: the abort path before the flip (fence the
//! destination off through storaged, have it abort, resume the guest here), the flips taken back
//! when the destination abandoned the migration after them, the failure recorded for the
//! operator when neither is possible, and the operator's request to abort ([`request_abort`]).

use super::{Source, SourceError};
use crate::agent::Agent;
use crate::instance::InstanceState;
use crate::migration::leases::{self, Holding};
use crate::migration::record::{MigrationRecord, Phase, Role};
use storaged_client::api::{GroupRevokeRequest, GroupRollbackRequest};
use vmhop_common::error::chain as error_chain;

impl Source {
    /// Past the point of no return and stuck: record it for the operator.
    pub(super) async fn fail(&self, reason: &str) {
        tracing::error!(migration = %self.id, reason = %reason,
            "migration failed after the leases flipped; the source stays paused");
        let _ = self
            .modify(|r| {
                r.error = Some(reason.to_string());
                r.step(Phase::Failed, reason.to_string());
            })
            .await;
    }

    /// The destination abandoned the migration after the flip (`reason`): rolls back, on every
    /// volume the destination holds, the flip that gave it the volume (each named by its
    /// epoch, refused by storaged if the volume moved on since), so that the abort path can
    /// fence the destination off and resume the guest here. The destination's VMM is gone and
    /// its record terminal, so it can no longer write or resume; storaged's rollback fences
    /// whatever connection of it remains.
    pub(super) async fn take_back(&mut self, reason: &str) -> Result<(), SourceError> {
        let rec = self.rec()?;
        tracing::warn!(migration = %rec.id, reason = %reason,
            "the destination abandoned the migration after the flip: rolling the flips back");
        for attempt in 1.. {
            let me = &*self;
            let views = leases::read_until_known(&self.leases, &rec.volumes, |n, e| async move {
                me.waiting_for_storaged(n, "reading the leases", &e).await
            })
            .await;
            let flipped = leases::primary_of(&views, &rec.destination);
            if flipped.is_empty() {
                break;
            }
            let undo = GroupRollbackRequest {
                primary: rec.destination.clone(),
                volumes: flipped,
                migration: Some(rec.id.clone()),
            };
            match self.leases.rollback_group(&undo).await {
                Ok(_) => break,
                Err(e) if leases::refused(&e) => {
                    let names: Vec<String> = undo.volumes.into_iter().map(|v| v.volume).collect();
                    return Err(SourceError::DestinationHolds(names.join(", "), e));
                }
                Err(e) => self.waiting_for_storaged(attempt, "rolling back", &e).await,
            }
        }
        self.modify(|r| {
            r.flipped.clear();
            r.note(format!(
                "{reason}: every flip rolled back, the guest goes on here"
            ))
        })
        .await?;
        Ok(())
    }

    /// Like [`Source::fail`], when the abort for `reason` could not finish because of `then`.
    pub(super) async fn fail_abort(&self, reason: &str, then: SourceError) {
        self.fail(&format!("{reason}; {}", error_chain(&then)))
            .await;
    }

    /// The abort path: fence the destination off, have it abort, resume the source; or, when
    /// storaged shows that the destination won, go on as the destination's migration.
    pub(super) async fn abort(&mut self, reason: &str) -> AbortEnd {
        let Ok(before) = self.rec() else {
            return AbortEnd::Done;
        };
        let Ok(rec) = self
            .modify(|r| {
                r.error = Some(reason.to_string());
                r.step(Phase::RollingBack, reason.to_string());
            })
            .await
        else {
            return AbortEnd::Done;
        };
        // Once the destination was asked to prepare it may hold standby leases and the state.
        let prepared = before.phase != Phase::Created && !rec.destination.is_empty();
        if prepared && !rec.volumes.is_empty() {
            match self.fence_destination(&rec).await {
                Ok(Fence::Done) => {}
                Ok(Fence::DestinationWon) => {
                    let note = format!(
                        "{reason}; but the destination holds every volume: it won, the source stays paused"
                    );
                    tracing::warn!(migration = %rec.id, reason = %reason,
                        "the destination holds every volume: it won; the source stays paused");
                    let _ = self.modify(|r| r.error = None).await;
                    return match self.flipped(note).await {
                        Ok(_) => AbortEnd::DestinationWon,
                        Err(_) => AbortEnd::Done,
                    };
                }
                Err(e) => {
                    self.fail_abort(reason, e).await;
                    return AbortEnd::Done;
                }
            }
        }
        if let Err(e) = self.peer.abort_incoming(&rec.id).await {
            tracing::info!(migration = %rec.id, error = %error_chain(&e),
                "the destination did not take the abort (it may be gone)");
        }
        let Ok(inst) = self.inst() else {
            return AbortEnd::Done;
        };
        let vmm = self.agent.vmm(&inst);
        if let Err(e) = vmm.abort().await {
            tracing::debug!(migration = %rec.id, error = %error_chain(&e),
                "migration abort at the source VMM");
        }
        let resumed = vmm.resume().await;
        let alive = inst.vmm_alive();
        let _ = self
            .agent
            .update_instance(&inst.name, |r| {
                r.migration = None;
                if r.state == InstanceState::Migrating {
                    r.state = if alive {
                        InstanceState::Running
                    } else {
                        InstanceState::Exited
                    };
                }
            })
            .await;
        let note = match (alive, resumed) {
            (true, Ok(_)) => "the guest runs on the source".to_string(),
            (true, Err(e)) => format!("the source VMM did not resume: {}", error_chain(&e)),
            (false, _) => "the source VMM is gone".to_string(),
        };
        let _ = self.modify(|r| r.step(Phase::Aborted, note)).await;
        AbortEnd::Done
    }

    /// Has storaged end the destination's standby leases on every volume (one group revoke,
    /// refused if the destination is primary on any, and only while this host is primary on
    /// all), which also moves every epoch: after it the destination can no longer become
    /// primary, and the source may resume. Retried while storaged does not answer; a refusal
    /// is read back: the destination primary everywhere won; primary on some, those flips are
    /// rolled back (each named by its epoch) and the revoke is tried again. So is a revoke made
    /// by some masters of the volumes and refused by the others ([`leases::partly_refused`]).
    async fn fence_destination(&self, rec: &MigrationRecord) -> Result<Fence, SourceError> {
        let req = GroupRevokeRequest {
            host: rec.destination.clone(),
            volumes: rec.volumes.clone(),
            primary: Some(self.agent.cfg.host_id.clone()),
            migration: Some(rec.id.clone()),
        };
        for attempt in 1.. {
            let refusal = match self.leases.revoke_group(&req).await {
                Ok(views) => {
                    let epochs: Vec<String> = views
                        .iter()
                        .map(|v| format!("{} at epoch {}", v.volume, v.epoch))
                        .collect();
                    let _ = self.modify(|r| {
                        r.note(format!(
                            "the destination can no longer take over: its standby leases ended ({})",
                            epochs.join(", ")
                        ))
                    }).await;
                    return Ok(Fence::Done);
                }
                Err(e) => e,
            };
            let refused = leases::refused(&refusal) || leases::partly_refused(&refusal);
            if !refused {
                self.waiting_for_storaged(attempt, "fencing the destination off", &refusal)
                    .await;
            }
            match self.holding(rec).await {
                Holding::Destination => return Ok(Fence::DestinationWon),
                Holding::Split(flipped) if refused => {
                    let undo = GroupRollbackRequest {
                        primary: rec.destination.clone(),
                        volumes: flipped.clone(),
                        migration: Some(rec.id.clone()),
                    };
                    let names: Vec<&str> = flipped.iter().map(|v| v.volume.as_str()).collect();
                    match self.leases.rollback_group(&undo).await {
                        Ok(_) => {
                            let _ = self
                                .modify(|r| {
                                    r.note(format!(
                                        "volumes {}: flips rolled back",
                                        names.join(", ")
                                    ))
                                })
                                .await;
                        }
                        Err(e) if leases::refused(&e) => {
                            return Err(SourceError::DestinationHolds(names.join(", "), e))
                        }
                        Err(e) => self.waiting_for_storaged(attempt, "rolling back", &e).await,
                    }
                }
                _ if refused => return Err(SourceError::FenceRefused(refusal)),
                _ => tokio::time::sleep(leases::RETRY).await,
            }
        }
        unreachable!("the attempts never run out")
    }
}

/// How [`Source::abort`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AbortEnd {
    /// Aborted, or failed for the operator: the task is over.
    Done,
    /// storaged shows the destination primary on every volume: the migration goes on.
    DestinationWon,
}

/// What fencing the destination off found.
pub(super) enum Fence {
    /// storaged ended its standby leases: it can no longer become primary.
    Done,
    /// It is primary on every volume.
    DestinationWon,
}

/// An operator's request to abort migration `id` (`POST /v1/migrations/{id}/abort`, like
/// virsh `domjobabort`): taken while the guest still runs, or is paused, only on this host
/// (`created` to `handed-over`); the migration's task then takes the abort path, the guest
/// runs on here and the migration ends `aborted`. Refused at the destination (the source
/// decides) and from the flip on (the guest may only go on at the destination).
pub fn request_abort(agent: &Agent, id: &str) -> Result<MigrationRecord, SourceError> {
    let rec = agent.migration(id)?;
    if rec.role == Role::Destination {
        return Err(SourceError::AbortAtDestination {
            id: rec.id,
            addr: agent
                .cfg
                .peers
                .get(&rec.source)
                .cloned()
                .unwrap_or_else(|| "address unknown here".into()),
            source_host: rec.source,
        });
    }
    let why = match rec.phase {
        Phase::Created | Phase::Preparing | Phase::Precopy | Phase::HandedOver => {
            agent.request_abort(id);
            tracing::info!(migration = %id, phase = ?rec.phase, "abort requested by the operator");
            return Ok(rec);
        }
        Phase::Completed | Phase::Aborted | Phase::Failed => "it has ended",
        Phase::RollingBack => "it is being aborted already",
        _ => "the leases are flipping or flipped: the guest can only go on at the destination",
    };
    Err(SourceError::AbortTooLate {
        id: rec.id,
        phase: rec.phase,
        why,
    })
}
