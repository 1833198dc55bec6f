//! The command line as a user sees it: help, the reports of the bundled real-kernel traces,
//! the log analyzer and the errors bad input gets, as literate transcripts in `tests/cmd/*.md`
//! (trycmd). After an intended change of output: `TRYCMD=overwrite cargo test -p itewatch
//! --test cli`, then review the diff.

#[test]
fn cli() {
    trycmd::TestCases::new()
        .register_bin(
            "itewatch",
            std::path::Path::new(env!("CARGO_BIN_EXE_itewatch")),
        )
        .case("tests/cmd/*.md");
}
