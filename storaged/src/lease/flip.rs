//! The flip: hand a volume's primary lease from one host to another without a stale write.
//!
//! Order, each step timed into a [`FlipReport`]:
//! 1. deactivate: the old primary's connections get the barrier (new requests fail EPERM);
//! 2. drain: wait until the requests admitted before the barrier have finished on disk;
//! 3. disconnect: close the old primary's connections;
//! 4. persist: write the new table (old primary deactivated, standby primary, epoch + 1);
//! 5. promote: the standby's connections get read/write access.
//!
//! Then the caller acknowledges. If drain or persist fails the flip is abandoned and the old
//! table stays in force (a drain failure also lifts the barrier again).
//!
//! A flip of a set of volumes (a guest's: [`flip_group`]) runs these steps for all of them
//! together, under all their lease locks (taken in name order, see
//! [`Registry::get_all`]), after every volume's condition was checked, and persists all the
//! new tables in one transaction: every volume flips or none does.
//!
//! Also here: rollback of a named flip (restore the table before it), revoke (terminate a
//! host's lease), the group revoke that ends a host's standby leases on a set of volumes, and
//! armed flips that complete on the standby's first access or at a deadline, only while the
//! volume stays at the epoch they were armed at.

use super::gate::Access;
use super::{FlipPlan, LeaseError, LeaseTable};
use crate::registry::{Registry, RegistryError};
use crate::volume::{ConnEntry, PendingFlip, Volume};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use storaged_client::api::{
    GroupFlipReport, GroupFlipRequest, GroupRevokeRequest, GroupRollbackRequest, Holder,
    LeaseState, LeaseView, VolumeEpoch,
};
use storaged_client::protocol::FlipReport;
use tokio::sync::MutexGuard;
use vmhop_common::faults::point as fault_point;

/// Why a flip ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlipTrigger {
    /// `POST /v1/volumes/{id}/flip`.
    Api,
    /// `POST /v1/leases/flip`: one of a set of volumes flipped together.
    Group,
    /// `NBD_CMD_LEASE_FLIP` on the standby connection.
    Nbd,
    /// The standby's first data command.
    FirstAccess,
    /// An armed flip's deadline.
    Timeout,
}

impl FlipTrigger {
    /// The trigger's name (a metric label).
    pub fn name(self) -> &'static str {
        match self {
            FlipTrigger::Api => "api",
            FlipTrigger::Group => "group",
            FlipTrigger::Nbd => "nbd",
            FlipTrigger::FirstAccess => "first_access",
            FlipTrigger::Timeout => "timeout",
        }
    }
}

/// A lease-changing operation's errors are registry errors.
pub type FlipError = RegistryError;

fn us(since: Instant) -> u64 {
    since.elapsed().as_micros() as u64
}

/// The connections behind a barrier, with the access each had before.
type Fenced = Vec<(ConnEntry, Access)>;

/// Raises the barrier on the connections of `host`; adds them to `fenced` and returns the
/// number of requests that were in flight at that instant.
fn raise_barrier(vol: &Volume, host: &str, fenced: &mut Fenced) -> u64 {
    let mut inflight = 0;
    for c in vol.conns_of_host(host) {
        let before = c.gate.access();
        inflight += c.gate.set_access(Access::Fenced);
        fenced.push((c, before));
    }
    inflight
}

/// Waits for the fenced connections' admitted requests; on a timeout lifts the barrier again.
async fn drain(reg: &Registry, fenced: &Fenced) -> Result<(), FlipError> {
    for (c, _) in fenced {
        if let Err(e) = c.gate.drained(reg.drain_limit).await {
            for (c, a) in fenced {
                c.gate.set_access(*a);
            }
            return Err(RegistryError::Drain(c.peer.to_string(), e));
        }
    }
    Ok(())
}

/// Barrier and drain in one.
async fn fence_host(reg: &Registry, vol: &Volume, host: &str) -> Result<u64, FlipError> {
    let mut fenced = Vec::new();
    let inflight = raise_barrier(vol, host, &mut fenced);
    drain(reg, &fenced).await?;
    Ok(inflight)
}

/// Closes the (already fenced and drained) connections of `host`.
async fn disconnect_host(vol: &Volume, host: &str) {
    let conns = vol.conns_of_host(host);
    for c in &conns {
        c.gate.set_access(Access::Closed);
    }
    for c in &conns {
        // The barrier already stops its I/O; this only bounds how long we wait for the socket.
        if c.gate.gone(Duration::from_secs(5)).await.is_err() {
            tracing::warn!(volume = %vol.config.name, peer = %c.peer,
                "fenced connection slow to close");
        }
    }
}

fn set_host_access(vol: &Volume, host: &str, access: Access) {
    for c in vol.conns_of_host(host) {
        c.gate.set_access(access);
    }
}

/// Disarms the flip armed on `vol`; returns whether one was.
fn disarm(vol: &Volume) -> bool {
    vol.pending.lock().expect("pending lock").take().is_some()
}

/// Takes the lease locks of `vols` (in name order: [`Registry::get_all`] sorted them).
async fn lock_all(vols: &[Arc<Volume>]) -> Vec<MutexGuard<'_, ()>> {
    let mut guards = Vec::with_capacity(vols.len());
    for v in vols {
        guards.push(v.lease_lock.lock().await);
    }
    guards
}

/// The volumes of a change of a set (in lock order), and the epoch it names for each.
type VolumesAt<'a> = (Vec<Arc<Volume>>, BTreeMap<&'a str, u64>);

/// The volumes a change of a set names (in lock order), with the epoch it names for each.
fn volumes_at<'a>(reg: &Registry, volumes: &'a [VolumeEpoch]) -> Result<VolumesAt<'a>, FlipError> {
    let names: Vec<String> = volumes.iter().map(|v| v.volume.clone()).collect();
    let epochs = volumes
        .iter()
        .map(|v| (v.volume.as_str(), v.epoch))
        .collect();
    Ok((reg.get_all(&names)?, epochs))
}

/// Decides a change on each volume with `decide` (under their locks): all of them, each with
/// its volume, or the first refusal, with the volume that refused.
fn decide_all<T>(
    vols: &[Arc<Volume>],
    mut decide: impl FnMut(&Volume, &LeaseTable) -> Result<T, LeaseError>,
) -> Result<Vec<(Arc<Volume>, T)>, FlipError> {
    vols.iter()
        .map(|v| match decide(v, &v.table()) {
            Ok(change) => Ok((v.clone(), change)),
            Err(source) => Err(RegistryError::Refused {
                volume: v.config.name.clone(),
                source,
            }),
        })
        .collect()
}

/// The reports of a change of a set, by volume (`reports` in the order of `changes`).
fn by_volume<T>(changes: &[(Arc<Volume>, T)], reports: Vec<FlipReport>) -> GroupFlipReport {
    GroupFlipReport {
        volumes: changes
            .iter()
            .map(|(v, _)| v.config.name.clone())
            .zip(reports)
            .collect(),
    }
}

/// Promotes the standby on `to` (or the only standby) to primary.
pub async fn flip(
    reg: &Registry,
    vol: &Arc<Volume>,
    to: Option<&str>,
    trigger: FlipTrigger,
) -> Result<FlipReport, FlipError> {
    let _l = vol.lease_lock.lock().await;
    flip_locked(reg, vol, to, trigger).await
}

async fn flip_locked(
    reg: &Registry,
    vol: &Arc<Volume>,
    to: Option<&str>,
    trigger: FlipTrigger,
) -> Result<FlipReport, FlipError> {
    let plan = vol.table().flip(to)?;
    let mut reports = apply_flips(reg, &[(vol.clone(), plan)], trigger, None).await?;
    Ok(reports.remove(0))
}

/// `POST /v1/leases/flip`: promotes `req.to` on every volume, only if `req.from` is primary on
/// each at the epoch named; every volume flips or none does.
pub async fn flip_group(
    reg: &Registry,
    req: &GroupFlipRequest,
) -> Result<GroupFlipReport, FlipError> {
    let (vols, epochs) = volumes_at(reg, &req.volumes)?;
    let _locks = lock_all(&vols).await;
    let plans = decide_all(&vols, |v, t| {
        t.flip_from(&req.from, epochs[v.config.name.as_str()], &req.to)
    })?;
    let reports = apply_flips(reg, &plans, FlipTrigger::Group, req.migration.as_deref()).await?;
    Ok(by_volume(&plans, reports))
}

/// Runs the steps of the flip (see the module's doc) for every planned volume together; the
/// caller holds their lease locks. Returns each volume's report, in the order of `plans`.
async fn apply_flips(
    reg: &Registry,
    plans: &[(Arc<Volume>, FlipPlan)],
    trigger: FlipTrigger,
    migration: Option<&str>,
) -> Result<Vec<FlipReport>, FlipError> {
    let start = Instant::now();
    let mut reports = vec![FlipReport::default(); plans.len()];
    let mut step = FlipReport::default();

    let t = Instant::now();
    let mut fenced = Vec::new();
    for ((vol, plan), rep) in plans.iter().zip(&mut reports) {
        if let Some(old) = &plan.old_primary {
            rep.drained_requests = raise_barrier(vol, &old.host, &mut fenced);
        }
    }
    step.deactivate_us = us(t);
    fault_point("flip.barrier");

    let t = Instant::now();
    drain(reg, &fenced).await?;
    for (vol, plan) in plans {
        if plan.old_primary.is_none() {
            // The first primary of the volume: anonymous access "while no primary exists" ends.
            reg.fence_anonymous(vol).await?;
        }
    }
    step.drain_us = us(t);
    fault_point("flip.drain");

    let t = Instant::now();
    for (vol, plan) in plans {
        if let Some(old) = &plan.old_primary {
            disconnect_host(vol, &old.host).await;
        }
    }
    step.disconnect_us = us(t);
    fault_point("flip.disconnect");

    let t = Instant::now();
    let changes: Vec<(&Volume, LeaseTable)> = plans
        .iter()
        .map(|(v, p)| (v.as_ref(), p.table.clone()))
        .collect();
    reg.commit_tables(&changes).await?;
    step.persist_us = us(t);
    fault_point("flip.persist");

    let t = Instant::now();
    for (vol, plan) in plans {
        for c in vol.conns_of_holder(&plan.new_primary) {
            c.gate.set_access(Access::ReadWrite);
        }
        disarm(vol);
    }
    step.promote_us = us(t);
    fault_point("flip.promote");
    step.total_us = us(start);

    for ((vol, plan), rep) in plans.iter().zip(&mut reports) {
        *rep = FlipReport {
            epoch: plan.table.epoch,
            drained_requests: rep.drained_requests,
            ..step
        };
        reg.metrics.flipped(trigger.name(), rep);
        tracing::info!(target: "storaged::lease", volume = %vol.config.name, event = "flip",
            trigger = ?trigger, migration = ?migration,
            from = ?plan.old_primary.as_ref().map(Holder::to_string),
            to = %plan.new_primary, epoch = rep.epoch, deactivate_us = rep.deactivate_us,
            drain_us = rep.drain_us, disconnect_us = rep.disconnect_us,
            persist_us = rep.persist_us, promote_us = rep.promote_us, total_us = rep.total_us,
            drained_requests = rep.drained_requests, "lease flipped");
    }
    Ok(reports)
}

/// Undoes the flip that made `host` primary at `epoch` (refused if the volume moved on). The
/// current primary is fenced and drained and goes back to standby on its open connections;
/// the restored primary reconnects.
pub async fn rollback_flip(
    reg: &Registry,
    vol: &Arc<Volume>,
    epoch: u64,
    host: &str,
) -> Result<FlipReport, FlipError> {
    let _l = vol.lease_lock.lock().await;
    let table = vol.table().rollback(epoch, host)?;
    let mut reports = apply_rollbacks(reg, &[(vol.clone(), table)], None).await?;
    Ok(reports.remove(0))
}

/// Undoes the flip now in force on `vol`, whichever it is: for a caller in this process that
/// made that flip itself (the in-process tests of the VMM and of migrated). Remote callers
/// name the flip they undo ([`rollback_flip`]).
pub async fn rollback(reg: &Registry, vol: &Arc<Volume>) -> Result<FlipReport, FlipError> {
    let current = vol.table();
    let host = current
        .primary
        .as_ref()
        .map(|p| p.host.clone())
        .ok_or(LeaseError::NothingToRollBack)?;
    rollback_flip(reg, vol, current.epoch, &host).await
}

/// `POST /v1/leases/rollback`: undoes, on every volume, the flip that made `req.primary`
/// primary at the epoch named, or on none.
pub async fn rollback_group(
    reg: &Registry,
    req: &GroupRollbackRequest,
) -> Result<GroupFlipReport, FlipError> {
    let (vols, epochs) = volumes_at(reg, &req.volumes)?;
    let _locks = lock_all(&vols).await;
    let changes = decide_all(&vols, |v, t| {
        t.rollback(epochs[v.config.name.as_str()], &req.primary)
    })?;
    let reports = apply_rollbacks(reg, &changes, req.migration.as_deref()).await?;
    Ok(by_volume(&changes, reports))
}

/// Fences the current primaries, persists the restored tables in one transaction and gives
/// every connection its access; the caller holds the lease locks.
async fn apply_rollbacks(
    reg: &Registry,
    changes: &[(Arc<Volume>, LeaseTable)],
    migration: Option<&str>,
) -> Result<Vec<FlipReport>, FlipError> {
    let start = Instant::now();
    let mut reports = vec![FlipReport::default(); changes.len()];
    let t = Instant::now();
    let mut fenced = Vec::new();
    let before: Vec<LeaseTable> = changes.iter().map(|(v, _)| v.table()).collect();
    for ((vol, _), (current, rep)) in changes.iter().zip(before.iter().zip(&mut reports)) {
        if let Some(p) = &current.primary {
            rep.drained_requests = raise_barrier(vol, &p.host, &mut fenced);
        }
    }
    drain(reg, &fenced).await?;
    let drain_us = us(t);
    let t = Instant::now();
    let refs: Vec<(&Volume, LeaseTable)> = changes
        .iter()
        .map(|(v, t)| (v.as_ref(), t.clone()))
        .collect();
    reg.commit_tables(&refs).await?;
    let persist_us = us(t);
    let t = Instant::now();
    let disarmed: Vec<bool> = changes
        .iter()
        .map(|(vol, table)| {
            apply_access(vol, table);
            disarm(vol)
        })
        .collect();
    let promote_us = us(t);
    let total_us = us(start);
    reg.metrics.rolled_back(changes.len());
    for (i, (vol, table)) in changes.iter().enumerate() {
        reports[i] = FlipReport {
            epoch: table.epoch,
            drain_us,
            persist_us,
            promote_us,
            total_us,
            drained_requests: reports[i].drained_requests,
            ..FlipReport::default()
        };
        tracing::info!(target: "storaged::lease", volume = %vol.config.name, event = "rollback",
            migration = ?migration,
            from = ?before[i].primary.as_ref().map(Holder::to_string),
            to = ?table.primary.as_ref().map(Holder::to_string), undone_epoch = before[i].epoch,
            epoch = table.epoch, disarmed = disarmed[i], total_us, "lease rolled back");
    }
    Ok(reports)
}

/// Gives every lease connection the access its holder has in `table`.
fn apply_access(vol: &Volume, table: &LeaseTable) {
    for h in table.primary.iter() {
        set_host_access(vol, &h.host, Access::ReadWrite);
    }
    for h in &table.standby {
        set_host_access(vol, &h.host, Access::Standby);
    }
}

/// Terminates every lease of `host` on the volume and closes its connections; with `only_if`,
/// only if the host holds a lease in that state (decided under the volume's lease lock).
pub async fn revoke(
    reg: &Registry,
    vol: &Arc<Volume>,
    host: &str,
    only_if: Option<LeaseState>,
) -> Result<LeaseTable, FlipError> {
    let _l = vol.lease_lock.lock().await;
    let current = vol.table();
    let table = current.revoke(host, only_if)?;
    fence_host(reg, vol, host).await?;
    disconnect_host(vol, host).await;
    reg.commit_table(vol, table.clone()).await?;
    reg.metrics.revoked(1);
    let disarmed = disarm(vol);
    tracing::info!(target: "storaged::lease", volume = %vol.config.name, event = "revoke",
        host = %host, epoch = table.epoch, disarmed, "lease terminated");
    Ok(table)
}

/// `POST /v1/leases/revoke`: ends `req.host`'s standby leases on every volume, only if it is
/// primary on none (and `req.primary`, when named, is primary on every one); every volume's
/// epoch moves. Answers the volumes' lease views after the change.
pub async fn revoke_group(
    reg: &Registry,
    req: &GroupRevokeRequest,
) -> Result<Vec<LeaseView>, FlipError> {
    let vols = reg.get_all(&req.volumes)?;
    let _locks = lock_all(&vols).await;
    let tables: Vec<LeaseTable> = decide_all(&vols, |_, t| {
        t.revoke_standby(&req.host, req.primary.as_deref())
    })?
    .into_iter()
    .map(|(_, t)| t)
    .collect();
    let ending: Vec<bool> = vols
        .iter()
        .map(|v| v.table().state_of(&req.host).map(|(s, _)| s) == Some(LeaseState::Standby))
        .collect();
    let mut fenced = Vec::new();
    for (vol, _) in vols.iter().zip(&ending).filter(|(_, e)| **e) {
        raise_barrier(vol, &req.host, &mut fenced);
    }
    drain(reg, &fenced).await?;
    for (vol, _) in vols.iter().zip(&ending).filter(|(_, e)| **e) {
        disconnect_host(vol, &req.host).await;
    }
    let changes: Vec<(&Volume, LeaseTable)> = vols
        .iter()
        .map(|v| v.as_ref())
        .zip(tables.iter().cloned())
        .collect();
    reg.commit_tables(&changes).await?;
    reg.metrics.revoked(ending.iter().filter(|e| **e).count());
    for ((vol, table), ended) in vols.iter().zip(&tables).zip(&ending) {
        let disarmed = disarm(vol);
        tracing::info!(target: "storaged::lease", volume = %vol.config.name,
            event = "revoke_standby", migration = ?req.migration.as_deref(), host = %req.host,
            ended = *ended, primary = ?req.primary.as_deref(), epoch = table.epoch, disarmed,
            "standby lease terminated");
    }
    Ok(vols.iter().map(|v| v.lease_view()).collect())
}

/// Arms a flip to `to` that completes on the standby's first data command or after `timeout`,
/// only while the volume stays at its current epoch; refused at once if the flip could not
/// happen now. Returns the epoch it is armed at.
pub async fn arm(
    reg: &Arc<Registry>,
    vol: &Arc<Volume>,
    to: Option<String>,
    timeout: Duration,
    migration: Option<String>,
) -> Result<u64, FlipError> {
    let _l = vol.lease_lock.lock().await;
    let table = vol.table();
    table.flip(to.as_deref())?;
    let generation = vol.pending_gen.fetch_add(1, Ordering::Relaxed) + 1;
    *vol.pending.lock().expect("pending lock") = Some(PendingFlip {
        to: to.clone(),
        migration: migration.clone(),
        epoch: table.epoch,
        generation,
    });
    tracing::info!(target: "storaged::lease", volume = %vol.config.name, event = "flip_armed",
        to = ?to, migration = ?migration, epoch = table.epoch,
        timeout_ms = timeout.as_millis() as u64, "flip armed");
    let (reg, vol) = (reg.clone(), vol.clone());
    tokio::spawn(async move {
        tokio::time::sleep(timeout).await;
        let _l = vol.lease_lock.lock().await;
        let pending = vol.pending.lock().expect("pending lock").clone();
        let Some(p) = pending.filter(|p| p.generation == generation) else {
            return;
        };
        disarm(&vol);
        if !p.due(vol.table().epoch, None) {
            return;
        }
        if let Err(e) = flip_locked(&reg, &vol, p.to.as_deref(), FlipTrigger::Timeout).await {
            tracing::warn!(target: "storaged::lease", volume = %vol.config.name,
                event = "flip_failed", trigger = "timeout", error = %e, "armed flip failed");
        }
    });
    Ok(table.epoch)
}

/// Cancels the flip armed on `vol`; with `migration`, refused if another migration armed it.
/// Returns whether one was armed.
pub async fn cancel_armed(vol: &Arc<Volume>, migration: Option<&str>) -> Result<bool, FlipError> {
    let _l = vol.lease_lock.lock().await;
    let pending = vol.pending.lock().expect("pending lock").clone();
    let Some(p) = pending else {
        return Ok(false);
    };
    if let Some(m) = migration.filter(|m| p.migration.as_deref() != Some(*m)) {
        return Err(LeaseError::ArmedForOther {
            asked: m.to_string(),
            armed: p.migration,
        }
        .into());
    }
    disarm(vol);
    tracing::info!(target: "storaged::lease", volume = %vol.config.name, event = "flip_disarmed",
        migration = ?p.migration, to = ?p.to, epoch = p.epoch, "armed flip cancelled");
    Ok(true)
}

/// Called when a standby connection of `holder` issues a data command: flips when the volume
/// flips on first access or an armed flip targets this host. Returns whether it flipped.
pub async fn on_first_access(
    reg: &Registry,
    vol: &Arc<Volume>,
    holder: &Holder,
) -> Result<bool, FlipError> {
    if !may_promote_itself(vol, holder, FlipTrigger::FirstAccess) {
        return Ok(false);
    }
    let _l = vol.lease_lock.lock().await;
    // Another request of the same standby may have flipped meanwhile.
    if vol.table().primary.as_ref() == Some(holder) {
        return Ok(true);
    }
    // The armed flip may have been disarmed while we waited for the lock.
    if !may_promote_itself(vol, holder, FlipTrigger::FirstAccess) {
        return Ok(false);
    }
    let plan = vol.table().flip_holder(holder)?;
    apply_flips(reg, &[(vol.clone(), plan)], FlipTrigger::FirstAccess, None).await?;
    Ok(true)
}

/// `NBD_CMD_LEASE_FLIP`: the standby connection of `holder` asks for its own promotion. Only
/// exactly that holder is promoted (a stale connection of a replaced instance is refused),
/// and only where the control plane allows it: a flip armed for it, or a volume created with
/// `flip_over_nbd`. Otherwise a host that holds a standby lease could take a volume whenever
/// it liked; by default only the REST API (with the cluster token) flips.
pub async fn flip_self(
    reg: &Registry,
    vol: &Arc<Volume>,
    holder: &Holder,
) -> Result<FlipReport, FlipError> {
    let _l = vol.lease_lock.lock().await;
    if !may_promote_itself(vol, holder, FlipTrigger::Nbd) {
        tracing::warn!(target: "storaged::lease", volume = %vol.config.name, event = "refused",
            host = %holder.host, instance = %holder.instance,
            reason = "self-promotion not allowed", "flip over NBD refused");
        return Err(LeaseError::SelfFlipRefused(holder.clone()).into());
    }
    let plan = vol.table().flip_holder(holder)?;
    let mut reports = apply_flips(reg, &[(vol.clone(), plan)], FlipTrigger::Nbd, None).await?;
    Ok(reports.remove(0))
}

/// Whether `holder`'s standby connection may promote itself now (`trigger`: its first data
/// command, or `NBD_CMD_LEASE_FLIP`): a flip armed for its host, or the volume's opt-in.
fn may_promote_itself(vol: &Volume, holder: &Holder, trigger: FlipTrigger) -> bool {
    let armed_for_us = vol
        .pending
        .lock()
        .expect("pending lock")
        .as_ref()
        .is_some_and(|p| p.due(vol.table().epoch, Some(&holder.host)));
    armed_for_us
        || match trigger {
            FlipTrigger::FirstAccess => vol.config.flip_on_first_access,
            FlipTrigger::Nbd => vol.config.flip_over_nbd,
            _ => false,
        }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::gate::Need;
    use crate::lease::LeaseRequest;
    use crate::registry::Attachment;
    use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
    use storaged_client::api::VolumeConfig;
    use storaged_client::protocol::RequestedState;

    /// The connections' peer address: the flip never looks at it.
    const PEER: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1));

    async fn setup(dir: &std::path::Path) -> (Arc<Registry>, Arc<Volume>) {
        let reg = Arc::new(Registry::open(dir).unwrap());
        let vol = reg.create(VolumeConfig::new("v", 1 << 20)).await.unwrap();
        (reg, vol)
    }

    /// Attaches a connection of `host`'s instance "vm" that asks for `state` at epoch 0.
    async fn attach(
        reg: &Registry,
        vol: &Arc<Volume>,
        host: &str,
        state: RequestedState,
    ) -> Attachment {
        let lease = LeaseRequest {
            holder: Holder {
                host: host.into(),
                instance: "vm".into(),
            },
            state,
            expected_epoch: 0,
        };
        reg.attach(vol, Some(lease), PEER).await.unwrap()
    }

    /// Stands in for the task of connection `conn`: detaches once its gate closes.
    fn conn_task(vol: &Arc<Volume>, conn: &Attachment) {
        let (vol, id, gate) = (vol.clone(), conn.entry.id, conn.entry.gate.clone());
        tokio::spawn(async move {
            gate.closed().await;
            vol.detach(id);
        });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn flip_waits_for_admitted_requests_then_promotes() {
        let dir = tempfile::tempdir().unwrap();
        let (reg, vol) = setup(dir.path()).await;
        let a = attach(&reg, &vol, "a", RequestedState::Primary).await;
        let b = attach(&reg, &vol, "b", RequestedState::Standby).await;
        conn_task(&vol, &a);
        // A second connection of the same primary holder (multi-connection clients).
        let a2 = attach(&reg, &vol, "a", RequestedState::Primary).await;
        conn_task(&vol, &a2);
        let admitted = a.entry.gate.admit(Need::Write).unwrap();
        assert_eq!(
            b.entry.gate.admit(Need::Read).unwrap_err(),
            crate::lease::gate::Refusal::Standby
        );

        let (r2, v2) = (reg.clone(), vol.clone());
        let flipping = tokio::spawn(async move { flip(&r2, &v2, None, FlipTrigger::Api).await });
        // The barrier goes up while the admitted request is still running...
        while a.entry.gate.access() != Access::Fenced {
            tokio::task::yield_now().await;
        }
        assert!(a.entry.gate.admit(Need::Write).is_err());
        assert!(!flipping.is_finished());
        assert_eq!(vol.table().epoch, 1, "nothing persisted before the drain");
        // ...and the flip completes only after it finished.
        drop(admitted);
        let rep = flipping.await.unwrap().unwrap();
        assert_eq!(rep.epoch, 2);
        assert_eq!(rep.drained_requests, 1);
        assert_eq!(b.entry.gate.access(), Access::ReadWrite);
        assert_eq!(a.entry.gate.access(), Access::Closed);
        assert_eq!(a2.entry.gate.access(), Access::Closed);
        assert_eq!(vol.connection_count(), 1, "only the new primary is left");
        let t = vol.table();
        assert_eq!(t.state_of("a").unwrap().0, LeaseState::Deactivated);
        assert_eq!(t.state_of("b").unwrap().0, LeaseState::Primary);
        // Durable: a fresh registry on the same dir sees the new table.
        drop(reg);
        let again = Registry::open(dir.path()).unwrap();
        assert_eq!(again.get("v").unwrap().table(), t);
    }

    #[tokio::test]
    async fn rollback_and_revoke_apply_to_connections() {
        let dir = tempfile::tempdir().unwrap();
        let (reg, vol) = setup(dir.path()).await;
        let a = attach(&reg, &vol, "a", RequestedState::Primary).await;
        conn_task(&vol, &a);
        let b = attach(&reg, &vol, "b", RequestedState::Standby).await;
        conn_task(&vol, &b);
        flip(&reg, &vol, Some("b"), FlipTrigger::Nbd).await.unwrap();
        let rep = rollback(&reg, &vol).await.unwrap();
        assert_eq!(rep.epoch, 3);
        assert_eq!(b.entry.gate.access(), Access::Standby);
        assert_eq!(vol.table().primary.unwrap().host, "a");
        assert!(rollback(&reg, &vol).await.is_err());
        revoke(&reg, &vol, "b", None).await.unwrap();
        assert_eq!(b.entry.gate.access(), Access::Closed);
        assert!(vol.table().state_of("b").is_none());
        assert!(revoke(&reg, &vol, "b", None).await.is_err());
    }

    /// Attaches `host` in `state` with a task that detaches it when its gate closes.
    async fn attached(reg: &Registry, vol: &Arc<Volume>, host: &str, state: RequestedState) {
        let c = attach(reg, vol, host, state).await;
        conn_task(vol, &c);
    }

    #[tokio::test]
    async fn a_stale_rollback_is_refused_once_the_volume_moved_on() {
        let dir = tempfile::tempdir().unwrap();
        let (reg, vol) = setup(dir.path()).await;
        attached(&reg, &vol, "a", RequestedState::Primary).await;
        attached(&reg, &vol, "b", RequestedState::Standby).await;
        attached(&reg, &vol, "c", RequestedState::Standby).await;
        // A coordinator flips to b (epoch 2); then the volume moves on to c (epoch 3).
        flip(&reg, &vol, Some("b"), FlipTrigger::Api).await.unwrap();
        flip(&reg, &vol, Some("c"), FlipTrigger::Api).await.unwrap();
        // The coordinator comes back to undo its flip: that is no longer possible.
        assert!(rollback_flip(&reg, &vol, 2, "b").await.is_err());
        assert_eq!(vol.table().primary.unwrap().host, "c");
        assert_eq!(vol.table().epoch, 3);
        // The flip in force can be undone by naming it.
        assert_eq!(rollback_flip(&reg, &vol, 3, "c").await.unwrap().epoch, 4);
        assert_eq!(vol.table().primary.unwrap().host, "b");
    }

    #[tokio::test]
    async fn an_armed_flip_does_not_outlive_the_revoke_of_its_standby() {
        let dir = tempfile::tempdir().unwrap();
        let (reg, vol) = setup(dir.path()).await;
        attached(&reg, &vol, "a", RequestedState::Primary).await;
        attached(&reg, &vol, "b", RequestedState::Standby).await;
        arm(
            &reg,
            &vol,
            Some("b".into()),
            Duration::from_millis(200),
            None,
        )
        .await
        .unwrap();
        // The migration it was armed for ends: b's standby lease is revoked...
        revoke(&reg, &vol, "b", None).await.unwrap();
        // ...and a later one makes b standby again.
        attached(&reg, &vol, "b", RequestedState::Standby).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(vol.table().primary.unwrap().host, "a");
        assert!(!vol.lease_view().flip_pending);
    }

    #[tokio::test]
    async fn an_armed_flip_belongs_to_its_migration_and_to_its_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let (reg, vol) = setup(dir.path()).await;
        attached(&reg, &vol, "a", RequestedState::Primary).await;
        attached(&reg, &vol, "b", RequestedState::Standby).await;
        let long = Duration::from_secs(600);
        arm(&reg, &vol, Some("b".into()), long, Some("m1".into()))
            .await
            .unwrap();
        let armed = vol.lease_view().armed.unwrap();
        assert_eq!((armed.migration.as_deref(), armed.epoch), (Some("m1"), 1));
        // Another migration may not cancel it; its own may, and cancelling twice is no error.
        assert!(cancel_armed(&vol, Some("m2")).await.is_err());
        assert!(cancel_armed(&vol, Some("m1")).await.unwrap());
        assert!(!cancel_armed(&vol, Some("m1")).await.unwrap());
        // A rollback disarms; so does any flip.
        arm(&reg, &vol, Some("b".into()), long, None).await.unwrap();
        flip(&reg, &vol, Some("b"), FlipTrigger::Api).await.unwrap();
        assert!(vol.lease_view().armed.is_none());
        arm(&reg, &vol, Some("a".into()), long, None)
            .await
            .unwrap_err();
        attached(&reg, &vol, "c", RequestedState::Standby).await;
        arm(&reg, &vol, Some("c".into()), long, None).await.unwrap();
        rollback_flip(&reg, &vol, 2, "b").await.unwrap();
        assert!(vol.lease_view().armed.is_none());
        // An armed flip left over from an earlier epoch does not fire on first access.
        *vol.pending.lock().unwrap() = Some(PendingFlip {
            to: Some("c".into()),
            migration: None,
            epoch: 2,
            generation: 99,
        });
        let c = Holder {
            host: "c".into(),
            instance: "vm".into(),
        };
        assert!(!on_first_access(&reg, &vol, &c).await.unwrap());
        assert_eq!(vol.table().primary.unwrap().host, "a");
    }

    /// Three volumes with a primary and b standby on each.
    async fn three_volumes(reg: &Arc<Registry>) -> Vec<Arc<Volume>> {
        let mut vols = Vec::new();
        for name in ["v", "w", "x"] {
            let vol = match reg.get(name) {
                Ok(v) => v,
                Err(_) => reg.create(VolumeConfig::new(name, 1 << 20)).await.unwrap(),
            };
            attached(reg, &vol, "a", RequestedState::Primary).await;
            attached(reg, &vol, "b", RequestedState::Standby).await;
            vols.push(vol);
        }
        vols
    }

    fn at(volumes: &[(&str, u64)]) -> Vec<VolumeEpoch> {
        volumes
            .iter()
            .map(|(v, e)| VolumeEpoch {
                volume: v.to_string(),
                epoch: *e,
            })
            .collect()
    }

    #[tokio::test]
    async fn a_group_flip_flips_every_volume_or_none_and_persists_them_together() {
        let dir = tempfile::tempdir().unwrap();
        let (reg, _) = setup(dir.path()).await;
        let vols = three_volumes(&reg).await;
        let req = |epochs: &[(&str, u64)]| GroupFlipRequest {
            from: "a".into(),
            to: "b".into(),
            volumes: at(epochs),
            migration: Some("m1".into()),
        };
        // One volume at another epoch: nothing flips, and the error names it.
        let refused = flip_group(&reg, &req(&[("x", 1), ("v", 1), ("w", 7)]))
            .await
            .unwrap_err();
        assert!(
            matches!(&refused, RegistryError::Refused { volume, .. } if volume == "w"),
            "{refused:?}"
        );
        for v in &vols {
            assert_eq!(v.table().state_of("a").unwrap().0, LeaseState::Primary);
        }
        assert!(matches!(
            flip_group(&reg, &req(&[("v", 1), ("v", 1)])).await,
            Err(RegistryError::Duplicate(_))
        ));
        let rep = flip_group(&reg, &req(&[("x", 1), ("v", 1), ("w", 1)]))
            .await
            .unwrap();
        assert_eq!(rep.volumes.len(), 3);
        assert!(rep.volumes.values().all(|r| r.epoch == 2));
        // A second try finds a deactivated: refused, the flip stands.
        assert!(flip_group(&reg, &req(&[("x", 1), ("v", 1), ("w", 1)]))
            .await
            .is_err());
        drop(vols);
        drop(reg);
        let again = Registry::open(dir.path()).unwrap();
        for name in ["v", "w", "x"] {
            let t = again.get(name).unwrap().table();
            assert_eq!(t.state_of("b").unwrap().0, LeaseState::Primary, "{name}");
            assert_eq!(t.epoch, 2);
        }
        // Undone together, naming the flips.
        let back = GroupRollbackRequest {
            primary: "b".into(),
            volumes: at(&[("v", 2), ("w", 2), ("x", 2)]),
            migration: None,
        };
        rollback_group(&again, &back).await.unwrap();
        assert!(rollback_group(&again, &back).await.is_err());
        assert_eq!(again.get("w").unwrap().table().primary.unwrap().host, "a");
    }

    #[tokio::test]
    async fn a_group_revoke_fences_the_standby_off_every_volume_or_none() {
        let dir = tempfile::tempdir().unwrap();
        let (reg, _) = setup(dir.path()).await;
        let vols = three_volumes(&reg).await;
        // b took w over: the revoke is refused on every volume.
        flip(&reg, &vols[1], Some("b"), FlipTrigger::Api)
            .await
            .unwrap();
        let req = GroupRevokeRequest {
            host: "b".into(),
            volumes: vec!["v".into(), "w".into(), "x".into()],
            primary: Some("a".into()),
            migration: None,
        };
        assert!(revoke_group(&reg, &req).await.is_err());
        assert_eq!(
            vols[0].table().state_of("b").unwrap().0,
            LeaseState::Standby
        );
        rollback_flip(&reg, &vols[1], 2, "b").await.unwrap();
        let epochs: Vec<u64> = vols.iter().map(|v| v.table().epoch).collect();
        let views = revoke_group(&reg, &req).await.unwrap();
        for ((v, view), before) in vols.iter().zip(&views).zip(epochs) {
            assert_eq!(view.state_of("b"), None);
            assert_eq!(view.epoch, before + 1);
            assert_eq!(v.table().state_of("a").unwrap().0, LeaseState::Primary);
        }
        // b connecting again as standby cannot flip against the epochs before.
        attached(&reg, &vols[0], "b", RequestedState::Standby).await;
        let stale = GroupFlipRequest {
            from: "a".into(),
            to: "b".into(),
            volumes: at(&[("v", 1)]),
            migration: None,
        };
        assert!(flip_group(&reg, &stale).await.is_err());
    }

    #[tokio::test]
    async fn illegal_flips_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (reg, vol) = setup(dir.path()).await;
        let a = attach(&reg, &vol, "a", RequestedState::Primary).await;
        assert!(flip(&reg, &vol, None, FlipTrigger::Api).await.is_err());
        assert!(flip(&reg, &vol, Some("a"), FlipTrigger::Api).await.is_err());
        assert_eq!(a.entry.gate.access(), Access::ReadWrite);
        assert_eq!(vol.table().epoch, 1);
        // Anonymous access is refused while a primary exists.
        assert!(reg.attach(&vol, None, PEER).await.is_err());
    }

    #[tokio::test]
    async fn first_primary_by_flip_ends_anonymous_access() {
        let dir = tempfile::tempdir().unwrap();
        let (reg, vol) = setup(dir.path()).await;
        let anon = reg.attach(&vol, None, PEER).await.unwrap();
        assert_eq!(anon.entry.gate.access(), Access::ReadOnly);
        attach(&reg, &vol, "b", RequestedState::Standby).await;
        flip(&reg, &vol, None, FlipTrigger::Api).await.unwrap();
        assert_eq!(anon.entry.gate.access(), Access::Closed);
        assert!(reg.attach(&vol, None, PEER).await.is_err());
    }

    #[tokio::test]
    async fn a_standby_promotes_itself_only_as_itself_and_only_where_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let (reg, vol) = setup(dir.path()).await;
        attached(&reg, &vol, "a", RequestedState::Primary).await;
        let b = attach(&reg, &vol, "b", RequestedState::Standby).await;
        conn_task(&vol, &b);
        let holder = b.entry.holder.clone().unwrap();
        // A volume that only lets the control plane flip: refused, nothing changed.
        let e = flip_self(&reg, &vol, &holder).await.unwrap_err();
        assert!(
            matches!(e, RegistryError::Lease(LeaseError::SelfFlipRefused(_))),
            "{e}"
        );
        assert_eq!(vol.table().primary.unwrap().host, "a");
        // Armed for b by the control plane: b's own request completes it.
        arm(&reg, &vol, Some("b".into()), Duration::from_secs(60), None)
            .await
            .unwrap();
        // A stale connection of a replaced instance of b is not b's standby any more.
        let newer = LeaseRequest {
            holder: Holder {
                host: "b".into(),
                instance: "vm-restarted".into(),
            },
            state: RequestedState::Standby,
            expected_epoch: 0,
        };
        let fresh = reg.attach(&vol, Some(newer), PEER).await.unwrap();
        conn_task(&vol, &fresh);
        let e = flip_self(&reg, &vol, &holder).await.unwrap_err();
        assert!(
            matches!(e, RegistryError::Lease(LeaseError::StaleStandby(_))),
            "{e}"
        );
        assert_eq!(vol.table().primary.unwrap().host, "a");
        let rep = flip_self(&reg, &vol, fresh.entry.holder.as_ref().unwrap())
            .await
            .unwrap();
        assert_eq!(rep.epoch, 2);
        assert_eq!(vol.table().primary.unwrap().instance, "vm-restarted");
    }
}
