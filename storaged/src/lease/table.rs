//! The lease table of one volume and its transitions (the state diagram is in [`super`]), as
//! pure data: this module decides; [`super::flip`] and the server apply, persist and log.

use serde::{Deserialize, Serialize};
use storaged_client::api::{Holder, LeaseState};
use storaged_client::protocol::RequestedState;
use thiserror::Error;

/// A refused lease transition.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LeaseError {
    /// The host was deactivated on this volume.
    #[error("host {host} is deactivated on this volume")]
    Deactivated {
        /// The refused host.
        host: String,
    },
    /// Standby was asked for by the host that already holds the primary lease.
    #[error("host {host} already holds the primary lease")]
    AlreadyPrimary {
        /// The host.
        host: String,
    },
    /// Primary was asked for while another holder is primary.
    #[error("primary lease is held by {holder}")]
    Conflict {
        /// The current primary.
        holder: Holder,
    },
    /// The client's expected epoch is not the current one.
    #[error("expected epoch {expected}, current epoch is {current}")]
    Epoch {
        /// What the client expected.
        expected: u64,
        /// The volume's epoch.
        current: u64,
    },
    /// A flip named a host that is not standby.
    #[error("host {0} holds no standby lease")]
    NotStandby(String),
    /// A standby asked for its own promotion but its host's standby lease is another
    /// instance's now (a replaced instance's stale connection).
    #[error("{0} no longer holds the standby lease of its host")]
    StaleStandby(Holder),
    /// A standby asked for its own promotion on a volume that only lets the control plane
    /// flip (and no flip was armed for it).
    #[error("{0} may not promote itself on this volume (no armed flip; flip_over_nbd is off)")]
    SelfFlipRefused(Holder),
    /// A flip named no host and there is not exactly one standby.
    #[error("{0} standby holders: name the one to promote")]
    NoSingleStandby(usize),
    /// Rollback without a previous table.
    #[error("nothing to roll back")]
    NothingToRollBack,
    /// Revoke of a host that has no lease.
    #[error("host {0} has no lease on this volume")]
    NoLease(String),
    /// A host named as the primary does not hold the primary lease.
    #[error("host {host} does not hold the primary lease (it holds {})",
        .actual.map_or("none".to_string(), |s| format!("a {s:?} lease")))]
    NotPrimary {
        /// The host.
        host: String,
        /// What it holds.
        actual: Option<LeaseState>,
    },
    /// A cancel of an armed flip named another migration than the one that armed it.
    #[error("the armed flip belongs to migration {armed:?}, not {asked}")]
    ArmedForOther {
        /// The migration named.
        asked: String,
        /// The one that armed the flip.
        armed: Option<String>,
    },
    /// A conditional revoke found the host in another state than the one it names.
    #[error("host {host} holds a {actual:?} lease, not {expected:?}: nothing revoked")]
    NotInState {
        /// The host.
        host: String,
        /// The state the revoke was limited to.
        expected: LeaseState,
        /// The host's state.
        actual: LeaseState,
    },
}

/// A lease asked for by a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRequest {
    /// Who asks.
    pub holder: Holder,
    /// What it asks for.
    pub state: RequestedState,
    /// Epoch the client believes current (0 = any).
    pub expected_epoch: u64,
}

/// The persisted lease table of one volume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseTable {
    /// Grows with every change of the primary.
    pub epoch: u64,
    /// The primary holder, if any.
    pub primary: Option<Holder>,
    /// Standby holders.
    pub standby: Vec<Holder>,
    /// Former primaries that may not connect again.
    pub deactivated: Vec<Holder>,
    /// The table before the last flip, for rollback (its own `previous` is always empty).
    #[serde(default)]
    pub previous: Option<Box<LeaseTable>>,
}

/// What a flip changes, for the runtime to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlipPlan {
    /// The primary being deactivated, if any.
    pub old_primary: Option<Holder>,
    /// The standby being promoted.
    pub new_primary: Holder,
    /// The table after the flip.
    pub table: LeaseTable,
}

impl LeaseTable {
    /// The state of `host` on this volume.
    pub fn state_of(&self, host: &str) -> Option<(LeaseState, &Holder)> {
        if let Some(p) = self.primary.as_ref().filter(|p| p.host == host) {
            return Some((LeaseState::Primary, p));
        }
        if let Some(s) = self.standby.iter().find(|s| s.host == host) {
            return Some((LeaseState::Standby, s));
        }
        self.deactivated
            .iter()
            .find(|d| d.host == host)
            .map(|d| (LeaseState::Deactivated, d))
    }

    /// Decides a connection's lease request; returns the table after granting it.
    pub fn grant(&self, req: &LeaseRequest) -> Result<LeaseTable, LeaseError> {
        let host = &req.holder.host;
        if self.deactivated.iter().any(|d| &d.host == host) {
            return Err(LeaseError::Deactivated { host: host.clone() });
        }
        if req.expected_epoch != 0 && req.expected_epoch != self.epoch {
            return Err(LeaseError::Epoch {
                expected: req.expected_epoch,
                current: self.epoch,
            });
        }
        let mut next = self.clone();
        match req.state {
            RequestedState::Primary => match &self.primary {
                Some(p) if *p == req.holder => {}
                Some(p) => return Err(LeaseError::Conflict { holder: p.clone() }),
                None => {
                    next.standby.retain(|s| &s.host != host);
                    next.primary = Some(req.holder.clone());
                    next.epoch += 1;
                }
            },
            RequestedState::Standby => {
                if self.primary.as_ref().is_some_and(|p| &p.host == host) {
                    return Err(LeaseError::AlreadyPrimary { host: host.clone() });
                }
                // One standby entry per host: a restarted instance replaces the old one.
                next.standby.retain(|s| &s.host != host);
                next.standby.push(req.holder.clone());
            }
        }
        Ok(next)
    }

    /// Plans promoting the standby on `to` (or the only standby) to primary.
    pub fn flip(&self, to: Option<&str>) -> Result<FlipPlan, LeaseError> {
        let target = match to {
            Some(host) => self
                .standby
                .iter()
                .find(|s| s.host == host)
                .ok_or_else(|| LeaseError::NotStandby(host.to_string()))?,
            None if self.standby.len() == 1 => &self.standby[0],
            None => return Err(LeaseError::NoSingleStandby(self.standby.len())),
        };
        let mut before = self.clone();
        before.previous = None;
        let mut table = before.clone();
        table.standby.retain(|s| s != target);
        if let Some(old) = table.primary.take() {
            table.deactivated.retain(|d| d.host != old.host);
            table.deactivated.push(old);
        }
        table.primary = Some(target.clone());
        table.epoch = self.epoch + 1;
        table.previous = Some(Box::new(before));
        Ok(FlipPlan {
            old_primary: self.primary.clone(),
            new_primary: target.clone(),
            table,
        })
    }

    /// Plans promoting exactly `holder` (host and instance) from standby to primary: a
    /// connection asks for its own promotion, never for another instance's of its host.
    pub fn flip_holder(&self, holder: &Holder) -> Result<FlipPlan, LeaseError> {
        if !self.standby.contains(holder) {
            return Err(match self.state_of(&holder.host) {
                Some((LeaseState::Standby, _)) => LeaseError::StaleStandby(holder.clone()),
                _ => LeaseError::NotStandby(holder.host.clone()),
            });
        }
        self.flip(Some(&holder.host))
    }

    /// Refused unless `host` holds the primary lease at `epoch`.
    pub fn check_primary(&self, host: &str, epoch: u64) -> Result<(), LeaseError> {
        if self.primary.as_ref().is_none_or(|p| p.host != host) {
            return Err(LeaseError::NotPrimary {
                host: host.to_string(),
                actual: self.state_of(host).map(|(s, _)| s),
            });
        }
        if self.epoch != epoch {
            return Err(LeaseError::Epoch {
                expected: epoch,
                current: self.epoch,
            });
        }
        Ok(())
    }

    /// Plans a migration's flip: `to`'s standby lease becomes primary, refused unless `from`
    /// holds the primary lease at `epoch` (so a flip decided against a table that has since
    /// moved on, by a rollback, a revoke or another flip, changes nothing).
    pub fn flip_from(&self, from: &str, epoch: u64, to: &str) -> Result<FlipPlan, LeaseError> {
        self.check_primary(from, epoch)?;
        self.flip(Some(to))
    }

    /// The table restored by undoing the flip that made `host` primary at `epoch`: the one
    /// before that flip, with a new epoch. Refused when the volume moved on since (another
    /// epoch or another primary), so a late rollback never undoes a later change.
    pub fn rollback(&self, epoch: u64, host: &str) -> Result<LeaseTable, LeaseError> {
        let prev = self
            .previous
            .as_deref()
            .ok_or(LeaseError::NothingToRollBack)?;
        self.check_primary(host, epoch)?;
        let mut table = prev.clone();
        table.epoch = self.epoch + 1;
        table.previous = None;
        Ok(table)
    }

    /// The table after ending `host`'s standby lease, the step of a group revoke that makes
    /// sure `host` can no longer become primary: refused if `host` is primary, or if
    /// `primary` is named and does not hold the primary lease. A deactivated lease stays, and
    /// a volume where `host` holds nothing is no error. The epoch moves in every case, so that
    /// a flip conditional on the epoch before (see [`LeaseTable::flip_from`]) fails even if
    /// `host` connects as standby again.
    pub fn revoke_standby(
        &self,
        host: &str,
        primary: Option<&str>,
    ) -> Result<LeaseTable, LeaseError> {
        if let Some((LeaseState::Primary, _)) = self.state_of(host) {
            return Err(LeaseError::NotInState {
                host: host.to_string(),
                expected: LeaseState::Standby,
                actual: LeaseState::Primary,
            });
        }
        if let Some(p) = primary {
            self.check_primary(p, self.epoch)?;
        }
        let mut table = self.clone();
        table.standby.retain(|s| s.host != host);
        table.epoch += 1;
        table.previous = None;
        Ok(table)
    }

    /// The table after removing every lease of `host` (termination by the control plane);
    /// with `only_if`, refused unless the host is in that state (so a control plane can end a
    /// standby lease without racing a flip that just made it primary).
    pub fn revoke(
        &self,
        host: &str,
        only_if: Option<LeaseState>,
    ) -> Result<LeaseTable, LeaseError> {
        let Some((actual, _)) = self.state_of(host) else {
            return Err(LeaseError::NoLease(host.to_string()));
        };
        if let Some(expected) = only_if.filter(|&e| e != actual) {
            return Err(LeaseError::NotInState {
                host: host.to_string(),
                expected,
                actual,
            });
        }
        let mut table = self.clone();
        if table.primary.as_ref().is_some_and(|p| p.host == host) {
            table.primary = None;
            table.epoch += 1;
        }
        table.standby.retain(|s| s.host != host);
        table.deactivated.retain(|d| d.host != host);
        table.previous = None;
        Ok(table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(host: &str) -> Holder {
        Holder {
            host: host.into(),
            instance: format!("{host}-vm"),
        }
    }
    fn req(host: &str, state: RequestedState) -> LeaseRequest {
        LeaseRequest {
            holder: h(host),
            state,
            expected_epoch: 0,
        }
    }
    /// The table after granting `state` to `host` on an empty one.
    fn granted(host: &str, state: RequestedState) -> LeaseTable {
        LeaseTable::default().grant(&req(host, state)).unwrap()
    }
    fn with_primary_a_standby_b() -> LeaseTable {
        let t = granted("a", RequestedState::Primary);
        t.grant(&req("b", RequestedState::Standby)).unwrap()
    }

    #[test]
    fn first_primary_is_granted_and_bumps_epoch() {
        let t = granted("a", RequestedState::Primary);
        assert_eq!(t.primary, Some(h("a")));
        assert_eq!(t.epoch, 1);
        assert_eq!(t.state_of("a").unwrap().0, LeaseState::Primary);
    }

    #[test]
    fn primary_reconnect_is_idempotent() {
        let t = with_primary_a_standby_b();
        assert_eq!(t.grant(&req("a", RequestedState::Primary)).unwrap(), t);
    }

    #[test]
    fn second_primary_conflicts() {
        let t = with_primary_a_standby_b();
        assert!(matches!(
            t.grant(&req("c", RequestedState::Primary)),
            Err(LeaseError::Conflict { .. })
        ));
        // Same host, other instance: still a conflict (one primary holder).
        let other = LeaseRequest {
            holder: Holder {
                host: "a".into(),
                instance: "other".into(),
            },
            state: RequestedState::Primary,
            expected_epoch: 0,
        };
        assert!(matches!(t.grant(&other), Err(LeaseError::Conflict { .. })));
    }

    #[test]
    fn standby_from_primary_host_is_already_primary() {
        let t = with_primary_a_standby_b();
        assert_eq!(
            t.grant(&req("a", RequestedState::Standby)),
            Err(LeaseError::AlreadyPrimary { host: "a".into() })
        );
    }

    #[test]
    fn standby_without_primary_and_replacement() {
        let t = granted("b", RequestedState::Standby);
        assert_eq!(t.standby, vec![h("b")]);
        assert_eq!(t.epoch, 0);
        let again = LeaseRequest {
            holder: Holder {
                host: "b".into(),
                instance: "new".into(),
            },
            state: RequestedState::Standby,
            expected_epoch: 0,
        };
        let t2 = t.grant(&again).unwrap();
        assert_eq!(t2.standby, vec![again.holder]);
    }

    #[test]
    fn standby_asking_primary_without_primary_is_promoted() {
        let t = granted("b", RequestedState::Standby)
            .grant(&req("b", RequestedState::Primary))
            .unwrap();
        assert_eq!(t.primary, Some(h("b")));
        assert!(t.standby.is_empty());
    }

    #[test]
    fn epoch_mismatch_is_refused() {
        let t = with_primary_a_standby_b();
        let mut r = req("c", RequestedState::Standby);
        r.expected_epoch = 9;
        assert_eq!(
            t.grant(&r),
            Err(LeaseError::Epoch {
                expected: 9,
                current: 1
            })
        );
        r.expected_epoch = 1;
        assert!(t.grant(&r).is_ok());
    }

    #[test]
    fn flip_promotes_deactivates_and_bumps_epoch() {
        let t = with_primary_a_standby_b();
        let plan = t.flip(None).unwrap();
        assert_eq!(plan.old_primary, Some(h("a")));
        assert_eq!(plan.new_primary, h("b"));
        let n = &plan.table;
        assert_eq!(n.primary, Some(h("b")));
        assert!(n.standby.is_empty());
        assert_eq!(n.deactivated, vec![h("a")]);
        assert_eq!(n.epoch, t.epoch + 1);
        assert_eq!(n.state_of("a").unwrap().0, LeaseState::Deactivated);
        // The deactivated host is refused in every state.
        for s in [RequestedState::Primary, RequestedState::Standby] {
            assert_eq!(
                n.grant(&req("a", s)),
                Err(LeaseError::Deactivated { host: "a".into() })
            );
        }
    }

    #[test]
    fn flip_without_primary_only_promotes() {
        let t = granted("b", RequestedState::Standby);
        let plan = t.flip(Some("b")).unwrap();
        assert_eq!(plan.old_primary, None);
        assert!(plan.table.deactivated.is_empty());
        assert_eq!(plan.table.epoch, 1);
    }

    #[test]
    fn illegal_flips() {
        let t = granted("a", RequestedState::Primary);
        assert_eq!(t.flip(None), Err(LeaseError::NoSingleStandby(0)));
        assert_eq!(t.flip(Some("a")), Err(LeaseError::NotStandby("a".into())));
        let two = t
            .grant(&req("b", RequestedState::Standby))
            .unwrap()
            .grant(&req("c", RequestedState::Standby))
            .unwrap();
        assert_eq!(two.flip(None), Err(LeaseError::NoSingleStandby(2)));
        let plan = two.flip(Some("c")).unwrap();
        assert_eq!(plan.table.standby, vec![h("b")]);
    }

    #[test]
    fn rollback_restores_previous_table() {
        let t = with_primary_a_standby_b();
        let flipped = t.flip(None).unwrap().table;
        let back = flipped.rollback(2, "b").unwrap();
        assert_eq!(back.primary, Some(h("a")));
        assert_eq!(back.standby, vec![h("b")]);
        assert!(back.deactivated.is_empty());
        assert_eq!(back.epoch, flipped.epoch + 1);
        assert_eq!(back.rollback(3, "a"), Err(LeaseError::NothingToRollBack));
        assert_eq!(t.rollback(1, "a"), Err(LeaseError::NothingToRollBack));
    }

    #[test]
    fn rollback_names_the_flip_it_undoes() {
        let t = with_primary_a_standby_b()
            .grant(&req("c", RequestedState::Standby))
            .unwrap();
        let flipped = t.flip(Some("b")).unwrap().table;
        assert_eq!(
            flipped.rollback(1, "b"),
            Err(LeaseError::Epoch {
                expected: 1,
                current: 2
            })
        );
        assert!(matches!(
            flipped.rollback(2, "c"),
            Err(LeaseError::NotPrimary { .. })
        ));
        // The volume moved on to c: the rollback of the flip to b is refused.
        let moved = flipped.flip(Some("c")).unwrap().table;
        assert!(moved.rollback(2, "b").is_err());
        assert_eq!(moved.rollback(3, "c").unwrap().primary, Some(h("b")));
    }

    #[test]
    fn a_flip_from_names_the_primary_and_its_epoch() {
        let t = with_primary_a_standby_b();
        assert!(matches!(
            t.flip_from("b", 1, "b"),
            Err(LeaseError::NotPrimary { .. })
        ));
        assert!(matches!(
            t.flip_from("a", 2, "b"),
            Err(LeaseError::Epoch { .. })
        ));
        assert_eq!(t.flip_from("a", 1, "b").unwrap().new_primary, h("b"));
    }

    #[test]
    fn a_standby_revoke_moves_the_epoch_and_spares_the_primary() {
        let t = with_primary_a_standby_b();
        let r = t.revoke_standby("b", Some("a")).unwrap();
        assert!(r.state_of("b").is_none());
        assert_eq!(r.epoch, t.epoch + 1);
        // Nothing to end is no error; the epoch still moves.
        assert_eq!(r.revoke_standby("b", Some("a")).unwrap().epoch, r.epoch + 1);
        assert!(t.revoke_standby("a", None).is_err());
        assert!(matches!(
            t.revoke_standby("b", Some("b")),
            Err(LeaseError::NotPrimary { .. })
        ));
        // A flip planned against the epoch before fails, even with b standby again.
        let again = r.grant(&req("b", RequestedState::Standby)).unwrap();
        assert!(again.flip_from("a", t.epoch, "b").is_err());
    }

    #[test]
    fn revoke_terminates_every_state() {
        let t = with_primary_a_standby_b().flip(None).unwrap().table;
        let r = t.revoke("a", None).unwrap();
        assert!(r.state_of("a").is_none());
        assert!(r.grant(&req("a", RequestedState::Standby)).is_ok());
        let r = t.revoke("b", None).unwrap();
        assert_eq!(r.primary, None);
        assert_eq!(r.epoch, t.epoch + 1);
        assert_eq!(r.previous, None);
        assert_eq!(r.revoke("zz", None), Err(LeaseError::NoLease("zz".into())));
        let s = with_primary_a_standby_b().revoke("b", None).unwrap();
        assert!(s.standby.is_empty());
        assert_eq!(s.epoch, 1);
    }

    #[test]
    fn conditional_revoke_takes_only_the_named_state() {
        let t = with_primary_a_standby_b();
        let s = t.revoke("b", Some(LeaseState::Standby)).unwrap();
        assert!(s.standby.is_empty());
        // After a flip b is primary: a revoke limited to standby leaves it alone.
        let flipped = t.flip(None).unwrap().table;
        assert_eq!(
            flipped.revoke("b", Some(LeaseState::Standby)),
            Err(LeaseError::NotInState {
                host: "b".into(),
                expected: LeaseState::Standby,
                actual: LeaseState::Primary,
            })
        );
        assert!(flipped.revoke("a", Some(LeaseState::Deactivated)).is_ok());
    }

    #[test]
    fn table_survives_serde() {
        let t = with_primary_a_standby_b().flip(None).unwrap().table;
        let j = serde_json::to_vec(&t).unwrap();
        assert_eq!(serde_json::from_slice::<LeaseTable>(&j).unwrap(), t);
    }
}

/// Random sequences of lease changes, with restarts (the table serialised and loaded again)
/// between them, keep the lease table's invariants.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    const HOSTS: [&str; 3] = ["a", "b", "c"];

    /// One change; `stale` names an epoch or a host the table has moved on from.
    #[derive(Debug, Clone)]
    enum Op {
        Grant {
            host: usize,
            primary: bool,
        },
        Flip {
            to: usize,
        },
        FlipFrom {
            from: usize,
            to: usize,
            stale: bool,
        },
        Rollback {
            host: usize,
            stale: bool,
        },
        Revoke {
            host: usize,
            only_if: Option<LeaseState>,
        },
        RevokeStandby {
            host: usize,
            primary: Option<usize>,
        },
        Restart,
    }

    fn op() -> impl Strategy<Value = Op> {
        let host = || 0..HOSTS.len();
        let state = prop_oneof![
            Just(LeaseState::Primary),
            Just(LeaseState::Standby),
            Just(LeaseState::Deactivated)
        ];
        prop_oneof![
            (host(), any::<bool>()).prop_map(|(host, primary)| Op::Grant { host, primary }),
            host().prop_map(|to| Op::Flip { to }),
            (host(), host(), any::<bool>()).prop_map(|(from, to, stale)| Op::FlipFrom {
                from,
                to,
                stale
            }),
            (host(), any::<bool>()).prop_map(|(host, stale)| Op::Rollback { host, stale }),
            (host(), prop::option::of(state))
                .prop_map(|(host, only_if)| Op::Revoke { host, only_if }),
            (host(), prop::option::of(host()))
                .prop_map(|(host, primary)| Op::RevokeStandby { host, primary }),
            Just(Op::Restart),
        ]
    }

    /// The table after `op`, or the refusal; a `stale` operation must be refused.
    fn apply(t: &LeaseTable, op: &Op) -> Result<LeaseTable, LeaseError> {
        let stale_epoch = |stale: bool| if stale { t.epoch + 1 } else { t.epoch };
        match *op {
            Op::Grant { host, primary } => t.grant(&LeaseRequest {
                holder: Holder {
                    host: HOSTS[host].into(),
                    instance: "vm".into(),
                },
                state: if primary {
                    RequestedState::Primary
                } else {
                    RequestedState::Standby
                },
                expected_epoch: 0,
            }),
            Op::Flip { to } => t.flip(Some(HOSTS[to])).map(|p| p.table),
            Op::FlipFrom { from, to, stale } => t
                .flip_from(HOSTS[from], stale_epoch(stale), HOSTS[to])
                .map(|p| p.table),
            Op::Rollback { host, stale } => t.rollback(stale_epoch(stale), HOSTS[host]),
            Op::Revoke { host, only_if } => t.revoke(HOSTS[host], only_if),
            Op::RevokeStandby { host, primary } => {
                t.revoke_standby(HOSTS[host], primary.map(|p| HOSTS[p]))
            }
            Op::Restart => {
                let json = serde_json::to_vec(t).expect("serialises");
                Ok(serde_json::from_slice(&json).expect("loads"))
            }
        }
    }

    /// Each host holds at most one lease in a table and in the one kept for rollback.
    fn one_lease_per_host(t: &LeaseTable) -> Result<(), TestCaseError> {
        for h in HOSTS {
            let n = t.primary.iter().filter(|p| p.host == h).count()
                + t.standby.iter().filter(|s| s.host == h).count()
                + t.deactivated.iter().filter(|d| d.host == h).count();
            prop_assert!(n <= 1, "{h} holds {n} leases: {t:?}");
        }
        if let Some(prev) = &t.previous {
            prop_assert!(prev.previous.is_none(), "nested rollback tables: {t:?}");
            one_lease_per_host(prev)?;
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn lease_changes_keep_the_invariants(ops in prop::collection::vec(op(), 1..48)) {
            let mut t = LeaseTable::default();
            for op in &ops {
                let next = match apply(&t, op) {
                    Ok(next) => {
                        let stale = matches!(op, Op::FlipFrom { stale: true, .. }
                            | Op::Rollback { stale: true, .. });
                        prop_assert!(!stale, "{op:?} accepted on {t:?}");
                        next
                    }
                    Err(_) => t.clone(),
                };
                prop_assert!(next.epoch >= t.epoch, "{op:?}: the epoch went back");
                if next.primary != t.primary {
                    prop_assert!(next.epoch > t.epoch, "{op:?}: a new primary at the same epoch");
                }
                if matches!(op, Op::Restart) {
                    prop_assert_eq!(&next, &t);
                }
                one_lease_per_host(&next)?;
                for h in HOSTS {
                    let before = t.state_of(h).map(|(s, _)| s);
                    let after = next.state_of(h).map(|(s, _)| s);
                    if before == Some(LeaseState::Deactivated) && after.is_some()
                        && after != before
                    {
                        // Only the rollback of the flip that deactivated it brings a host back.
                        prop_assert!(matches!(op, Op::Rollback { .. }), "{h} back by {op:?}");
                        let flipped_from = t.previous.as_ref().and_then(|p| p.primary.as_ref());
                        prop_assert_eq!(flipped_from.map(|p| p.host.as_str()), Some(h));
                        prop_assert_eq!(after, Some(LeaseState::Primary));
                    }
                }
                t = next;
            }
        }
    }
}
