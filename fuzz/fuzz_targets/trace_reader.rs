//! The trace reader and the report built from it on arbitrary bytes: errors, never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = itewatch::trace::TraceReader::new(data) {
        let doc = itewatch::document::from_trace(
            r,
            None,
            itewatch::correlate::Config::default(),
            |_| {},
        );
        let _ = serde_json::to_vec(&doc).expect("a document always encodes");
    }
});
