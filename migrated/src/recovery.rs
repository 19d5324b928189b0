//! What a (re)started migrated does before it serves: every instance recorded as having a VMM
//! is re-adopted if that VMM still runs (same pid, same start time) or marked lost, and every
//! unfinished migration is handed back to its side ([`crate::migration::source`] or
//! [`crate::migration::destination`]) to finish or undo from its recorded phase. Nothing here
//! starts a VMM.

use crate::agent::{Agent, AgentError};
use crate::instance::InstanceState;
use crate::migration::record::Role;
use crate::migration::{destination, source};
use std::sync::Arc;

/// Re-adopts live VMMs, marks dead ones lost, resumes unfinished migrations.
pub async fn recover(agent: &Arc<Agent>) -> Result<(), AgentError> {
    for rec in agent.instances() {
        if rec.state.is_terminal() {
            continue;
        }
        if rec.vmm_alive() {
            tracing::info!(target: "migrated::state", event = "adopt", instance = %rec.name,
                pid = ?rec.pid, "re-adopting the running VMM of {}", rec.name);
            if rec.state == InstanceState::Starting {
                agent
                    .update_instance(&rec.name, |r| r.state = InstanceState::Running)
                    .await?;
            }
            agent.watch_adopted(&rec);
        } else {
            agent
                .update_instance(&rec.name, |r| {
                    r.state = InstanceState::Lost;
                    r.exit = Some("the VMM was not running when migrated started".into());
                })
                .await?;
        }
    }
    for m in agent.migrations() {
        if m.phase.is_terminal() {
            continue;
        }
        match m.role {
            Role::Source => source::resume_after_restart(agent.clone(), m),
            Role::Destination => destination::resume_after_restart(agent.clone(), m),
        }
    }
    Ok(())
}
