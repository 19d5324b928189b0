//! TLS everywhere, with the real VMM and storaged of [`common::hosts`] and the hosts'
//! certificates of one cluster CA: storaged's NBD takes only TLS clients (the VMMs' disks prove
//! their host with the certificate of the TLS directory migrated gives them), the migration
//! stream runs in TLS between the hosts named in the migration, and the agents serve and call
//! each other in mutual TLS. Covered: a migration there and back; a host of the cluster that is
//! not a migration's source cannot act for it at the destination's API (403), and a client
//! without a certificate gets no answer at all.

mod common;

use common::hosts::{hosts_with, migrate, tls_dir, HostsOptions};
use migrated::client::MigratedClient;
use migrated::migration::record::Phase;
use std::time::Duration;
use vmhop_common::http::{HttpError, HttpTls, Target};
use vmhop_common::tls::HostTls;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_migrates_there_and_back_in_tls_everywhere() {
    if !e2e::kvm_available("a_guest_migrates_there_and_back_in_tls_everywhere") {
        return;
    }
    let h = hosts_with(HostsOptions {
        tls: true,
        ..Default::default()
    })
    .await;
    h.guest_on_a().await;
    h.runs_only_on(&h.a, &h.b).await;

    let there = migrate(&h.a, "b").await;
    assert_eq!(there.phase, Phase::Completed, "{there:?}");
    h.runs_only_on(&h.b, &h.a).await;
    let back = migrate(&h.b, "a").await;
    assert_eq!(back.phase, Phase::Completed, "{back:?}");
    h.runs_only_on(&h.a, &h.b).await;
    // The stream came in TLS from the host the migration named.
    let log = std::fs::read_to_string(&h.a.instance("vm1").unwrap().log).unwrap();
    assert!(log.contains("migration stream connected"), "{log}");
    assert!(log.contains("host=b tls=true"), "{log}");

    // Host c, of the same cluster, cannot act for a's migration at b.
    let b_api = Target::Tcp(h.b.cfg.listen.to_string());
    let token = h.b.cfg.token.clone();
    let c_tls = HostTls::load(&tls_dir(&h, "c")).unwrap();
    let as_c = MigratedClient::new(
        b_api.clone(),
        Duration::from_secs(10),
        token.clone(),
        Some(HttpTls::new(&c_tls, "b").unwrap()),
    );
    match as_c.abort_incoming(&there.id).await {
        Err(HttpError::Status {
            status, message, ..
        }) => {
            assert_eq!(status.as_u16(), 403, "{message}");
            assert!(message.contains("host \"c\" may not abort"), "{message}");
        }
        other => panic!("host c aborted a's migration: {other:?}"),
    }
    // It may ask what any host may.
    assert_eq!(as_c.host().await.unwrap().host_id, "b");
    // Without a certificate nothing is answered.
    let anonymous = MigratedClient::new(b_api, Duration::from_secs(10), token, None);
    let e = anonymous.host().await.unwrap_err();
    assert!(e.status().is_none(), "{e:?}");
}
