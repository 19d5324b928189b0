//! A change of a set of volumes (group flip, rollback, revoke) on a storaged cluster whose
//! volumes are mastered on different nodes: no one node can make it, so the node asked answers
//! `421 Misdirected Request` with each volume's master ([`crate::api::ErrorBody::masters`]),
//! and the change is cut into one request per master, sent to all of them at once.
//!
//! The parts are separate decisions: one master may make its part while another refuses.
//! Every part refused is a refusal (nothing changed anywhere); every part made is the whole
//! answer; anything else is [`HttpError::Partial`] (or the error of a part whose outcome is
//! unknown), which the caller reads back as it does any answer it cannot trust: a migration's
//! recovery already handles a guest whose volumes are held by different hosts.

use crate::api::{
    GroupFlipReport, GroupFlipRequest, GroupRevokeRequest, GroupRollbackRequest, LeaseView,
};
use futures::future::join_all;
use hyper::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::BTreeMap;
use vmhop_common::http::{Client, HttpError};

/// A change of a set of volumes that can be cut by volume.
pub trait GroupChange: Serialize {
    /// The volumes named, in order.
    fn names(&self) -> Vec<String>;
    /// The same change of `names` only.
    fn only(&self, names: &[String]) -> Self;
}

/// The answer of a [`GroupChange`], made of its parts' answers.
pub trait GroupAnswer: DeserializeOwned {
    /// The whole answer from the parts' (in the order of the volumes named, `names`).
    fn merge(parts: Vec<Self>, names: &[String]) -> Self;
}

impl GroupChange for GroupFlipRequest {
    fn names(&self) -> Vec<String> {
        self.volumes.iter().map(|v| v.volume.clone()).collect()
    }
    fn only(&self, names: &[String]) -> Self {
        GroupFlipRequest {
            volumes: only(&self.volumes, names, |v| &v.volume),
            ..self.clone()
        }
    }
}

impl GroupChange for GroupRollbackRequest {
    fn names(&self) -> Vec<String> {
        self.volumes.iter().map(|v| v.volume.clone()).collect()
    }
    fn only(&self, names: &[String]) -> Self {
        GroupRollbackRequest {
            volumes: only(&self.volumes, names, |v| &v.volume),
            ..self.clone()
        }
    }
}

impl GroupChange for GroupRevokeRequest {
    fn names(&self) -> Vec<String> {
        self.volumes.clone()
    }
    fn only(&self, names: &[String]) -> Self {
        GroupRevokeRequest {
            volumes: only(&self.volumes, names, |v| v),
            ..self.clone()
        }
    }
}

impl GroupAnswer for GroupFlipReport {
    fn merge(parts: Vec<Self>, _names: &[String]) -> Self {
        GroupFlipReport {
            volumes: parts.into_iter().flat_map(|p| p.volumes).collect(),
        }
    }
}

impl GroupAnswer for Vec<LeaseView> {
    fn merge(parts: Vec<Self>, names: &[String]) -> Self {
        let mut views: Vec<LeaseView> = parts.into_iter().flatten().collect();
        views.sort_by_key(|v| names.iter().position(|n| *n == v.volume));
        views
    }
}

fn only<T: Clone>(items: &[T], names: &[String], name: impl Fn(&T) -> &String) -> Vec<T> {
    items
        .iter()
        .filter(|i| names.contains(name(i)))
        .cloned()
        .collect()
}

/// Each volume's master API address, from a `421` answer; None for any other error.
pub fn masters_of(e: &HttpError) -> Option<BTreeMap<String, String>> {
    if e.status() != Some(StatusCode::MISDIRECTED_REQUEST) {
        return None;
    }
    serde_json::from_value(e.details()?.get("masters")?.clone()).ok()
}

/// The volumes of `names` by master address, or None if a volume has no master named.
pub fn by_master(
    names: &[String],
    masters: &BTreeMap<String, String>,
) -> Option<BTreeMap<String, Vec<String>>> {
    let mut parts: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for n in names {
        parts
            .entry(masters.get(n)?.clone())
            .or_default()
            .push(n.clone());
    }
    Some(parts)
}

/// Sends `req`, refused by a node as `refusal` (a `421`), to each master in its part, with
/// `client`'s settings (token, TLS, deadline).
pub async fn split<Req: GroupChange, Resp: GroupAnswer>(
    client: &Client,
    path: &str,
    req: &Req,
    refusal: HttpError,
) -> Result<Resp, HttpError> {
    let names = req.names();
    let parts = match masters_of(&refusal).and_then(|m| by_master(&names, &m)) {
        // One master for every volume: the node that said otherwise is out of date; the
        // answer stands rather than going round.
        Some(parts) if parts.len() > 1 => parts,
        _ => return Err(refusal),
    };
    tracing::info!(path, masters = ?parts.keys().collect::<Vec<_>>(),
        "the volumes are mastered on different nodes: one request per master");
    let answers = join_all(parts.iter().map(|(master, volumes)| {
        let node = client.redirected(master);
        let part = req.only(volumes);
        async move { node.call::<Resp>(Method::POST, path, Some(&part)).await }
    }))
    .await;
    combine(answers, &names)
}

/// The whole answer from the parts' answers (see the module's documentation).
fn combine<Resp: GroupAnswer>(
    answers: Vec<Result<Resp, HttpError>>,
    names: &[String],
) -> Result<Resp, HttpError> {
    let parts = answers.len();
    let (made, failed): (Vec<_>, Vec<_>) = answers.into_iter().partition(Result::is_ok);
    let made: Vec<Resp> = made.into_iter().filter_map(Result::ok).collect();
    let mut failed: Vec<HttpError> = failed.into_iter().filter_map(Result::err).collect();
    if failed.is_empty() {
        return Ok(Resp::merge(made, names));
    }
    // The failure told is a refusal only if every failed part was refused.
    let refused = |e: &HttpError| e.status() == Some(StatusCode::CONFLICT);
    let unknown = failed.iter().position(|e| !refused(e)).unwrap_or(0);
    let failed = failed.swap_remove(unknown);
    if made.is_empty() {
        return Err(failed);
    }
    Err(HttpError::Partial {
        done: made.len(),
        parts,
        failed: Box::new(failed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{FlipReport, VolumeEpoch};

    fn status(code: u16) -> HttpError {
        HttpError::Status {
            target: "n".into(),
            status: StatusCode::from_u16(code).unwrap(),
            message: "m".into(),
            details: None,
        }
    }

    fn report(volume: &str) -> GroupFlipReport {
        GroupFlipReport {
            volumes: [(volume.to_string(), FlipReport::default())].into(),
        }
    }

    #[test]
    fn a_request_is_cut_by_master() {
        let req = GroupFlipRequest {
            from: "a".into(),
            to: "b".into(),
            volumes: ["v1", "v2", "v3"]
                .map(|v| VolumeEpoch {
                    volume: v.into(),
                    epoch: 7,
                })
                .into(),
            migration: Some("m".into()),
        };
        let masters: BTreeMap<String, String> = [("v1", "n1:1"), ("v2", "n2:1"), ("v3", "n1:1")]
            .map(|(v, m)| (v.to_string(), m.to_string()))
            .into();
        let parts = by_master(&req.names(), &masters).unwrap();
        assert_eq!(parts["n1:1"], ["v1", "v3"]);
        assert_eq!(parts["n2:1"], ["v2"]);
        let part = req.only(&parts["n1:1"]);
        assert_eq!(part.names(), ["v1", "v3"]);
        assert_eq!(
            (part.from.as_str(), part.migration.as_deref()),
            ("a", Some("m"))
        );
        assert!(by_master(&["v4".to_string()], &masters).is_none());

        let refusal = HttpError::Status {
            target: "n".into(),
            status: StatusCode::MISDIRECTED_REQUEST,
            message: "e".into(),
            details: Some(Box::new(
                serde_json::json!({"error": "e", "masters": masters}),
            )),
        };
        assert_eq!(masters_of(&refusal), Some(masters));
        assert_eq!(masters_of(&status(409)), None);
    }

    #[test]
    fn parts_combine_into_done_refused_or_partial() {
        let names = ["v1".to_string(), "v2".to_string()];
        let all = combine(vec![Ok(report("v2")), Ok(report("v1"))], &names).unwrap();
        assert_eq!(all.volumes.len(), 2);
        let refused = combine::<GroupFlipReport>(vec![Err(status(409)), Err(status(409))], &names);
        assert_eq!(refused.unwrap_err().status(), Some(StatusCode::CONFLICT));
        let unknown = combine::<GroupFlipReport>(vec![Err(status(409)), Err(status(503))], &names);
        assert_eq!(unknown.unwrap_err().status().map(|s| s.as_u16()), Some(503));
        let partial = combine(vec![Ok(report("v1")), Err(status(409))], &names).unwrap_err();
        assert!(
            matches!(
                partial,
                HttpError::Partial {
                    done: 1,
                    parts: 2,
                    ..
                }
            ),
            "{partial}"
        );
        assert_eq!(partial.status(), None);
        let HttpError::Partial { failed, .. } = combine(
            vec![Err(status(409)), Ok(report("v1")), Err(status(503))],
            &names,
        )
        .unwrap_err() else {
            panic!("not partial")
        };
        assert_eq!(
            failed.status().map(|s| s.as_u16()),
            Some(503),
            "the unknown outcome told"
        );
    }
}
