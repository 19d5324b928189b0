//! Fuzz target: see `vmm::fuzz::migration_stream`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzz::migration_stream(data));
