//! "Not master" sends a client to the master, with real processes (an etcd, three storaged
//! nodes, a volume on two of them):
//! - an NBD client that knows only the slave, or only the node without a copy, is refused
//!   with the master's address and connects there;
//! - a lease change sent to the slave's REST API is answered `307 Temporary Redirect` to the
//!   master (the `Location` header and the body name it), which the project's client follows:
//!   the flip is made by the master.

use anyhow::{Context, Result};
use e2e::cluster::Cluster;
use std::io::{Read, Write};
use storaged_client::api::LeaseState;
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
    Ok(())
}
