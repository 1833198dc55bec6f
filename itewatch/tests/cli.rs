//! The command line as a user sees it: help, the reports of the bundled real-kernel traces,
//! the log analyzer and the errors bad input gets, as literate transcripts in `tests/cmd/*.md`
//! (trycmd). After an intended change of output: `TRYCMD=overwrite cargo test -p itewatch
//! --test cli`, then review the diff. Below them: the completion scripts and man pages, run
//! through bash and groff where those are installed.

#[test]
fn cli() {
    trycmd::TestCases::new()
        .register_bin(
            "itewatch",
            std::path::Path::new(env!("CARGO_BIN_EXE_itewatch")),
        )
        .case("tests/cmd/*.md");
}

fn itewatch(args: &[&str]) -> String {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_itewatch"))
        .args(args)
        .output()
        .expect("itewatch runs");
    assert!(
        o.status.success(),
        "itewatch {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn have(tool: &str) -> bool {
    std::process::Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The bash script, loaded into a real bash, completes subcommands and their options.
#[test]
fn bash_completion_completes_subcommands_and_options() {
    if !have("bash") {
        eprintln!("SKIPPED: no bash");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("itewatch.bash");
    std::fs::write(&script, itewatch(&["completions", "bash"])).unwrap();
    // As bash calls it: COMP_* set, and the command, the current and the previous word.
    let complete = |words: &str, cword: usize| -> String {
        let o = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source '{}'; COMP_WORDS=({words}); COMP_CWORD={cword}; \
                 COMP_LINE='{words}'; COMP_POINT=${{#COMP_LINE}}; \
                 _itewatch itewatch \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; \
                 printf '%s\\n' \"${{COMPREPLY[@]}}\"",
                script.display()
            ))
            .output()
            .unwrap();
        String::from_utf8(o.stdout).unwrap()
    };
    let subs = complete("itewatch re", 1);
    let subs: Vec<&str> = subs.lines().collect();
    assert!(
        subs.contains(&"report") && subs.contains(&"replay") && subs.contains(&"record"),
        "{subs:?}"
    );
    assert!(!subs.contains(&"live"), "{subs:?}");
    let opts = complete("itewatch report --f", 2);
    assert_eq!(opts.trim(), "--format", "{opts}");
}

#[test]
fn zsh_and_fish_scripts_are_for_itewatch() {
    assert!(itewatch(&["completions", "zsh"]).starts_with("#compdef itewatch"));
    let fish = itewatch(&["completions", "fish"]);
    assert!(
        fish.contains("complete -c itewatch") && fish.contains("-l format"),
        "{fish}"
    );
}

/// Every man page renders through groff (with preconv, as man runs it: the help text has
/// `×` and `→`) without a warning.
#[test]
fn man_pages_render_cleanly() {
    let mut pages = vec![vec!["man"]];
    for sub in [
        "live",
        "record",
        "replay",
        "simulate",
        "report",
        "analyze",
        "doctor",
        "agent",
        "completions",
        "man",
    ] {
        pages.push(vec!["man", sub]);
    }
    for args in pages {
        let roff = itewatch(&args);
        assert!(roff.contains(".TH itewatch"), "{roff}");
        if !have("groff") {
            eprintln!("SKIPPED: groff rendering (no groff)");
            continue;
        }
        let mut child = std::process::Command::new("groff")
            .args(["-k", "-man", "-Tutf8", "-ww"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), roff.as_bytes()).unwrap();
        let o = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.success() && stderr.is_empty(),
            "{args:?}: {stderr}"
        );
        // grotty overstrikes bold and underlined text (`N\bN`): keep the last of each.
        let mut text = String::new();
        for c in String::from_utf8_lossy(&o.stdout).chars() {
            if c == '\u{8}' {
                text.pop();
            } else {
                text.push(c);
            }
        }
        let title = match args.get(1) {
            Some(sub) => format!("itewatch-{sub}(1)"),
            None => "itewatch(1)".to_string(),
        };
        assert!(text.contains("NAME") && text.contains(&title), "{text}");
        if args.get(1) == Some(&"report") {
            assert!(
                text.contains("format") && text.contains("markdown"),
                "{text}"
            );
        }
    }
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_itewatch"))
        .args(["man", "no-such-command"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no-such-command"));
}
