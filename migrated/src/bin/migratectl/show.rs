//! What migratectl prints for a person: the tables of hosts and instances, a migration's
//! summary and times as UTC dates.

use migrated::api::HostEntry;
use migrated::instance::InstanceRecord;
use migrated::migration::record::{MigrationRecord, Phase};

/// `bytes` in MiB with one decimal.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// The hosts as a table, then whether this host reaches storaged.
pub fn print_hosts(hosts: &[HostEntry]) {
    println!(
        "{:<16} {:<22} {:<12} {:>9}",
        "HOST", "ADDRESS", "STATUS", "INSTANCES"
    );
    for h in hosts {
        let status = match (h.local, h.reachable) {
            (true, _) => "this host",
            (false, true) => "up",
            (false, false) => "unreachable",
        };
        let n = h
            .info
            .as_ref()
            .map(|i| i.active_instances.to_string())
            .unwrap_or_else(|| "-".into());
        println!("{:<16} {:<22} {:<12} {:>9}", h.host_id, h.addr, status, n);
    }
    for h in hosts {
        if let Some(s) = &h.storaged {
            match &s.error {
                None => println!("storaged at {} from {}: reachable", s.addr, h.host_id),
                Some(e) => println!(
                    "storaged at {} from {}: unreachable: {e}",
                    s.addr, h.host_id
                ),
            }
        }
    }
}

/// The instances as a table.
pub fn print_instances(list: &[InstanceRecord]) {
    println!(
        "{:<16} {:<14} {:>8} {:>7} {:>5}  DISKS",
        "NAME", "STATE", "PID", "MEM", "VCPUS"
    );
    for r in list {
        let disks: Vec<String> = r
            .config
            .disks
            .iter()
            .map(|d| match (&d.volume, &d.path) {
                (Some(v), _) => format!("volume:{v}"),
                (_, Some(p)) => p.display().to_string(),
                _ => "?".into(),
            })
            .collect();
        println!(
            "{:<16} {:<14} {:>8} {:>7} {:>5}  {}",
            r.name,
            r.state,
            r.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            format!("{}M", r.config.memory_mib),
            r.config.vcpus,
            disks.join(",")
        );
    }
}

/// `ms` since the Unix epoch as a UTC time: `2026-12-03 19:55:40.267Z`.
pub fn utc(ms: u64) -> String {
    let (secs, milli) = (ms / 1000, ms % 1000);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Days since 1970-01-01 to a date of the proleptic Gregorian calendar (Howard Hinnant's
    // civil_from_days).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {h:02}:{m:02}:{s:02}.{milli:03}Z")
}

pub fn summary(r: &MigrationRecord) {
    println!(
        "migration {} of {}: {} -> {}: {}",
        r.id, r.instance, r.source, r.destination, r.phase
    );
    if let Some(e) = &r.error {
        println!("  reason: {e}");
    }
    if r.phase == Phase::Completed {
        let f = &r.figures;
        println!(
            "  total {} ms, downtime {:.1} ms, flip {} ms, {} sent",
            f.total_ms,
            if f.vmm_downtime_us > 0 {
                f.vmm_downtime_us as f64 / 1000.0
            } else {
                f.downtime_ms as f64
            },
            f.flip_ms,
            mib(f.bytes_sent)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00.000Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00.000Z");
        assert_eq!(utc(1_796_327_740_267), "2026-12-03 19:55:40.267Z");
    }
}
