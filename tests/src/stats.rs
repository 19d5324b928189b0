//! Summaries of the benchmarks' samples.

/// The value at `p` (0..=1) of sorted `v`, nearest rank.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}
