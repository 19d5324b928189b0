//! The regression run of the fuzz targets' checked-in corpora: each crate with fuzz targets
//! (`storaged_client::fuzz`, `vmm_disk::fuzz`, `vmm::fuzz`) names its entry points, and a
//! unit test feeds every file of `ROOT/TARGET/` through its target on the stable toolchain, so
//! that an input that once crashed a parser keeps being tried by the test suite.

use std::path::Path;

/// A fuzz target's entry point: it takes any bytes and must not panic.
pub type Target = fn(&[u8]);

/// Feeds every file under `root/NAME/` to the entry point of target `NAME`. For tests: it
/// panics on an empty or missing corpus, and a target's own panic is the finding.
pub fn replay(root: &Path, targets: &[(&str, Target)]) {
    for (name, target) in targets {
        let dir = root.join(name);
        let files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
            .map(|e| e.expect("a corpus entry").path())
            .collect();
        assert!(!files.is_empty(), "empty corpus {}", dir.display());
        for f in files {
            let input = std::fs::read(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            target(&input);
        }
    }
}

/// The unit test that replays a crate's corpora: `corpus_replay_test!(TARGETS, "fuzz/corpus")`
/// where `TARGETS` (a path from the calling module) is the crate's `[(&str, Target)]` list and
/// the second argument the corpora's folder, relative to the crate's `Cargo.toml`.
#[macro_export]
macro_rules! corpus_replay_test {
    ($targets:path, $dir:literal) => {
        #[cfg(test)]
        mod corpus_replay {
            /// Every checked-in corpus file of every target, through its entry point.
            #[test]
            fn corpora_pass() {
                let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join($dir);
                $crate::corpus::replay(&root, &$targets);
            }
        }
    };
}
