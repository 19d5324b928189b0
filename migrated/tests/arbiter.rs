//! storaged decides who runs the guest when links are cut at the flip: the real source and
//! destination state machines, real VMMs and an in-process storaged (the fixture is
//! [`common::hosts`]), with the agents' REST links to storaged and to each other cut, held or
//! losing answers at the flip. The destination flips the leases itself once its VMM holds the
//! whole state, and the source asks it for the outcome; a source that gets no answer flips
//! from its side. Needs /dev/kvm and the workspace's binaries (`cargo build --workspace --bins`).
//!
//! Covered, each time with a watch that the guest never ran on both hosts:
//! - the source cut off from the destination and from storaged at the flip: it cannot prove
//!   that the destination can no longer take the volumes, so it stays paused; the destination
//!   flips and runs the guest; once the links are back the source learns that it won;
//! - the same with a source that can still read the leases but change none, while the
//!   destination is still standby;
//! - the answer to the destination's flip lost after storaged committed it: the destination
//!   reads the leases back and runs the guest instead of leaving it stopped on both;
//! - the source's own flip (its call to the destination lost) arriving after the destination's:
//!   the source treats the destination as the winner and undoes nothing;
//! - the source aborted (storaged confirmed it) while the destination, cut off, sees its
//!   standby leases come back: its flip is refused and it ends its VMM.

mod common;

use common::hosts::{
    hosts, start_migration, wait_phase, Cut, Hosts, SplitBrainWatch, DEADLINE, VOLUMES,
};
use migrated::agent::Agent;
use migrated::instance::InstanceState;
use migrated::migration::record::Phase;
use std::sync::Arc;
use std::time::{Duration, Instant};
use storaged::flip;
use storaged_client::api::LeaseState;
use storaged_client::protocol::RequestedState;

/// A flip request of any kind (one volume's or a group's).
fn is_flip(path: &str) -> bool {
    path.ends_with("/flip")
}

/// The source's call that asks the destination for the outcome of the hand-over.
fn is_complete(path: &str) -> bool {
    path.ends_with("/complete")
}

/// Waits until `agent` runs the guest.
async fn runs_on(agent: &Arc<Agent>) {
    let t = Instant::now();
    loop {
        if let Ok(i) = agent.instance("vm1") {
            if i.state == InstanceState::Running {
                return;
            }
        }
        assert!(
            t.elapsed() < DEADLINE,
            "the guest never ran on {}",
            agent.cfg.host_id
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The guest on a, watched for a split brain, migrating to b with every flip held at the
/// agents' links to storaged and the source's call for the outcome held at the link between the
/// agents: returns once the source waits on that call, with the migration's id. `None` when
/// /dev/kvm is not usable (see [`e2e::kvm_available`]).
async fn migrating_until_the_flip(test: &str) -> Option<(Hosts, SplitBrainWatch, String)> {
    if !e2e::kvm_available(test) {
        return None;
    }
    let h = hosts().await;
    h.guest_on_a().await;
    let watch = SplitBrainWatch::start(&h);
    h.links.storaged_a.hold(is_flip);
    h.links.storaged_b.hold(is_flip);
    h.links.peers.hold(is_complete);
    let id = start_migration(&h.a, "b").await;
    wait_phase(&h.a, &id, |p| p == Phase::Flipping).await;
    Some((h, watch, id))
}

/// Cuts the link between the agents, so that the source's held call for the outcome is lost,
/// and waits until the source makes its own flip (held, or cut, at its link to storaged).
async fn source_flips_alone(h: &Hosts, id: &str) {
    h.links.peers.cut(Cut::All);
    h.links.peers.release();
    let t = Instant::now();
    while !h
        .a
        .migration(id)
        .unwrap()
        .steps
        .iter()
        .any(|s| s.note.contains("flipping the leases from here"))
    {
        assert!(
            t.elapsed() < DEADLINE,
            "the source never flipped from its side"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The source, cut off from the destination and from storaged as `cut` says when its flip
/// leaves, stays paused; the destination flips and runs the guest; once the links heal, the
/// source completes the migration as the destination's.
async fn source_cut_off_at_the_flip(test: &str, cut: Cut) {
    let Some((h, watch, id)) = migrating_until_the_flip(test).await else {
        return;
    };
    h.links.storaged_a.cut(cut);
    h.links.storaged_a.release();
    source_flips_alone(&h, &id).await;
    h.links.storaged_b.release();

    runs_on(&h.b).await;
    // Long enough for a source that resumes without proof to be seen running.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!watch.ran_on_both(), "the guest ran on both hosts");
    let a = h.a.migration(&id).unwrap();
    assert!(!a.phase.is_terminal(), "the source decided blind: {a:?}");

    h.links.heal();
    let a = wait_phase(&h.a, &id, Phase::is_terminal).await;
    assert_eq!(a.phase, Phase::Completed, "{a:?}");
    let b = h.b.migration(&id).unwrap();
    assert_eq!(b.phase, Phase::Completed, "{b:?}");
    assert!(!watch.ran_on_both(), "the guest ran on both hosts");
    h.runs_only_on(&h.b, &h.a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_cut_off_at_the_flip_stays_paused_and_the_destination_takes_over() {
    source_cut_off_at_the_flip(
        "a_source_cut_off_at_the_flip_stays_paused_and_the_destination_takes_over",
        Cut::All,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_can_only_read_the_leases_stays_paused_while_the_destination_is_standby() {
    source_cut_off_at_the_flip(
        "a_source_that_can_only_read_the_leases_stays_paused_while_the_destination_is_standby",
        Cut::Writes,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_flip_answer_is_read_back_and_the_guest_runs_on_the_destination() {
    if !e2e::kvm_available("a_lost_flip_answer_is_read_back_and_the_guest_runs_on_the_destination")
    {
        return;
    }
    let h = hosts().await;
    h.guest_on_a().await;
    let watch = SplitBrainWatch::start(&h);
    h.links.storaged_b.cut(Cut::FlipAnswers);
    let id = start_migration(&h.a, "b").await;

    let a = wait_phase(&h.a, &id, Phase::is_terminal).await;
    assert_eq!(a.phase, Phase::Completed, "{a:?}");
    assert_eq!(a.flipped, VOLUMES.to_vec(), "{a:?}");
    runs_on(&h.b).await;
    assert!(!watch.ran_on_both(), "the guest ran on both hosts");
    h.runs_only_on(&h.b, &h.a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_took_over_wins_over_the_source_flip_that_arrives_late() {
    let test = "a_destination_that_took_over_wins_over_the_source_flip_that_arrives_late";
    let Some((h, watch, id)) = migrating_until_the_flip(test).await else {
        return;
    };
    // The source's call to the destination is lost: it flips from its side, held on its way.
    source_flips_alone(&h, &id).await;
    // The destination flips and runs the guest.
    h.links.storaged_b.release();
    runs_on(&h.b).await;
    h.links.peers.cut(Cut::None);
    // Only now does the source's flip reach storaged.
    h.links.storaged_a.release();

    let a = wait_phase(&h.a, &id, Phase::is_terminal).await;
    assert_eq!(a.phase, Phase::Completed, "{a:?}");
    assert!(!watch.ran_on_both(), "the guest ran on both hosts");
    h.runs_only_on(&h.b, &h.a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_cut_off_cannot_take_over_once_the_source_aborted() {
    let test = "a_destination_cut_off_cannot_take_over_once_the_source_aborted";
    let Some((h, watch, id)) = migrating_until_the_flip(test).await else {
        return;
    };
    source_flips_alone(&h, &id).await;
    // storaged refuses the source's flip (b lost its standby lease on v2): the source aborts.
    let v2 = h.storage.reg.get("v2").unwrap();
    flip::revoke(&h.storage.reg, &v2, "b", None).await.unwrap();
    h.links.storaged_a.release();
    let a = wait_phase(&h.a, &id, Phase::is_terminal).await;
    assert_eq!(a.phase, Phase::Aborted, "{a:?}");
    // b's VMM reconnects its disks as standby (as after a closed connection) before b, which
    // heard nothing of the abort, flips.
    let mut standby = Vec::new();
    for v in VOLUMES {
        standby.push(common::lease(&h.storage.nbd, v, "b", RequestedState::Standby).await);
    }
    h.links.storaged_b.release();

    let b = wait_phase(&h.b, &id, Phase::is_terminal).await;
    assert_eq!(b.phase, Phase::Aborted, "{b:?}");
    assert!(!watch.ran_on_both(), "the guest ran on both hosts");
    drop(standby);
    h.links.heal();
    let i = h.a.instance("vm1").unwrap();
    assert_eq!(i.state, InstanceState::Running, "{i:?}");
    for v in VOLUMES {
        assert_eq!(h.holder(v, "a").await, Some(LeaseState::Primary), "{v}");
        assert_ne!(h.holder(v, "b").await, Some(LeaseState::Primary), "{v}");
    }
}
