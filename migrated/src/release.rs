//! Releasing this host's leases on a guest's storaged volumes once no VMM of the guest runs
//! here any more: after `stop` (the primary lease, so that the guest can start on another
//! host), after a migration away (the deactivated lease, so that it can come back) and after an
//! incoming migration was abandoned here (the standby lease, which would otherwise linger until
//! storaged's standby expiry).
//!
//! Each volume is read first and only the lease that this host holds for this instance is
//! revoked, conditional on the state read (storaged refuses the revoke if it changed meanwhile).
//! A revoke that storaged does not answer is reported with the exact `storaged lease revoke`
//! command that releases it by hand; a standby lease is retried in the background until
//! storaged answers ([`release_standby_later`]).

use crate::agent::Agent;
use crate::api::{LeaseRelease, ReleaseOutcome};
use std::sync::Arc;
use std::time::Duration;
use storaged_client::api::LeaseState;
use vmhop_common::error::chain as error_chain;
use vmhop_common::http::HttpError;

/// First pause between two attempts to release a standby lease while storaged does not answer.
const RETRY_FIRST: Duration = Duration::from_millis(500);
/// The longest pause between two attempts.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Releases the lease this host holds for `instance` on each of `volumes` (with `only_if`,
/// only a lease in that state); one outcome per volume, in order.
pub async fn release(
    agent: &Agent,
    instance: &str,
    volumes: &[String],
    only_if: Option<LeaseState>,
) -> Vec<LeaseRelease> {
    let mut out = Vec::with_capacity(volumes.len());
    for v in volumes {
        out.push(release_one(agent, instance, v, only_if).await);
    }
    out
}

async fn release_one(
    agent: &Agent,
    instance: &str,
    volume: &str,
    only_if: Option<LeaseState>,
) -> LeaseRelease {
    let me = &agent.cfg.host_id;
    let api = agent.storaged().with_timeout(Duration::from_secs(10));
    let held = match api.leases(volume).await {
        Ok(view) => view
            .leases
            .iter()
            .find(|l| &l.host == me && l.instance == instance)
            .map(|l| l.state)
            .filter(|s| only_if.is_none_or(|want| *s == want)),
        Err(e) => return kept(agent, volume, None, &e),
    };
    let Some(state) = held else {
        return LeaseRelease {
            volume: volume.to_string(),
            outcome: ReleaseOutcome::NotHeld,
            state: None,
            error: None,
            command: None,
        };
    };
    let outcome = match api.revoke_host(volume, me, Some(state)).await {
        Ok(_) => LeaseRelease {
            volume: volume.to_string(),
            outcome: ReleaseOutcome::Released,
            state: Some(state),
            error: None,
            command: None,
        },
        Err(e) => kept(agent, volume, Some(state), &e),
    };
    tracing::info!(target: "migrated::state", event = "lease-release", instance, volume,
        host = %me, state = ?state, outcome = ?outcome.outcome, error = ?outcome.error,
        "volume {volume}: {}", outcome);
    outcome
}

/// The outcome of a release that storaged did not take, with the command that does it later.
fn kept(agent: &Agent, volume: &str, state: Option<LeaseState>, e: &HttpError) -> LeaseRelease {
    let mut command = format!(
        "storaged lease revoke {volume} --host {} --api {}",
        agent.cfg.host_id, agent.cfg.storaged_api
    );
    if let Some(f) = &agent.cfg.storaged_token_file {
        command.push_str(&format!(" --token-file {}", f.display()));
    }
    LeaseRelease {
        volume: volume.to_string(),
        outcome: ReleaseOutcome::Kept,
        state,
        error: Some(error_chain(e)),
        command: Some(command),
    }
}

/// Releases this host's standby leases of `instance` on `volumes` in the background, retrying
/// the ones storaged does not answer for (with a growing pause) until it does, and giving up
/// as soon as a VMM of the instance runs here again (a new migration to this host holds a
/// standby lease of its own, which must stay).
pub fn release_standby_later(agent: Arc<Agent>, instance: String, volumes: Vec<String>) {
    tokio::spawn(async move {
        let mut left = volumes;
        let mut pause = RETRY_FIRST;
        loop {
            let here_again = agent
                .instance(&instance)
                .is_ok_and(|r| !r.state.is_terminal());
            if left.is_empty() || here_again {
                return;
            }
            let outcomes = release(&agent, &instance, &left, Some(LeaseState::Standby)).await;
            left = outcomes
                .into_iter()
                .filter(|o| o.outcome == ReleaseOutcome::Kept)
                .map(|o| o.volume)
                .collect();
            if left.is_empty() {
                return;
            }
            tracing::warn!(instance = %instance, volumes = ?left,
                "storaged did not answer: the standby leases are released when it does");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(RETRY_MAX);
        }
    });
}
