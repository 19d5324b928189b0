//! A representative subset of the crash-point fault matrix (`scripts/faults` runs it all; see
//! `e2e::faults`): storaged killed right after it persisted a flip, the source's migrated
//! killed past the point of no return, the destination VMM killed during pre-copy and once the
//! flip is under way (the source takes the volumes back and resumes), and the source cut off
//! from storage at the flip. Each cell: no split brain, the guest on exactly
//! one host with every acknowledged disk record verifying.

use e2e::faults::{ci_cells, run_cell, table};
use e2e::GuestTest;

#[test]
fn fault_matrix_representative_cells() {
    let Some(test) = GuestTest::new("fault_matrix_representative_cells") else {
        return;
    };
    let mut rows = Vec::new();
    for (i, fault) in ci_cells().into_iter().enumerate() {
        let dir = test.dir.path().join(format!("cell{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        rows.push((fault, run_cell(fault, &test.image, &dir)));
    }
    let t = table(&rows);
    eprintln!("{t}");
    assert!(rows.iter().all(|(_, v)| v.pass), "{t}");
}
