//! `scripts/faults`: the whole crash-point fault matrix (see `e2e::faults`), one cell after
//! the other, printed as a table; exits non-zero if any cell fails.
//!
//! Arguments: substrings of cell names to run only those (e.g. `storaged`, `source.flip`).

use anyhow::{bail, Result};
use e2e::faults::{all_cells, run_cell, table};

fn main() -> Result<()> {
    let filters: Vec<String> = std::env::args().skip(1).collect();
    let Some(test) = e2e::GuestTest::new("faults") else {
        bail!("the fault matrix needs /dev/kvm");
    };
    let cells: Vec<_> = all_cells()
        .into_iter()
        .filter(|c| filters.is_empty() || filters.iter().any(|f| c.to_string().contains(f)))
        .collect();
    // VMHOP_FAULTS_KEEP=1 keeps every cell's directory (logs of each process) for a look.
    let keep = std::env::var_os("VMHOP_FAULTS_KEEP").is_some();
    let mut rows = Vec::new();
    for (i, fault) in cells.iter().enumerate() {
        eprintln!("[faults] {}/{}: {fault}", i + 1, cells.len());
        let dir = test.dir.path().join(format!("cell{i}"));
        std::fs::create_dir_all(&dir)?;
        let v = run_cell(*fault, &test.image, &dir);
        eprintln!(
            "[faults]   {} ({:.1} s): guest on {}, {}{}",
            if v.pass { "pass" } else { "FAIL" },
            v.secs,
            v.runs_on.as_deref().unwrap_or("no host"),
            v.migration,
            if v.note.is_empty() {
                String::new()
            } else {
                format!("; {}", v.note)
            }
        );
        rows.push((*fault, v));
    }
    print!("{}", table(&rows));
    if keep {
        let dir = test.dir.keep();
        println!("cell directories kept in {}", dir.display());
    }
    let failed = rows.iter().filter(|(_, v)| !v.pass).count();
    let records: u64 = rows.iter().map(|(_, v)| v.records).sum();
    let split: u32 = rows.iter().map(|(_, v)| v.split_brain).sum();
    println!(
        "{} cells, {failed} failed; {records} acknowledged disk records verified; \
         split-brain samples: {split}",
        rows.len()
    );
    if failed > 0 {
        bail!("{failed} cells failed");
    }
    Ok(())
}
