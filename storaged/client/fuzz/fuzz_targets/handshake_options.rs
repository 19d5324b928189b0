//! Fuzz target: see `storaged_client::fuzz::handshake_options`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| storaged_client::fuzz::handshake_options(data));
