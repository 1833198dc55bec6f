//! The log analyzer on arbitrary bytes: no panic, bounded memory, and the document it yields
//! always encodes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let a = itewatch::analyze::analyze_bytes(data, itewatch::analyze::Options::default());
    for i in &a.incidents {
        let ev = i.evidence.as_ref().expect("log incidents carry evidence");
        assert!(ev.lines.len() <= 48);
    }
    let doc = itewatch::document::from_analysis(a, None);
    let _ = serde_json::to_vec(&doc).expect("a document always encodes");
    let _ = itewatch::document::render_text(&doc);
});
