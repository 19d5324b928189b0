//! The test guest built by guest-images/build.

use std::path::PathBuf;

/// Kernel, root filesystem and command line of the test guest.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// Uncompressed ELF vmlinux.
    pub kernel: PathBuf,
    /// ext4 image whose /init is the guest agent.
    pub rootfs: PathBuf,
    /// Base kernel command line (devices are added by the VMM).
    pub cmdline: String,
}

const HOW: &str = "build it with `guest-images/build` (scripts/test does)";

/// Finds the image from `GUEST_KERNEL`/`GUEST_ROOTFS`/`GUEST_CMDLINE`, or from the record the
/// last build left in the cache. Panics with the command that makes it when it is missing.
pub fn guest_image() -> GuestImage {
    let mut vars: std::collections::HashMap<String, String> =
        ["GUEST_KERNEL", "GUEST_ROOTFS", "GUEST_CMDLINE"]
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
            .collect();
    if vars.len() < 3 {
        let cache = std::env::var("VMHOP_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                let base = std::env::var("XDG_CACHE_HOME")
                    .map(PathBuf::from)
                    .unwrap_or_else(|_| {
                        PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                            .join(".cache")
                    });
                base.join("vmhop")
            });
        let record = cache.join("guest/current.env");
        let text = std::fs::read_to_string(&record)
            .unwrap_or_else(|e| panic!("no guest image ({}: {e}): {HOW}", record.display()));
        for line in text.lines() {
            if let Some((k, v)) = line.split_once('=') {
                vars.entry(k.to_string())
                    .or_insert_with(|| v.trim_matches('"').to_string());
            }
        }
    }
    let get = |k: &str| {
        vars.get(k)
            .cloned()
            .unwrap_or_else(|| panic!("{k} unknown: {HOW}"))
    };
    let image = GuestImage {
        kernel: get("GUEST_KERNEL").into(),
        rootfs: get("GUEST_ROOTFS").into(),
        cmdline: get("GUEST_CMDLINE"),
    };
    for p in [&image.kernel, &image.rootfs] {
        assert!(p.exists(), "{} is missing: {HOW}", p.display());
    }
    image
}
