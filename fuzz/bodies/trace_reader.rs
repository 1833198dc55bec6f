// The body of the `trace_reader` fuzz target, shared with the cargo-test run over the corpus
// and random inputs (itewatch/tests/fuzz_bodies.rs): the trace reader and the report built
// from it error on damage, never panic, and the document always encodes.

/// Checks one input; panics (the fuzzer's crash) on a broken promise.
pub fn check(data: &[u8]) {
    if let Ok(r) = itewatch::trace::TraceReader::new(data) {
        let doc = itewatch::document::from_trace(
            r,
            None,
            itewatch::correlate::Config::default(),
            |_| {},
        );
        let _ = serde_json::to_vec(&doc).expect("a document always encodes");
    }
}
