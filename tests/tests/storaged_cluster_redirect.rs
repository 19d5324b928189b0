//! "Not master" sends a client to the master, with real processes (an etcd, three storaged
//! nodes, a volume on two of them):
//! - an NBD client that knows only the slave, or only the node without a copy, is refused
//!   with the master's address and connects there;
//! - a lease change sent to the slave's REST API is answered `307 Temporary Redirect` to the
//!   master (the `Location` header and the body name it), which the project's client follows:
//!   the flip is made by the master; the node without a copy redirects a lease change too;
//! - a change of a set of volumes whose masters are different nodes (a guest's disks, each
//!   mastered where it was created) is answered `421 Misdirected Request` naming each volume's
//!   master, and the project's client sends each master its part: the group flip, its rollback
//!   and the group revoke all complete through either node; a part refused while another was
//!   made is reported as an outcome to read back, never as a refusal;
//! - a lease change sent while the master is being replaced (killed, its etcd lease not yet
//!   expired: the slave still sends changes to it) is made by the next master: the client asks
//!   again until there is one, instead of failing.

use anyhow::{Context, Result};
use e2e::cluster::Cluster;
use std::io::{Read, Write};
use std::time::Instant;
use storaged_client::api::{
    GroupFlipRequest, GroupRevokeRequest, GroupRollbackRequest, LeaseState, LeaseView, VolumeEpoch,
};
use storaged_client::nbd::{Client, LeaseSpec};
use storaged_client::protocol::RequestedState;
use storaged_client::rest::StoragedApi;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_node_that_is_not_master_are_sent_to_the_master() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let c = Cluster::start(dir.path(), &["node-a", "node-b", "node-c"], false)?;
    let (master, v) = c.create_replicated("node-a", "rv", "4M", 2).await?;
    assert_eq!(v.placement.replicas, ["node-a", "node-b"]);
    let slave = if master == "node-a" {
        "node-b"
    } else {
        "node-a"
    };
    let api_of = |n: &str| c.node(n).storaged.api.to_string();
    let nbd_of = |n: &str| c.node(n).storaged.nbd.to_string();

    // NBD: one address, not the master's; one round: the refusal's hint is the way in.
    let only = |node: &str, host: &str, state| -> Result<_> {
        let mut cfg = c.client_config("rv", host)?;
        cfg.addresses = vec![nbd_of(node)];
        cfg.rounds = 1;
        cfg.lease = Some(LeaseSpec {
            host: host.into(),
            instance: format!("{host}-vm"),
            state,
            expected_epoch: 0,
        });
        Ok(cfg)
    };
    let primary = Client::connect(&only(slave, "host-1", RequestedState::Primary)?)
        .await
        .context("through the slave")?;
    primary.write_slice(0, &[1u8; 4096], false).await?;
    let standby = Client::connect(&only("node-c", "host-2", RequestedState::Standby)?)
        .await
        .context("through the node without a copy")?;
    let at_master = StoragedApi::new(&api_of(&master), None)
        .leases("rv")
        .await?;
    let conns = |host: &str| {
        at_master
            .leases
            .iter()
            .find(|l| l.host == host)
            .map(|l| (l.state, l.connections))
    };
    assert_eq!(
        conns("host-1"),
        Some((LeaseState::Primary, 1)),
        "{at_master:?}"
    );
    assert_eq!(
        conns("host-2"),
        Some((LeaseState::Standby, 1)),
        "{at_master:?}"
    );

    // REST: a plain HTTP client sees the redirect...
    let mut s = std::net::TcpStream::connect(api_of(slave))?;
    let body = r#"{"to":"host-2"}"#;
    write!(
        s,
        "POST /v1/volumes/rv/flip HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
        Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    let head = answer.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 307"), "{answer}");
    let location = format!("location: http://{}/v1/volumes/rv/flip", api_of(&master));
    assert!(head.contains(&location), "{answer}");
    assert_eq!(
        StoragedApi::new(&api_of(&master), None)
            .leases("rv")
            .await?
            .epoch,
        at_master.epoch,
        "a redirect changes nothing"
    );

    // ... which the project's client follows: the master flips.
    let report = StoragedApi::new(&api_of(slave), None)
        .flip_to("rv", "host-2")
        .await?;
    eprintln!("flip through the slave's API: {report:?}");
    let after = StoragedApi::new(&api_of(slave), None).leases("rv").await?;
    let state = |host: &str| {
        after
            .leases
            .iter()
            .find(|l| l.host == host)
            .map(|l| l.state)
    };
    assert_eq!(after.epoch, at_master.epoch + 1, "{after:?}");
    assert_eq!(state("host-2"), Some(LeaseState::Primary), "{after:?}");
    assert_eq!(state("host-1"), Some(LeaseState::Deactivated), "{after:?}");
    standby.write_slice(4096, &[2u8; 4096], false).await?;

    // Every single-volume change is the master's, whichever node it is sent to: the node
    // without a copy redirects the release of the deactivated lease as the slave does.
    let after = StoragedApi::new(&api_of("node-c"), None)
        .revoke_host("rv", "host-1", Some(LeaseState::Deactivated))
        .await
        .context("releasing the deactivated lease through the node without a copy")?;
    assert_eq!(after.state_of("host-1"), None, "{after:?}");
    assert_eq!(
        after.state_of("host-2"),
        Some(LeaseState::Primary),
        "{after:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_of_volumes_with_different_masters_goes_to_each_master() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let c = Cluster::start(dir.path(), &["node-a", "node-b"], false)?;
    // One copy each, placed on the node that creates it: each node masters one of them.
    let (ma, _) = c.create_replicated("node-a", "va", "4M", 1).await?;
    let (mb, _) = c.create_replicated("node-b", "vb", "4M", 1).await?;
    assert_eq!((ma.as_str(), mb.as_str()), ("node-a", "node-b"));
    let volumes = ["va".to_string(), "vb".to_string()];
    let api_of = |n: &str| StoragedApi::new(&c.node(n).storaged.api.to_string(), None);
    let (api_a, api_b) = (api_of("node-a"), api_of("node-b"));

    let mut standbys = Vec::new();
    for v in &volumes {
        connect(&c, v, "host-1", RequestedState::Primary)
            .await?
            .write_slice(0, &[1u8; 4096], false)
            .await?;
        standbys.push(connect(&c, v, "host-2", RequestedState::Standby).await?);
    }
    let state = |views: &[LeaseView], volume: &str, host: &str| {
        views
            .iter()
            .find(|v| v.volume == volume)
            .and_then(|v| v.state_of(host))
    };
    let epochs = |views: &[LeaseView]| -> Vec<VolumeEpoch> {
        views
            .iter()
            .map(|v| VolumeEpoch {
                volume: v.volume.clone(),
                epoch: v.epoch,
            })
            .collect()
    };

    // The group flip, sent to node-a: each master flips its volume.
    let before = api_a.leases_of(&volumes).await?;
    let flip = GroupFlipRequest {
        from: "host-1".into(),
        to: "host-2".into(),
        volumes: epochs(&before),
        migration: None,
    };
    let report = api_a.flip_group(&flip).await.context("the group flip")?;
    assert_eq!(
        report.volumes.keys().collect::<Vec<_>>(),
        ["va", "vb"],
        "{report:?}"
    );
    let after = api_b.leases_of(&volumes).await?;
    for v in &volumes {
        assert_eq!(
            state(&after, v, "host-2"),
            Some(LeaseState::Primary),
            "{after:?}"
        );
        assert_eq!(
            state(&after, v, "host-1"),
            Some(LeaseState::Deactivated),
            "{after:?}"
        );
    }
    for s in &standbys {
        s.write_slice(4096, &[2u8; 4096], false).await?;
    }

    // Its rollback, sent to node-b, names each flip by the epoch it produced.
    let undo = GroupRollbackRequest {
        primary: "host-2".into(),
        volumes: epochs(&after),
        migration: None,
    };
    api_b.rollback_group(&undo).await.context("the rollback")?;
    let back = api_a.leases_of(&volumes).await?;
    for v in &volumes {
        assert_eq!(
            state(&back, v, "host-1"),
            Some(LeaseState::Primary),
            "{back:?}"
        );
    }

    // A flip whose part at node-b is refused (a stale epoch) while node-a's part is made:
    // the answer is an outcome to read back, not a refusal (something changed).
    let mut stale = epochs(&back);
    stale[1].epoch -= 1;
    let mixed = GroupFlipRequest {
        volumes: stale,
        ..flip.clone()
    };
    let e = api_b
        .flip_group(&mixed)
        .await
        .expect_err("a part is refused");
    assert_ne!(
        e.status(),
        Some(hyper::StatusCode::CONFLICT),
        "reported as refused although va flipped: {e}"
    );
    let split = api_a.leases_of(&volumes).await?;
    assert_eq!(
        state(&split, "va", "host-2"),
        Some(LeaseState::Primary),
        "{split:?}"
    );
    assert_eq!(
        state(&split, "vb", "host-1"),
        Some(LeaseState::Primary),
        "{split:?}"
    );
    api_a
        .rollback_group(&GroupRollbackRequest {
            primary: "host-2".into(),
            volumes: epochs(&split[..1]),
            migration: None,
        })
        .await
        .context("rolling va back")?;

    // Every part refused: the refusal stands (nothing changed).
    let e = api_a
        .flip_group(&flip)
        .await
        .expect_err("stale epochs everywhere");
    assert_eq!(e.status(), Some(hyper::StatusCode::CONFLICT), "{e}");

    // The group revoke of host-2's standby leases, sent to node-a (its clients gone first, so
    // that none of them asks for the lease again).
    drop(standbys);
    let views = api_a
        .revoke_group(&GroupRevokeRequest {
            host: "host-2".into(),
            volumes: volumes.to_vec(),
            primary: Some("host-1".into()),
            migration: None,
        })
        .await
        .context("the group revoke")?;
    assert_eq!(
        views.iter().map(|v| v.volume.as_str()).collect::<Vec<_>>(),
        ["va", "vb"]
    );
    for v in &volumes {
        assert_eq!(state(&views, v, "host-2"), None, "{views:?}");
        assert_eq!(
            state(&views, v, "host-1"),
            Some(LeaseState::Primary),
            "{views:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_change_sent_while_the_master_is_replaced_is_made_by_the_next_master() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let mut c = Cluster::start(dir.path(), &["node-a", "node-b"], false)?;
    let (master, _) = c.create_replicated("node-a", "rv", "4M", 2).await?;
    let slave = if master == "node-a" {
        "node-b"
    } else {
        "node-a"
    };
    let (master_api, slave_api) = (
        c.node(&master).storaged.api.to_string(),
        c.node(slave).storaged.api.to_string(),
    );
    let primary = connect(&c, "rv", "host-1", RequestedState::Primary).await?;
    primary.write_slice(0, &[1u8; 4096], false).await?;
    let _standby = connect(&c, "rv", "host-2", RequestedState::Standby).await?;
    let before = StoragedApi::new(&master_api, None).leases("rv").await?;
    // The client knows both nodes, the slave first: it sends the flip on to the master it
    // still knows, which is dead; the dead master itself refuses connections.
    let api = StoragedApi::new(&format!("{slave_api},{master_api}"), None);

    c.kill9(&master);
    let killed = Instant::now();
    let report = api
        .flip_to("rv", "host-2")
        .await
        .context("the flip sent while the master is replaced")?;
    eprintln!(
        "flip sent at the kill made after {} ms: {report:?}",
        killed.elapsed().as_millis()
    );
    let view = c.view(slave, "rv").await?;
    assert_eq!(view.master.as_deref(), Some(slave), "{view:?}");
    let after = StoragedApi::new(&slave_api, None).leases("rv").await?;
    assert_eq!(after.epoch, before.epoch + 1, "{before:?} -> {after:?}");
    assert_eq!(
        after.state_of("host-2"),
        Some(LeaseState::Primary),
        "{after:?}"
    );
    assert_eq!(
        after.state_of("host-1"),
        Some(LeaseState::Deactivated),
        "{after:?}"
    );
    Ok(())
}

/// A lease-aware client of `volume` on `host`, asking for `state`, knowing every node.
async fn connect(c: &Cluster, volume: &str, host: &str, state: RequestedState) -> Result<Client> {
    let cfg = c.client_config(volume, host)?.with_lease(LeaseSpec {
        host: host.into(),
        instance: format!("{host}-vm"),
        state,
        expected_epoch: 0,
    });
    Client::connect(&cfg).await.context("connecting")
}
