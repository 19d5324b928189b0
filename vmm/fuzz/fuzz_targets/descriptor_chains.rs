//! Fuzz target: see `vmm_disk::fuzz::descriptor_chains`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm_disk::fuzz::descriptor_chains(data));
