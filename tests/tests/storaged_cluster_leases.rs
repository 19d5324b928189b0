//! The lease table of a replicated volume in etcd, with real processes (an etcd, two storaged
//! nodes): changes are etcd transactions guarded by the master's term, so a master that was
//! deposed while it decided a change can make neither a grant nor a flip; every node answers
//! lease queries.
//!
//! The master is stopped at the fault point just before its transaction
//! (`VMHOP_STALL_AT=cluster.lease.grant` / `cluster.lease.flip`, armed on both nodes since
//! either may win the election), kept stopped until etcd ended its lease and elected the other
//! node, then let go: its transaction must fail and nothing may change.

use anyhow::{Context, Result};
use e2e::cluster::Cluster;
use e2e::process::wait_for_async;
use std::sync::Arc;
use std::time::Duration;
use storaged_client::api::{LeaseState, LeaseView};
use storaged_client::nbd::{Client, ClientError, FailoverClient, LeaseSpec};
use storaged_client::protocol::RequestedState;
use storaged_client::rest::StoragedApi;

const DEADLINE: Duration = Duration::from_secs(60);

/// A cluster of two nodes both armed to stop at `point`, a volume on both, its first master
/// elected; returns the cluster, the master and the other node.
async fn armed_cluster(dir: &std::path::Path, point: &str) -> Result<(Cluster, String, String)> {
    let c = Cluster::pair_with_env(dir, &[("VMHOP_STALL_AT", point)], "4M")?;
    let (master, _) = c.wait_master("node-a", "rv").await?;
    let other = if master == "node-a" {
        "node-b"
    } else {
        "node-a"
    };
    Ok((c, master, other.to_string()))
}

/// Waits until `master` stopped at its fault point, then until etcd elected `other`, then
/// lets `master` go on.
async fn depose_while_stopped(c: &Cluster, master: &str, other: &str) -> Result<()> {
    let m = &c.node(master).storaged;
    wait_for_async(
        "the master to stop at its fault point",
        DEADLINE,
        || async { m.is_stopped().then_some(()) },
    )
    .await?;
    let v = c
        .wait_view(other, "rv", "the other node elected", |v| {
            v.master.as_deref() == Some(other)
        })
        .await?;
    eprintln!(
        "{master} stopped before its transaction; {other} elected at term {}",
        v.term
    );
    m.freeze(false)
}

/// The lease table as node `via` answers it.
async fn leases(c: &Cluster, via: &str) -> Result<LeaseView> {
    let api = StoragedApi::new(&c.node(via).storaged.api.to_string(), None);
    Ok(api.leases("rv").await?)
}

fn state_of(v: &LeaseView, host: &str) -> Option<LeaseState> {
    v.leases.iter().find(|l| l.host == host).map(|l| l.state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_master_cannot_grant_the_primary_lease() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (c, master, other) = armed_cluster(dir.path(), "cluster.lease.grant").await?;
    // A client asks the master alone for the primary lease; the master stops before it writes
    // the grant to etcd.
    let mut cfg = c.client_config("rv", "host-1")?;
    cfg.addresses = vec![c.node(&master).storaged.nbd.to_string()];
    cfg.rounds = 1;
    cfg.connect_timeout = DEADLINE;
    let attempt = tokio::spawn(async move { Client::connect(&cfg).await });
    depose_while_stopped(&c, &master, &other).await?;
    let refused = attempt
        .await?
        .err()
        .context("the deposed master granted the lease")?;
    // "Not master" sends a client on to the next address: with none left, it gives up.
    let text = refused.to_string();
    assert!(
        matches!(refused, ClientError::Unreachable { .. }) && text.contains("no longer the master"),
        "{text}"
    );
    // Nothing was granted, as both nodes tell.
    for via in [&master, &other] {
        let v = leases(&c, via).await?;
        assert_eq!(
            (v.epoch, state_of(&v, "host-1")),
            (0, None),
            "via {via}: {v:?}"
        );
    }
    assert!(
        c.node(&master).storaged.log().contains("lease-refused"),
        "the deposed master logs the refusal"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_master_cannot_flip() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (c, master, other) = armed_cluster(dir.path(), "cluster.lease.flip").await?;
    // host-1 primary (through every node, following the master), host-2 standby.
    let primary = Arc::new(FailoverClient::connect(c.client_config("rv", "host-1")?).await?);
    primary.write(0, &[7u8; 4096], false).await?;
    let mut standby = c.client_config("rv", "host-2")?;
    standby.lease = Some(LeaseSpec {
        host: "host-2".into(),
        instance: "host-2-vm".into(),
        state: RequestedState::Standby,
        expected_epoch: 0,
    });
    let _standby = Client::connect(&standby).await?;
    let before = leases(&c, &other).await?;
    assert_eq!(state_of(&before, "host-1"), Some(LeaseState::Primary));
    assert_eq!(state_of(&before, "host-2"), Some(LeaseState::Standby));

    // The flip reaches the master, which stops before it writes the new table. Its answer is
    // the one checked: the client does not ask the next master again (it would, for up to
    // its election wait, as a migration's flip does; and the next master is armed to stop too).
    let api = StoragedApi::new(&c.node(&master).storaged.api.to_string(), None)
        .with_election_wait(Duration::ZERO);
    let flip = tokio::spawn(async move { api.flip_to("rv", "host-2").await });
    depose_while_stopped(&c, &master, &other).await?;
    let refused = flip.await?.err().context("the deposed master flipped")?;
    let text = format!("{refused:#}");
    assert!(text.contains("no longer the master"), "{text}");

    // The table is the one before the flip, on both nodes, and host-1 writes on through the
    // new master with the lease it held.
    for via in [&master, &other] {
        let v = leases(&c, via).await?;
        assert_eq!(v.epoch, before.epoch, "via {via}: {v:?}");
        assert_eq!(
            state_of(&v, "host-1"),
            Some(LeaseState::Primary),
            "via {via}"
        );
        assert_eq!(
            state_of(&v, "host-2"),
            Some(LeaseState::Standby),
            "via {via}"
        );
    }
    primary.write(4096, &[8u8; 4096], false).await?;
    assert_eq!(primary.read(0, 4096).await?, vec![7u8; 4096]);
    let now = c.view(&other, "rv").await?;
    assert_eq!(now.master.as_deref(), Some(other.as_str()), "{now:?}");
    Ok(())
}
