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
//! Also here: rollback (restore the table before the last flip), revoke (terminate a host's
//! lease), and armed flips that complete on the standby's first access or at a deadline.

use super::gate::Access;
use super::LeaseTable;
use crate::registry::{Registry, RegistryError};
use crate::volume::{ConnEntry, PendingFlip, Volume};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use storaged_client::api::{Holder, LeaseState};
use storaged_client::protocol::FlipReport;

/// Why a flip ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlipTrigger {
    /// `POST /v1/volumes/{id}/flip`.
    Api,
    /// `NBD_CMD_LEASE_FLIP` on the standby connection.
    Nbd,
    /// The standby's first data command.
    FirstAccess,
    /// An armed flip's deadline.
    Timeout,
}

/// A lease-changing operation's errors are registry errors.
pub type FlipError = RegistryError;

fn us(since: Instant) -> u64 {
    since.elapsed().as_micros() as u64
}

/// The connections behind a barrier, with the access each had before.
type Fenced = Vec<(ConnEntry, Access)>;

/// Raises the barrier on the connections of `host`; returns them and the number of requests
/// that were in flight at that instant.
fn raise_barrier(vol: &Volume, host: &str) -> (Fenced, u64) {
    let mut inflight = 0;
    let fenced = vol
        .conns_of_host(host)
        .into_iter()
        .map(|c| {
            let before = c.gate.access();
            inflight += c.gate.set_access(Access::Fenced);
            (c, before)
        })
        .collect();
    (fenced, inflight)
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
    let (fenced, inflight) = raise_barrier(vol, host);
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
    let start = Instant::now();
    let plan = vol.table().flip(to)?;
    let mut rep = FlipReport::default();

    let t = Instant::now();
    let old_host = plan.old_primary.as_ref().map(|h| h.host.clone());
    let (fenced, inflight) = match &old_host {
        Some(host) => raise_barrier(vol, host),
        None => (Vec::new(), 0),
    };
    rep.drained_requests = inflight;
    rep.deactivate_us = us(t);

    let t = Instant::now();
    drain(reg, &fenced).await?;
    if old_host.is_none() {
        // The first primary of the volume: anonymous access "while no primary exists" ends.
        reg.fence_anonymous(vol).await?;
    }
    rep.drain_us = us(t);

    let t = Instant::now();
    if let Some(host) = &old_host {
        disconnect_host(vol, host).await;
    }
    rep.disconnect_us = us(t);

    let t = Instant::now();
    reg.commit_table(vol, plan.table.clone()).await?;
    rep.persist_us = us(t);

    let t = Instant::now();
    for c in vol.conns_of_holder(&plan.new_primary) {
        c.gate.set_access(Access::ReadWrite);
    }
    *vol.pending.lock().expect("pending lock") = None;
    rep.promote_us = us(t);

    rep.epoch = plan.table.epoch;
    rep.total_us = us(start);
    tracing::info!(target: "storaged::lease", volume = %vol.config.name, event = "flip",
        trigger = ?trigger, from = ?plan.old_primary.as_ref().map(Holder::to_string),
        to = %plan.new_primary, epoch = rep.epoch, deactivate_us = rep.deactivate_us,
        drain_us = rep.drain_us, disconnect_us = rep.disconnect_us,
        persist_us = rep.persist_us, promote_us = rep.promote_us, total_us = rep.total_us,
        drained_requests = rep.drained_requests, "lease flipped");
    Ok(rep)
}

/// Restores the table before the last flip. The current primary is fenced and drained and
/// goes back to standby on its open connections; the restored primary reconnects.
pub async fn rollback(reg: &Registry, vol: &Arc<Volume>) -> Result<FlipReport, FlipError> {
    let _l = vol.lease_lock.lock().await;
    let start = Instant::now();
    let current = vol.table();
    let table = current.rollback()?;
    let mut rep = FlipReport::default();
    let t = Instant::now();
    if let Some(p) = &current.primary {
        rep.drained_requests = fence_host(reg, vol, &p.host).await?;
    }
    rep.drain_us = us(t);
    let t = Instant::now();
    reg.commit_table(vol, table.clone()).await?;
    rep.persist_us = us(t);
    let t = Instant::now();
    apply_access(vol, &table);
    rep.promote_us = us(t);
    rep.epoch = table.epoch;
    rep.total_us = us(start);
    tracing::info!(target: "storaged::lease", volume = %vol.config.name, event = "rollback",
        from = ?current.primary.as_ref().map(Holder::to_string),
        to = ?table.primary.as_ref().map(Holder::to_string), epoch = table.epoch,
        total_us = rep.total_us, "lease rolled back");
    Ok(rep)
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
    tracing::info!(target: "storaged::lease", volume = %vol.config.name, event = "revoke",
        host = %host, epoch = table.epoch, "lease terminated");
    Ok(table)
}

/// Arms a flip to `to` that completes on the standby's first data command or after `timeout`.
pub fn arm(reg: &Arc<Registry>, vol: &Arc<Volume>, to: Option<String>, timeout: Duration) {
    let generation = vol.pending_gen.fetch_add(1, Ordering::Relaxed) + 1;
    *vol.pending.lock().expect("pending lock") = Some(PendingFlip {
        to: to.clone(),
        generation,
    });
    tracing::info!(target: "storaged::lease", volume = %vol.config.name, event = "flip_armed",
        to = ?to, timeout_ms = timeout.as_millis() as u64, "flip armed");
    let (reg, vol) = (reg.clone(), vol.clone());
    tokio::spawn(async move {
        tokio::time::sleep(timeout).await;
        let _l = vol.lease_lock.lock().await;
        let due = vol
            .pending
            .lock()
            .expect("pending lock")
            .as_ref()
            .is_some_and(|p| p.generation == generation);
        if due {
            if let Err(e) = flip_locked(&reg, &vol, to.as_deref(), FlipTrigger::Timeout).await {
                tracing::warn!(target: "storaged::lease", volume = %vol.config.name,
                    event = "flip_failed", trigger = "timeout", error = %e, "armed flip failed");
            }
            *vol.pending.lock().expect("pending lock") = None;
        }
    });
}

/// Called when a standby connection of `holder` issues a data command: flips when the volume
/// flips on first access or an armed flip targets this host. Returns whether it flipped.
pub async fn on_first_access(
    reg: &Registry,
    vol: &Arc<Volume>,
    holder: &Holder,
) -> Result<bool, FlipError> {
    let armed_for_us = vol
        .pending
        .lock()
        .expect("pending lock")
        .as_ref()
        .is_some_and(|p| p.to.as_deref().is_none_or(|h| h == holder.host));
    if !armed_for_us && !vol.config.flip_on_first_access {
        return Ok(false);
    }
    let _l = vol.lease_lock.lock().await;
    // Another request of the same standby may have flipped meanwhile.
    if vol.table().primary.as_ref() == Some(holder) {
        return Ok(true);
    }
    flip_locked(reg, vol, Some(&holder.host), FlipTrigger::FirstAccess).await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::gate::Need;
    use crate::lease::LeaseRequest;
    use crate::registry::Attachment;
    use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
    use storaged_client::api::LeaseState;
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
}
