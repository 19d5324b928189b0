//! migrated's Prometheus metrics, served as `GET /metrics` on its REST API (the Prometheus text
//! format, version 0.0.4).
//!
//! The migrations' metrics are counted once per migration, when its record reaches a terminal
//! phase ([`Metrics::migration_ended`], called by the agent where it saves records). The VMMs'
//! figures are asked of each VMM's API (`GET /v1/vm/counters`) at scrape time, one call per
//! instance with a VMM, all at once and each with a short deadline, and exported with the
//! label `vm` (the instance's name; not `instance`, which Prometheus gives the scrape target).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `migrated_migrations_total` | counter | `role` (source, destination), `outcome` (completed, aborted, failed) |
//! | `migrated_migration_duration_seconds` | histogram | (completed, at the source) |
//! | `migrated_migration_downtime_seconds` | histogram | (completed, at the source) |
//! | `migrated_migration_flip_duration_seconds` | histogram | (completed, at the source) |
//! | `migrated_migration_sent_bytes_total` | counter | (at the source) |
//! | `migrated_migrations_active` | gauge | |
//! | `migrated_instances` | gauge | `state` |
//! | `migrated_vmm_up` | gauge | `vm` (1: its VMM answered) |
//! | `migrated_vmm_exits_total` | counter | `vm`, `reason` (io, mmio, other, interrupted) |
//! | `migrated_vmm_dirty_rate_bytes_per_second` | gauge | `vm` |
//! | `migrated_vmm_disk_requests_total` | counter | `vm`, `device`, `op` (read, write, flush, discard, other) |
//! | `migrated_vmm_disk_errors_total` | counter | `vm`, `device` |
//! | `migrated_vmm_disk_read_bytes_total` | counter | `vm`, `device` |
//! | `migrated_vmm_disk_written_bytes_total` | counter | `vm`, `device` |

use crate::migration::record::{MigrationRecord, Phase, Role};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use vmm_api::vm::VmCounters;

/// The `Content-Type` of `GET /metrics`.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    role: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct State {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Vm {
    vm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmReason {
    vm: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmDisk {
    vm: String,
    device: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmDiskOp {
    vm: String,
    device: String,
    op: &'static str,
}

/// The migrations' metrics, kept for the life of the process.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    migrations: Family<Outcome, Counter>,
    duration: Histogram,
    downtime: Histogram,
    flip: Histogram,
    sent_bytes: Counter,
    active: Gauge,
    instances: Family<State, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Every metric, registered and at zero.
    pub fn new() -> Metrics {
        let migrations = Family::<Outcome, Counter>::default();
        for role in ["source", "destination"] {
            for outcome in ["completed", "aborted", "failed"] {
                drop(migrations.get_or_create(&Outcome { role, outcome }));
            }
        }
        let m = Metrics {
            registry: Registry::default(),
            migrations,
            // 100 ms to about 400 s.
            duration: Histogram::new(exponential_buckets(0.1, 2.0, 13)),
            // 1 ms to about 4 s.
            downtime: Histogram::new(exponential_buckets(0.001, 2.0, 13)),
            flip: Histogram::new(exponential_buckets(0.001, 2.0, 13)),
            sent_bytes: Counter::default(),
            active: Gauge::default(),
            instances: Family::default(),
        };
        let mut r = Registry::default();
        r.register(
            "migrated_migrations",
            "Migrations that ended on this host, by this host's role and their outcome",
            m.migrations.clone(),
        );
        r.register(
            "migrated_migration_duration_seconds",
            "Time from the request to the guest running only on the destination (completed migrations, at the source)",
            m.duration.clone(),
        );
        r.register(
            "migrated_migration_downtime_seconds",
            "The guest's pause during a migration (completed migrations, at the source)",
            m.downtime.clone(),
        );
        r.register(
            "migrated_migration_flip_duration_seconds",
            "Time spent flipping the guest's leases at storaged (completed migrations, at the source)",
            m.flip.clone(),
        );
        r.register(
            "migrated_migration_sent_bytes",
            "Bytes the source VMMs sent on migration streams",
            m.sent_bytes.clone(),
        );
        r.register(
            "migrated_migrations_active",
            "Migrations in progress on this host",
            m.active.clone(),
        );
        r.register(
            "migrated_instances",
            "Instances this host knows, by state",
            m.instances.clone(),
        );
        Metrics { registry: r, ..m }
    }

    /// Counts a migration that reached a terminal phase (called once per migration).
    pub fn migration_ended(&self, rec: &MigrationRecord) {
        let outcome = match rec.phase {
            Phase::Completed => "completed",
            Phase::Aborted => "aborted",
            Phase::Failed => "failed",
            _ => return,
        };
        let role = match rec.role {
            Role::Source => "source",
            Role::Destination => "destination",
        };
        self.migrations
            .get_or_create(&Outcome { role, outcome })
            .inc();
        if rec.role != Role::Source {
            return;
        }
        let f = &rec.figures;
        self.sent_bytes.inc_by(f.bytes_sent);
        if rec.phase == Phase::Completed {
            let downtime = match f.vmm_downtime_us {
                0 => f.downtime_ms as f64 / 1e3,
                us => us as f64 / 1e6,
            };
            self.duration.observe(f.total_ms as f64 / 1e3);
            self.downtime.observe(downtime);
            self.flip.observe(f.flip_ms as f64 / 1e3);
        }
    }

    /// The exposition: the migrations' metrics with `active` migrations in progress and the
    /// instances' `states`, then the figures of each VMM in `vmms` (`None`: it did not answer).
    pub fn encode(
        &self,
        active: usize,
        states: &[&'static str],
        vmms: &[(String, Option<VmCounters>)],
    ) -> String {
        self.active.set(active as i64);
        self.instances.clear();
        for state in states {
            self.instances.get_or_create(&State { state }).inc();
        }
        let mut out = String::new();
        let enc = prometheus_client::encoding::prometheus_text::encode;
        enc(&mut out, &self.registry).expect("writing to a String cannot fail");
        enc(&mut out, &vmm_registry(vmms)).expect("writing to a String cannot fail");
        out
    }
}

/// A registry of the VMMs' figures as read just now.
fn vmm_registry(vmms: &[(String, Option<VmCounters>)]) -> Registry {
    let up = Family::<Vm, Gauge>::default();
    let exits = Family::<VmReason, Counter>::default();
    let dirty = Family::<Vm, Gauge>::default();
    let requests = Family::<VmDiskOp, Counter>::default();
    let errors = Family::<VmDisk, Counter>::default();
    let read = Family::<VmDisk, Counter>::default();
    let written = Family::<VmDisk, Counter>::default();
    for (name, counters) in vmms {
        let vm = Vm { vm: name.clone() };
        up.get_or_create(&vm).set(i64::from(counters.is_some()));
        let Some(c) = counters else { continue };
        let e = &c.exits;
        for (reason, n) in [
            ("io", e.io),
            ("mmio", e.mmio),
            ("other", e.other),
            ("interrupted", e.interrupted),
        ] {
            let l = VmReason {
                vm: name.clone(),
                reason,
            };
            exits.get_or_create(&l).inc_by(n);
        }
        dirty
            .get_or_create(&vm)
            .set(i64::try_from(c.dirty_rate_bytes_per_sec).unwrap_or(i64::MAX));
        for d in &c.disks {
            let disk = VmDisk {
                vm: name.clone(),
                device: d.device.clone(),
            };
            for (op, n) in [
                ("read", d.read_requests),
                ("write", d.write_requests),
                ("flush", d.flush_requests),
                ("discard", d.discard_requests),
                ("other", d.other_requests),
            ] {
                let l = VmDiskOp {
                    vm: name.clone(),
                    device: d.device.clone(),
                    op,
                };
                requests.get_or_create(&l).inc_by(n);
            }
            errors.get_or_create(&disk).inc_by(d.errors);
            read.get_or_create(&disk).inc_by(d.read_bytes);
            written.get_or_create(&disk).inc_by(d.written_bytes);
        }
    }
    let mut r = Registry::default();
    r.register(
        "migrated_vmm_up",
        "Whether the instance's VMM answered its counters (1) or not (0)",
        up,
    );
    r.register(
        "migrated_vmm_exits",
        "vCPU exits to the VMM, by reason",
        exits,
    );
    r.register(
        "migrated_vmm_dirty_rate_bytes_per_second",
        "Memory the guest dirties per second while it migrates (0 otherwise)",
        dirty,
    );
    r.register(
        "migrated_vmm_disk_requests",
        "Block requests the VMM served, by disk and kind (disks served by a vhost-user backend count none)",
        requests,
    );
    r.register(
        "migrated_vmm_disk_errors",
        "Block requests completed with an error status",
        errors,
    );
    r.register(
        "migrated_vmm_disk_read_bytes",
        "Bytes the guest read from each disk",
        read,
    );
    r.register(
        "migrated_vmm_disk_written_bytes",
        "Bytes the guest wrote to each disk",
        written,
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::record::MigrationParams;

    #[test]
    fn an_ended_migration_and_a_vmm_show_in_the_exposition() {
        let m = Metrics::new();
        let mut rec = MigrationRecord::new(
            "vm1.a.1".into(),
            "vm1".into(),
            Role::Source,
            MigrationParams::default(),
            Vec::new(),
        );
        rec.phase = Phase::Completed;
        rec.figures.total_ms = 1500;
        rec.figures.vmm_downtime_us = 20_000;
        rec.figures.flip_ms = 3;
        rec.figures.bytes_sent = 1 << 20;
        m.migration_ended(&rec);
        let mut counters = VmCounters::default();
        counters.exits.mmio = 7;
        let text = m.encode(
            0,
            &["running", "running"],
            &[("vm1".into(), Some(counters)), ("vm2".into(), None)],
        );
        let lines: Vec<&str> = text.lines().collect();
        for want in [
            r#"migrated_migrations_total{role="source",outcome="completed"} 1"#,
            r#"migrated_migrations_total{role="destination",outcome="failed"} 0"#,
            "migrated_migration_sent_bytes_total 1048576",
            "migrated_migration_downtime_seconds_sum 0.02",
            "migrated_migration_duration_seconds_count 1",
            r#"migrated_instances{state="running"} 2"#,
            r#"migrated_vmm_exits_total{vm="vm1",reason="mmio"} 7"#,
            r#"migrated_vmm_up{vm="vm2"} 0"#,
        ] {
            assert!(lines.contains(&want), "{want} missing from:\n{text}");
        }
    }
}
