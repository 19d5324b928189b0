//! The source and destination state machines with no test double (the fixture is
//! [`common::hosts`]): two agents in this process, the real `vmm` binary for every VMM, and a
//! real storaged in process. Needs /dev/kvm and the workspace's binaries
//! (`cargo build --workspace --bins`).
//!
//! Covered: a migration there and back (every lease flips, the destination VMM runs, the source
//! VMM ends and its deactivated leases are released); a flip storaged refuses because the
//! destination lost a standby lease (nothing moves, the destination abandons the migration and
//! its VMM is ended, the real source VMM resumed); a destination still deactivated on a volume (its incoming VMM is
//! refused: the migration aborts before anything moved).
//! The phases a real guest needs time in (pre-copy, a restart in the middle) are driven with
//! doubles in `migration_source.rs` and with real guests in the end-to-end tests; cut links
//! are in `arbiter.rs`.

mod common;

use common::hosts::{hosts, migrate, start_migration, wait_phase, VOLUMES};
use migrated::instance::InstanceState;
use migrated::migration::record::Phase;
use storaged::flip::{self, FlipTrigger};
use storaged_client::api::LeaseState;
use storaged_client::protocol::RequestedState;
use vmm_api::vm::RunState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vmms_migrate_there_and_back_flipping_and_releasing_every_lease() {
    if !e2e::kvm_available("real_vmms_migrate_there_and_back_flipping_and_releasing_every_lease") {
        return;
    }
    let h = hosts().await;
    h.guest_on_a().await;
    h.runs_only_on(&h.a, &h.b).await;

    let r = migrate(&h.a, "b").await;
    assert_eq!(r.phase, Phase::Completed, "{r:?}");
    assert_eq!(r.flipped, VOLUMES.to_vec());
    // The destination flipped the leases (the source did not: it has no note of its own flip).
    let notes: Vec<&str> = r.steps.iter().map(|s| s.note.as_str()).collect();
    assert!(
        notes.contains(&"the destination flipped every volume to itself"),
        "{notes:#?}"
    );
    assert!(!notes.iter().any(|n| n.contains("from here")), "{notes:#?}");
    let t = r.figures.timeline;
    assert!(
        t.paused_at_us < t.handed_over_at_us
            && t.handed_over_at_us < t.flipped_at_us
            && t.flipped_at_us < t.resumed_at_us,
        "{t:?}"
    );
    assert!(r.figures.bytes_sent > 0, "{r:?}");
    assert!(r.figures.vmm_downtime_us > 0, "{r:?}");
    assert_eq!(
        h.a.instance("vm1").unwrap().state,
        InstanceState::MigratedAway
    );
    h.runs_only_on(&h.b, &h.a).await;

    let r = migrate(&h.b, "a").await;
    assert_eq!(r.phase, Phase::Completed, "{r:?}");
    h.runs_only_on(&h.a, &h.b).await;
}

/// A flip request of any kind (one volume's or a group's).
fn is_flip(path: &str) -> bool {
    path.ends_with("/flip")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_flip_moves_nothing_and_the_real_source_vmm_resumes() {
    if !e2e::kvm_available("a_refused_flip_moves_nothing_and_the_real_source_vmm_resumes") {
        return;
    }
    let h = hosts().await;
    let started = h.guest_on_a().await;

    // When the destination asks for the flip, it has lost its standby lease on v2.
    h.links.storaged_b.hold(is_flip);
    let id = start_migration(&h.a, "b").await;
    wait_phase(&h.a, &id, |p| p == Phase::Flipping).await;
    let v2 = h.storage.reg.get("v2").unwrap();
    flip::revoke(&h.storage.reg, &v2, "b", None).await.unwrap();
    h.links.storaged_b.release();

    let r = wait_phase(&h.a, &id, Phase::is_terminal).await;
    assert_eq!(r.phase, Phase::Aborted, "{r:?}");
    assert!(
        r.error.as_deref().unwrap().contains("flip refused"),
        "{r:?}"
    );
    assert!(r.flipped.is_empty(), "{r:?}");
    // The same VMM process runs the guest again; b's incoming VMM was ended.
    let i = h.a.instance("vm1").unwrap();
    assert_eq!(i.pid, started.pid);
    let b = h.b.instance("vm1").unwrap();
    assert_eq!(b.state, InstanceState::Stopped, "{b:?}");
    h.runs_only_on(&h.a, &h.b).await;

    // Nothing is left behind that would stop the next migration.
    let r = migrate(&h.a, "b").await;
    assert_eq!(r.phase, Phase::Completed, "{r:?}");
    h.runs_only_on(&h.b, &h.a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_deactivated_on_a_volume_aborts_before_anything_moves() {
    if !e2e::kvm_available("a_destination_deactivated_on_a_volume_aborts_before_anything_moves") {
        return;
    }
    let h = hosts().await;
    // v1 was b's and went to a with a flip; b's deactivated lease was never released.
    let old = common::lease(&h.storage.nbd, "v1", "b", RequestedState::Primary).await;
    let new = common::lease(&h.storage.nbd, "v1", "a", RequestedState::Standby).await;
    let v1 = h.storage.reg.get("v1").unwrap();
    flip::flip(&h.storage.reg, &v1, Some("a"), FlipTrigger::Api)
        .await
        .unwrap();
    drop((old, new));
    assert_eq!(h.holder("v1", "b").await, Some(LeaseState::Deactivated));
    let started = h.guest_on_a().await;

    let r = migrate(&h.a, "b").await;
    assert_eq!(r.phase, Phase::Aborted, "{r:?}");
    let err = r.error.as_deref().unwrap();
    assert!(err.contains("could not prepare"), "{err}");
    assert!(err.contains("deactivated"), "{err}");
    assert!(r.flipped.is_empty(), "{r:?}");
    let i = h.a.instance("vm1").unwrap();
    assert_eq!(i.pid, started.pid);
    assert_eq!(i.state, InstanceState::Running, "{i:?}");
    let info = h.a.vmm(&i).info().await.unwrap();
    assert_eq!(info.state, RunState::Running, "{info:?}");
    for v in VOLUMES {
        assert_eq!(h.holder(v, "a").await, Some(LeaseState::Primary), "{v}");
    }
    assert_eq!(h.holder("v1", "b").await, Some(LeaseState::Deactivated));
    if let Ok(b) = h.b.instance("vm1") {
        assert!(b.state.is_terminal() && !b.vmm_alive(), "{b:?}");
    }
}
