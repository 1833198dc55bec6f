// The body of the `analyze_log` fuzz target, shared with the cargo-test run over the corpus
// and random inputs (itewatch/tests/fuzz_bodies.rs): the log analyzer on arbitrary bytes
// never panics, keeps evidence bounded, and the document it yields always encodes.

/// Checks one input; panics (the fuzzer's crash) on a broken promise.
pub fn check(data: &[u8]) {
    let a = itewatch::analyze::analyze_bytes(data, itewatch::analyze::Options::default());
    for i in &a.incidents {
        let ev = i.evidence.as_ref().expect("log incidents carry evidence");
        assert!(ev.lines.len() <= 48);
    }
    let doc = itewatch::document::from_analysis(a, None);
    let _ = serde_json::to_vec(&doc).expect("a document always encodes");
    let _ = itewatch::document::render_text(&doc);
}
