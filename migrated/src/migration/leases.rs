//! A migrating guest's leases as storaged shows them, for the two sides' decisions.
//!
//! storaged is the arbiter: a side acts only through storaged's conditional operations on the
//! guest's whole set of volumes (the group flip, the group revoke, the named rollback), and when
//! the answer to one is lost or refused it reads the leases back here before deciding anything.
//! A read that fails is retried until storaged answers ([`read_until_known`]): a side that
//! cannot tell who holds the volumes does not guess, it waits with the guest paused.

use std::collections::BTreeMap;
use std::time::Duration;
use storaged_client::api::{LeaseState, LeaseView, VolumeEpoch};
use storaged_client::rest::StoragedApi;
use vmhop_common::http::HttpError;

/// Pause between two attempts to reach storaged while a decision waits on it.
pub const RETRY: Duration = Duration::from_millis(250);
/// The longest pause between two attempts.
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Who holds a guest's volumes, by the destination's share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holding {
    /// The destination is primary on every volume: it won (whoever flipped).
    Destination,
    /// The destination is primary on none.
    NotDestination,
    /// The destination is primary on these volumes only (at these epochs): the guest is split
    /// (by hand, or by an older migrated that flipped one volume at a time).
    Split(Vec<VolumeEpoch>),
}

impl Holding {
    /// Classifies the lease views of a guest's volumes.
    pub fn of(views: &[LeaseView], destination: &str) -> Holding {
        let primary = primary_of(views, destination);
        match primary.len() {
            0 => Holding::NotDestination,
            n if n == views.len() => Holding::Destination,
            _ => Holding::Split(primary),
        }
    }
}

/// The volumes on which `host` is primary, each with its epoch (that of the flip that made it
/// primary, while nothing moved on).
pub fn primary_of(views: &[LeaseView], host: &str) -> Vec<VolumeEpoch> {
    views
        .iter()
        .filter(|v| v.state_of(host) == Some(LeaseState::Primary))
        .map(|v| VolumeEpoch {
            volume: v.volume.clone(),
            epoch: v.epoch,
        })
        .collect()
}

/// Whether storaged refused the change (409: it decided, and nothing changed), as opposed to
/// an answer that did not come or an error whose outcome is unknown.
pub fn refused(e: &HttpError) -> bool {
    e.status() == Some(hyper::StatusCode::CONFLICT)
}

/// Whether a change cut into one request per master (see `storaged_client::group`) was made
/// by some of them and refused by the others (none failed otherwise): storaged decided every
/// part, though not all alike.
pub fn partly_refused(e: &HttpError) -> bool {
    matches!(e, HttpError::Partial { failed, .. } if refused(failed))
}

/// The epoch of each volume at which `host` holds its primary lease, or the first volume it
/// does not hold as primary (with what it holds there).
pub fn primary_epochs(
    views: &[LeaseView],
    host: &str,
) -> Result<BTreeMap<String, u64>, (String, Option<LeaseState>)> {
    views
        .iter()
        .map(|v| match v.state_of(host) {
            Some(LeaseState::Primary) => Ok((v.volume.clone(), v.epoch)),
            other => Err((v.volume.clone(), other)),
        })
        .collect()
}

/// `epochs` as the volume list of a group request, in the order of `volumes`; None if one is
/// missing (a record made before epochs were recorded).
pub fn named(volumes: &[String], epochs: &BTreeMap<String, u64>) -> Option<Vec<VolumeEpoch>> {
    volumes
        .iter()
        .map(|v| {
            epochs.get(v).map(|&epoch| VolumeEpoch {
                volume: v.clone(),
                epoch,
            })
        })
        .collect()
}

/// Reads the lease views of `volumes` until storaged answers; `waiting` hears of each failed
/// attempt (with its number, from 1, and the error) so that the caller can record that it
/// waits (durably: it returns a future).
pub async fn read_until_known<F: std::future::Future<Output = ()>>(
    api: &StoragedApi,
    volumes: &[String],
    mut waiting: impl FnMut(u32, HttpError) -> F,
) -> Vec<LeaseView> {
    let mut pause = RETRY;
    for attempt in 1.. {
        match api.leases_of(volumes).await {
            Ok(views) => return views,
            Err(e) => waiting(attempt, e).await,
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(RETRY_MAX);
    }
    unreachable!("the attempts never run out")
}

#[cfg(test)]
mod tests {
    use super::*;
    use storaged_client::api::LeaseEntry;

    fn view(volume: &str, epoch: u64, leases: &[(&str, LeaseState)]) -> LeaseView {
        LeaseView {
            volume: volume.into(),
            epoch,
            leases: leases
                .iter()
                .map(|(host, state)| LeaseEntry {
                    host: host.to_string(),
                    instance: "vm1".into(),
                    state: *state,
                    connections: 1,
                })
                .collect(),
            anonymous_connections: 0,
            flip_pending: false,
            can_roll_back: false,
            armed: None,
        }
    }

    #[test]
    fn the_destination_wins_only_with_every_volume() {
        use LeaseState::*;
        let flipped = [
            view("v1", 2, &[("b", Primary), ("a", Deactivated)]),
            view("v2", 5, &[("b", Primary)]),
        ];
        assert_eq!(Holding::of(&flipped, "b"), Holding::Destination);
        let split = [
            flipped[0].clone(),
            view("v2", 4, &[("a", Primary), ("b", Standby)]),
        ];
        assert_eq!(
            Holding::of(&split, "b"),
            Holding::Split(vec![VolumeEpoch {
                volume: "v1".into(),
                epoch: 2
            }])
        );
        assert_eq!(Holding::of(&split[1..], "b"), Holding::NotDestination);
        assert_eq!(
            primary_epochs(&split[1..], "a").unwrap(),
            [("v2".to_string(), 4)].into_iter().collect()
        );
        assert_eq!(
            primary_epochs(&split, "a").unwrap_err(),
            ("v1".to_string(), Some(Deactivated))
        );
        let epochs = primary_epochs(&split[1..], "a").unwrap();
        assert_eq!(named(&["v2".into()], &epochs).unwrap()[0].epoch, 4);
        assert!(named(&["v1".into()], &epochs).is_none());
    }

    #[test]
    fn a_part_refused_while_another_was_made_is_partly_refused() {
        let status = |code: u16| HttpError::Status {
            target: "n".into(),
            status: hyper::StatusCode::from_u16(code).unwrap(),
            message: "m".into(),
            details: None,
        };
        let partial = |failed| HttpError::Partial {
            done: 1,
            parts: 2,
            failed: Box::new(failed),
        };
        assert!(refused(&status(409)) && !partly_refused(&status(409)));
        assert!(partly_refused(&partial(status(409))));
        assert!(!refused(&partial(status(409))), "something was made");
        assert!(!partly_refused(&partial(status(503))), "an outcome unknown");
    }
}
