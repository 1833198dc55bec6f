//! The log analyzer on arbitrary bytes: no panic, bounded memory, and the document it yields
//! always encodes. The body is shared with `cargo test` (itewatch/tests/fuzz_bodies.rs).
#![no_main]
use libfuzzer_sys::fuzz_target;

include!("../bodies/analyze_log.rs");

fuzz_target!(|data: &[u8]| check(data));
