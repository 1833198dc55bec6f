//! The trace reader and the report built from it on arbitrary bytes: errors, never panics.
//! The body is shared with `cargo test` (itewatch/tests/fuzz_bodies.rs).
#![no_main]
use libfuzzer_sys::fuzz_target;

include!("../bodies/trace_reader.rs");

fuzz_target!(|data: &[u8]| check(data));
