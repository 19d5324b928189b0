//! Fuzz target: see `vmm::fuzz::saved_state`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzz::saved_state(data));
