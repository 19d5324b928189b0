//! storaged's Prometheus metrics, served as `GET /metrics` on the REST API (the Prometheus text
//! format, version 0.0.4).
//!
//! Counters and histograms are bumped where the work happens, through handles taken once per
//! connection ([`ConnMetrics`]): a request costs a few atomic increments and one histogram
//! observation, and allocates nothing. What is a state rather than an event (connections per
//! volume, lease holders per state, epochs, sizes) is read from the volumes at scrape time.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `storaged_volume_requests_total` | counter | `volume`, `op` |
//! | `storaged_volume_request_errors_total` | counter | `volume`, `op` |
//! | `storaged_volume_request_duration_seconds` | histogram | `volume`, `op` |
//! | `storaged_volume_read_bytes_total` | counter | `volume` |
//! | `storaged_volume_written_bytes_total` | counter | `volume` |
//! | `storaged_volume_connections` | gauge | `volume` |
//! | `storaged_volume_leases` | gauge | `volume`, `state` |
//! | `storaged_volume_epoch` | gauge | `volume` |
//! | `storaged_volume_size_bytes` | gauge | `volume` |
//! | `storaged_connections` | gauge | |
//! | `storaged_connections_refused_total` | counter | `reason` |
//! | `storaged_requests_refused_total` | counter | `reason` |
//! | `storaged_flips_total` | counter | `trigger` |
//! | `storaged_flip_step_duration_seconds` | histogram | `step` |
//! | `storaged_lease_rollbacks_total` | counter | |
//! | `storaged_lease_revokes_total` | counter | |
//!
//! `op` is one of [`Op::ALL`]'s names; `state` is `primary`, `standby` or `deactivated`;
//! `step` is one of the flip's steps (`deactivate`, `drain`, `disconnect`, `persist`,
//! `promote`) or `total`.

use crate::lease::gate::Refusal;
use crate::volume::Volume;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry as Prom;
use std::sync::Arc;
use std::time::{Duration, Instant};
use storaged_client::protocol::{
    FlipReport, NBD_CMD_CACHE, NBD_CMD_FLUSH, NBD_CMD_LEASE_FLIP, NBD_CMD_READ, NBD_CMD_TRIM,
    NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES,
};

/// The `Content-Type` of `GET /metrics`.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// An NBD command as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE`.
    Write,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// `NBD_CMD_CACHE`.
    Cache,
    /// `NBD_CMD_BLOCK_STATUS`.
    BlockStatus,
    /// The project's `NBD_CMD_LEASE_FLIP`.
    LeaseFlip,
    /// Anything else (answered `EINVAL`).
    Other,
}

impl Op {
    /// Every op, in the order of declaration (an op's index is `op as usize`).
    pub const ALL: [Op; 9] = [
        Op::Read,
        Op::Write,
        Op::Flush,
        Op::Trim,
        Op::WriteZeroes,
        Op::Cache,
        Op::BlockStatus,
        Op::LeaseFlip,
        Op::Other,
    ];

    /// The op of an NBD command type.
    pub fn of(kind: u16) -> Op {
        match kind {
            NBD_CMD_READ => Op::Read,
            NBD_CMD_WRITE => Op::Write,
            NBD_CMD_FLUSH => Op::Flush,
            NBD_CMD_TRIM => Op::Trim,
            NBD_CMD_WRITE_ZEROES => Op::WriteZeroes,
            NBD_CMD_CACHE => Op::Cache,
            storaged_client::meta::NBD_CMD_BLOCK_STATUS => Op::BlockStatus,
            NBD_CMD_LEASE_FLIP => Op::LeaseFlip,
            _ => Op::Other,
        }
    }

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::WriteZeroes => "write_zeroes",
            Op::Cache => "cache",
            Op::BlockStatus => "block_status",
            Op::LeaseFlip => "lease_flip",
            Op::Other => "other",
        }
    }
}

/// Why a connection was turned away (`storaged_connections_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnRefusal {
    /// `max_connections` reached: closed at accept.
    ConnectionLimit,
    /// `max_connections_per_volume` reached: refused at `NBD_OPT_GO`.
    VolumeConnectionLimit,
    /// The lease asked for was refused (conflict, deactivated, epoch, host list, standby limit).
    Lease,
    /// The volume's anonymous policy refused a connection without a lease.
    Anonymous,
    /// The export does not exist.
    UnknownExport,
    /// The handshake failed or timed out (protocol, TLS, certificate).
    Handshake,
}

impl ConnRefusal {
    fn name(self) -> &'static str {
        match self {
            ConnRefusal::ConnectionLimit => "connection_limit",
            ConnRefusal::VolumeConnectionLimit => "volume_connection_limit",
            ConnRefusal::Lease => "lease",
            ConnRefusal::Anonymous => "anonymous",
            ConnRefusal::UnknownExport => "unknown_export",
            ConnRefusal::Handshake => "handshake",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VolumeOp {
    volume: String,
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VolumeLabel {
    volume: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VolumeState {
    volume: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Trigger {
    trigger: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Step {
    step: &'static str,
}

/// The steps of a flip as labels, in the order of [`FlipReport`]'s fields.
const FLIP_STEPS: [&str; 6] = [
    "deactivate",
    "drain",
    "disconnect",
    "persist",
    "promote",
    "total",
];

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Request latencies: 50 µs to about 1.6 s.
fn request_buckets() -> Histogram {
    Histogram::new(exponential_buckets(50e-6, 2.0, 16))
}

/// Flip steps: 10 µs to about 5 s.
fn step_buckets() -> Histogram {
    Histogram::new(exponential_buckets(10e-6, 2.0, 20))
}

/// Every metric of the daemon, and the registry they are served from.
#[derive(Debug)]
pub struct Metrics {
    registry: Prom,
    requests: Family<VolumeOp, Counter>,
    errors: Family<VolumeOp, Counter>,
    latency: HistogramFamily<VolumeOp>,
    read_bytes: Family<VolumeLabel, Counter>,
    written_bytes: Family<VolumeLabel, Counter>,
    volume_connections: Family<VolumeLabel, Gauge>,
    leases: Family<VolumeState, Gauge>,
    epoch: Family<VolumeLabel, Gauge>,
    size: Family<VolumeLabel, Gauge>,
    connections: Gauge,
    refused_connections: Family<Reason, Counter>,
    refused_requests: Family<Reason, Counter>,
    flips: Family<Trigger, Counter>,
    flip_steps: HistogramFamily<Step>,
    rollbacks: Counter,
    revokes: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Every metric, registered and at zero.
    pub fn new() -> Metrics {
        let m = Metrics {
            registry: Prom::default(),
            requests: Family::default(),
            errors: Family::default(),
            latency: Family::new_with_constructor(request_buckets),
            read_bytes: Family::default(),
            written_bytes: Family::default(),
            volume_connections: Family::default(),
            leases: Family::default(),
            epoch: Family::default(),
            size: Family::default(),
            connections: Gauge::default(),
            refused_connections: Family::default(),
            refused_requests: Family::default(),
            flips: Family::default(),
            flip_steps: Family::new_with_constructor(step_buckets),
            rollbacks: Counter::default(),
            revokes: Counter::default(),
        };
        let mut r = Prom::default();
        r.register(
            "storaged_volume_requests",
            "NBD requests answered, by volume and command",
            m.requests.clone(),
        );
        r.register(
            "storaged_volume_request_errors",
            "NBD requests answered with an error, by volume and command",
            m.errors.clone(),
        );
        r.register(
            "storaged_volume_request_duration_seconds",
            "Time from receiving an NBD request to sending its reply",
            m.latency.clone(),
        );
        r.register(
            "storaged_volume_read_bytes",
            "Bytes read by NBD clients",
            m.read_bytes.clone(),
        );
        r.register(
            "storaged_volume_written_bytes",
            "Bytes written by NBD clients",
            m.written_bytes.clone(),
        );
        r.register(
            "storaged_volume_connections",
            "NBD connections in transmission, by volume",
            m.volume_connections.clone(),
        );
        r.register(
            "storaged_volume_leases",
            "Lease holders of each volume, by state",
            m.leases.clone(),
        );
        r.register(
            "storaged_volume_epoch",
            "The lease epoch of each volume",
            m.epoch.clone(),
        );
        r.register(
            "storaged_volume_size_bytes",
            "The size of each volume",
            m.size.clone(),
        );
        r.register(
            "storaged_connections",
            "Open NBD connections (in the handshake or in transmission)",
            m.connections.clone(),
        );
        r.register(
            "storaged_connections_refused",
            "NBD connections turned away, by reason",
            m.refused_connections.clone(),
        );
        r.register(
            "storaged_requests_refused",
            "NBD requests refused with EPERM by the lease gate, by reason",
            m.refused_requests.clone(),
        );
        r.register(
            "storaged_flips",
            "Lease flips completed (one per volume), by what triggered them",
            m.flips.clone(),
        );
        r.register(
            "storaged_flip_step_duration_seconds",
            "Duration of each step of a lease flip",
            m.flip_steps.clone(),
        );
        r.register(
            "storaged_lease_rollbacks",
            "Lease flips rolled back (one per volume)",
            m.rollbacks.clone(),
        );
        r.register(
            "storaged_lease_revokes",
            "Leases terminated by a revoke (one per volume)",
            m.revokes.clone(),
        );
        // Every series of a bounded label set exists from the start, at zero.
        let refusals = [
            ConnRefusal::ConnectionLimit,
            ConnRefusal::VolumeConnectionLimit,
            ConnRefusal::Lease,
            ConnRefusal::Anonymous,
            ConnRefusal::UnknownExport,
            ConnRefusal::Handshake,
        ];
        for why in refusals {
            drop(
                m.refused_connections
                    .get_or_create(&Reason { reason: why.name() }),
            );
        }
        for r in [Refusal::Standby, Refusal::ReadOnly, Refusal::Fenced] {
            drop(m.refused_requests.get_or_create(&refusal(r)));
        }
        for trigger in ["api", "group", "nbd", "first_access", "timeout"] {
            drop(m.flips.get_or_create(&Trigger { trigger }));
        }
        for step in FLIP_STEPS {
            drop(m.flip_steps.get_or_create(&Step { step }));
        }
        Metrics { registry: r, ..m }
    }

    /// Creates the series of `volume` at zero (when it is loaded or created).
    pub fn add_volume(&self, volume: &str) {
        drop(self.connection(volume));
    }

    /// The handles one connection to `volume` bumps.
    pub fn connection(&self, volume: &str) -> ConnMetrics {
        let op = |op: Op| {
            let l = VolumeOp {
                volume: volume.to_string(),
                op: op.name(),
            };
            OpMetrics {
                requests: self.requests.get_or_create_owned(&l),
                errors: self.errors.get_or_create_owned(&l),
                latency: self.latency.get_or_create_owned(&l),
            }
        };
        let v = VolumeLabel {
            volume: volume.to_string(),
        };
        ConnMetrics {
            ops: Arc::new(ConnHandles {
                ops: Op::ALL.map(op),
                read_bytes: self.read_bytes.get_or_create_owned(&v),
                written_bytes: self.written_bytes.get_or_create_owned(&v),
                refused: [Refusal::Standby, Refusal::ReadOnly, Refusal::Fenced]
                    .map(|r| self.refused_requests.get_or_create_owned(&refusal(r))),
            }),
        }
    }

    /// Counts one more open connection until the guard is dropped.
    pub fn open_connection(&self) -> OpenConnection {
        self.connections.inc();
        OpenConnection(self.connections.clone())
    }

    /// Counts a connection turned away.
    pub fn refused_connection(&self, why: ConnRefusal) {
        self.refused_connections
            .get_or_create(&Reason { reason: why.name() })
            .inc();
    }

    /// Counts a completed flip of one volume and the time of each of its steps.
    pub fn flipped(&self, trigger: &'static str, rep: &FlipReport) {
        self.flips.get_or_create(&Trigger { trigger }).inc();
        let us = [
            rep.deactivate_us,
            rep.drain_us,
            rep.disconnect_us,
            rep.persist_us,
            rep.promote_us,
            rep.total_us,
        ];
        for (step, us) in FLIP_STEPS.into_iter().zip(us) {
            self.flip_steps
                .get_or_create(&Step { step })
                .observe(us as f64 / 1e6);
        }
    }

    /// Counts `n` volumes rolled back.
    pub fn rolled_back(&self, n: usize) {
        self.rollbacks.inc_by(n as u64);
    }

    /// Counts `n` leases revoked.
    pub fn revoked(&self, n: usize) {
        self.revokes.inc_by(n as u64);
    }

    /// Drops the series of a deleted volume.
    pub fn forget_volume(&self, volume: &str) {
        for op in Op::ALL {
            let l = VolumeOp {
                volume: volume.to_string(),
                op: op.name(),
            };
            self.requests.remove(&l);
            self.errors.remove(&l);
            self.latency.remove(&l);
        }
        let v = VolumeLabel {
            volume: volume.to_string(),
        };
        self.read_bytes.remove(&v);
        self.written_bytes.remove(&v);
    }

    /// The exposition of every metric, the volumes' states read now.
    pub fn encode(&self, volumes: &[Arc<Volume>]) -> String {
        self.volume_connections.clear();
        self.leases.clear();
        self.epoch.clear();
        self.size.clear();
        for vol in volumes {
            let name = &vol.config.name;
            let v = VolumeLabel {
                volume: name.clone(),
            };
            let t = vol.table();
            let n = vol.connection_count();
            self.volume_connections.get_or_create(&v).set(n as i64);
            self.epoch.get_or_create(&v).set(t.epoch as i64);
            self.size.get_or_create(&v).set(vol.config.size as i64);
            let states = [
                ("primary", usize::from(t.primary.is_some())),
                ("standby", t.standby.len()),
                ("deactivated", t.deactivated.len()),
            ];
            for (state, count) in states {
                let l = VolumeState {
                    volume: name.clone(),
                    state,
                };
                self.leases.get_or_create(&l).set(count as i64);
            }
        }
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

fn refusal(r: Refusal) -> Reason {
    Reason {
        reason: match r {
            Refusal::Standby => "standby",
            Refusal::ReadOnly => "read_only",
            Refusal::Fenced => "fenced",
        },
    }
}

/// Keeps `storaged_connections` one higher while it lives.
#[derive(Debug)]
pub struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[derive(Debug)]
struct OpMetrics {
    requests: Counter,
    errors: Counter,
    latency: Histogram,
}

#[derive(Debug)]
struct ConnHandles {
    ops: [OpMetrics; Op::ALL.len()],
    read_bytes: Counter,
    written_bytes: Counter,
    refused: [Counter; 3],
}

/// The metrics one connection bumps, taken once when it enters transmission (cheap to clone).
#[derive(Debug, Clone)]
pub struct ConnMetrics {
    ops: Arc<ConnHandles>,
}

impl ConnMetrics {
    /// A request of `op` for `len` bytes of data, received at `started`, was answered with
    /// `error` (0: success).
    pub fn answered(&self, op: Op, len: u32, error: u32, started: Instant) {
        // The variants are declared in the order of `Op::ALL`.
        let m = &self.ops.ops[op as usize];
        m.requests.inc();
        m.latency.observe(secs(started.elapsed()));
        if error != 0 {
            m.errors.inc();
            return;
        }
        match op {
            Op::Read => self.ops.read_bytes.inc_by(u64::from(len)),
            Op::Write => self.ops.written_bytes.inc_by(u64::from(len)),
            _ => 0,
        };
    }

    /// A request refused by the lease gate.
    pub fn refused(&self, r: Refusal) {
        let i = match r {
            Refusal::Standby => 0,
            Refusal::ReadOnly => 1,
            Refusal::Fenced => 2,
        };
        self.ops.refused[i].inc();
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connections_requests_show_in_the_exposition() {
        for (i, op) in Op::ALL.into_iter().enumerate() {
            assert_eq!(op as usize, i, "{op:?}");
        }
        let m = Metrics::new();
        let c = m.connection("v1");
        c.answered(Op::Write, 4096, 0, Instant::now());
        c.answered(Op::Read, 512, 0, Instant::now());
        c.answered(Op::Read, 512, 5, Instant::now());
        c.refused(Refusal::Fenced);
        m.refused_connection(ConnRefusal::Lease);
        let text = m.encode(&[]);
        let lines: Vec<&str> = text.lines().collect();
        for want in [
            r#"storaged_volume_requests_total{volume="v1",op="read"} 2"#,
            r#"storaged_volume_request_errors_total{volume="v1",op="read"} 1"#,
            r#"storaged_volume_written_bytes_total{volume="v1"} 4096"#,
            r#"storaged_volume_read_bytes_total{volume="v1"} 512"#,
            r#"storaged_requests_refused_total{reason="fenced"} 1"#,
            r#"storaged_connections_refused_total{reason="lease"} 1"#,
            r#"storaged_volume_request_duration_seconds_count{volume="v1",op="write"} 1"#,
        ] {
            assert!(lines.contains(&want), "{want} missing from:\n{text}");
        }
        m.forget_volume("v1");
        assert!(!m.encode(&[]).contains("v1"));
    }
}
