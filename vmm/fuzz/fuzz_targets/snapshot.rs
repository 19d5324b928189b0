//! Fuzz target: see `vmm::fuzz::snapshot`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzz::snapshot(data));
