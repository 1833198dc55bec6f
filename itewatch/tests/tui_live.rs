//! `itewatch live`: every view rendered into ratatui's `TestBackend` and compared with
//! reviewed snapshots (insta), plus one end-to-end run of the real binary in a terminal (tmux).

use itewatch::correlate::incident::IncidentKind;
use itewatch::correlate::{correlate_all, Config};
use itewatch::event::KTime;
use itewatch::simulate::generate;
use itewatch::tui::input::Action;
use itewatch::tui::state::{App, HeaderInfo, Panel};
use itewatch::tui::ui::{self, Unavailable};
use itewatch::tui::{self as tui};
use ratatui::backend::TestBackend;
use ratatui::Terminal;

const W: u16 = 120;
const H: u16 = 40;

fn header(source: &str) -> HeaderInfo {
    HeaderInfo {
        source: source.into(),
        host: "(simulated)".into(),
        kernel: "(simulated)".into(),
        ..Default::default()
    }
}

/// The app after playing scenario `name` with `seed`, to the end or up to `stop_at`.
fn scenario(name: &str, seed: u64, stop_at: Option<KTime>) -> App {
    let sim = generate(name, seed).unwrap();
    tui::play(
        header(&format!("simulate {name} seed {seed}")),
        sim.records,
        stop_at,
    )
}

fn render(app: &App) -> String {
    render_at(app, W, H)
}

fn render_at(app: &App, w: u16, h: u16) -> String {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    t.draw(|f| ui::draw(f, app)).unwrap();
    format!("{}", t.backend())
}

#[test]
fn empty_state() {
    let app = tui::play(header("simulate benign seed 0"), Vec::new(), Some(KTime(0)));
    insta::assert_snapshot!("empty", render(&app));
}

#[test]
fn w1_main_view_after_the_stream() {
    let app = scenario("w1-driver-inflight", 3, None);
    assert!(app.ended);
    insta::assert_snapshot!("w1_main", render(&app));
}

#[test]
fn hung_invalidation_is_impossible_to_miss() {
    // The first seed whose submission hangs past the critical threshold; stop the stream
    // 1.2 s into the hang.
    let (seed, start) = (0..100)
        .find_map(|seed| {
            let sim = generate("hang-no-hotplug", seed).unwrap();
            let (incidents, _) = correlate_all(Config::default(), &sim.records);
            incidents
                .iter()
                .find(|i| {
                    i.kind == IncidentKind::HungInvalidation
                        && i.outcome
                            .and_then(|o| o.duration_ns())
                            .is_some_and(|d| d > 1_300_000_000)
                })
                .map(|i| (seed, i.start))
        })
        .expect("a seed with a long hang");
    let at = KTime(start.0 + 1_200_000_000);
    let app = scenario("hang-no-hotplug", seed, Some(at));
    assert_eq!(
        app.inflight_rows().len(),
        1,
        "the hung submission is in flight"
    );
    let screen = render(&app);
    assert!(screen.contains("HUNG INVALIDATION"), "{screen}");
    insta::assert_snapshot!("hung", screen);
    // Small terminals: the banner still names the device (it was cut before it at 80).
    let sids: Vec<String> = app
        .worst_inflight()
        .unwrap()
        .dev_tlb_sids
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert!(!sids.is_empty());
    for (w, h) in [(80, 24), (100, 30)] {
        let screen = render_at(&app, w, h);
        let banner = screen
            .lines()
            .find(|l| l.contains("HUNG"))
            .unwrap_or_else(|| panic!("{w}x{h}: no banner\n{screen}"));
        assert!(banner.contains(&sids[0]), "{w}x{h}: {banner}");
        insta::assert_snapshot!(format!("hung_{w}x{h}"), screen);
    }
}

/// Small terminals degrade by priority: incidents, then what is in flight, then devices, then
/// the histogram. Each panel that is drawn shows rows, not only its title (at 80x24 the
/// panels showed titles and no rows).
#[test]
fn small_terminals_keep_incident_rows_first() {
    let app = scenario("w1-driver-inflight", 3, None);
    let incidents = app.all_incidents();
    assert!(!incidents.is_empty());
    for (w, h) in [(80, 24), (100, 30)] {
        let screen = render_at(&app, w, h);
        let lines: Vec<&str> = screen.lines().collect();
        // Every incident's row is on screen (the incidents title line is followed by its
        // column header, then the rows).
        let title = lines
            .iter()
            .position(|l| l.contains("Incidents ("))
            .unwrap_or_else(|| panic!("{w}x{h}: no incidents panel\n{screen}"));
        let rows = &lines[title + 2..];
        for i in &incidents {
            let kind = i.kind.to_string();
            let shown = &kind[..kind.len().min(20)];
            assert!(
                rows.iter().take(incidents.len()).any(|l| l.contains(shown)),
                "{w}x{h}: incident {kind} not in its panel\n{screen}"
            );
        }
        // The devices panel shows at least one device row (its BDF).
        let dev = lines
            .iter()
            .position(|l| l.contains("Devices"))
            .unwrap_or_else(|| panic!("{w}x{h}: no devices panel\n{screen}"));
        assert!(
            lines[dev + 2].contains("0000:"),
            "{w}x{h}: devices panel without rows\n{screen}"
        );
        insta::assert_snapshot!(format!("w1_main_{w}x{h}"), screen);
    }
}

#[test]
fn w1_incident_detail_draws_the_cpu_lanes() {
    let mut app = scenario("w1-driver-inflight", 3, None);
    app.apply(Action::FocusNext);
    app.apply(Action::FocusNext);
    assert_eq!(app.focus, Panel::Incidents);
    let idx = app
        .incident_rows()
        .iter()
        .position(|i| i.kind == IncidentKind::InflightAcrossDisconnect)
        .unwrap();
    for _ in 0..idx {
        app.apply(Action::Down);
    }
    app.apply(Action::Open);
    assert!(app.detail.is_some());
    let screen = render(&app);
    // The thread's picture: the driver's submit on one CPU, pciehp on another.
    assert!(screen.contains("│ CPU"), "{screen}");
    assert!(screen.contains("hotplug-ist"), "{screen}");
    assert!(screen.contains("submit-return"), "{screen}");
    insta::assert_snapshot!("w1_detail", screen);
    app.apply(Action::Back);
    assert!(app.detail.is_none());
}

#[test]
fn w2_sorted_by_severity_and_filtered_by_driver() {
    let mut app = scenario("w2-notifier-after-disconnect", 5, None);
    app.apply(Action::FocusNext);
    app.apply(Action::FocusNext);
    app.apply(Action::CycleSort);
    app.apply(Action::StartFilter);
    for c in "nvme".chars() {
        app.apply(Action::FilterInput(c));
    }
    insta::assert_snapshot!("w2_filter_editing", render(&app));
    app.apply(Action::FilterCommit);
    for row in app.device_rows() {
        assert_eq!(row.device.driver.as_deref(), Some("nvme"));
    }
}

#[test]
fn help_overlay() {
    let mut app = scenario("benign", 0, None);
    app.apply(Action::ToggleHelp);
    insta::assert_snapshot!("help", render(&app));
}

#[test]
fn cannot_trace_screen() {
    let u = Unavailable {
        reason: "tracing needs root (or CAP_BPF + CAP_PERFMON); run with sudo, or use `itewatch replay`/`simulate`".into(),
        missing: vec![
            ("intel_iommu".into(), "no units in /sys/class/iommu (IOMMU off, or not Intel VT-d)".into()),
            ("probe qi_submit_sync".into(), "not in this kernel (kallsyms)".into()),
        ],
        fallback: "the trace recorded in the VM test on Linux 6.1".into(),
    };
    let mut t = Terminal::new(TestBackend::new(W, 24)).unwrap();
    t.draw(|f| ui::draw_unavailable(f, &u)).unwrap();
    insta::assert_snapshot!("cannot_trace", format!("{}", t.backend()));
    // At 80x24 with a loader error and doctor's findings as long as a real host's, the text
    // wraps past the screen; the keys line must stay (it was cut off).
    let long = Unavailable {
        reason: "loading the BPF object: the BPF programs are not in this build (built with \
                 AYA_BUILD_SKIP=1); rebuild without it to trace live"
            .into(),
        missing: (0..8)
            .map(|i| {
                (
                    format!("probe target {i}"),
                    "not in this kernel (kallsyms), and no kprobe fallback attached either".into(),
                )
            })
            .collect(),
        fallback: u.fallback.clone(),
    };
    let mut t = Terminal::new(TestBackend::new(80, 24)).unwrap();
    t.draw(|f| ui::draw_unavailable(f, &long)).unwrap();
    let small = format!("{}", t.backend());
    assert!(
        small.contains("Enter") && small.contains("q: quit"),
        "{small}"
    );
    // What to run stays too; the findings that do not fit are counted.
    assert!(small.contains("sudo itewatch doctor"), "{small}");
    assert!(small.contains("more: run"), "{small}");
    insta::assert_snapshot!("cannot_trace_80x24", small);
    let text = u.text();
    assert!(text.contains("sudo itewatch doctor"));
    assert!(text.contains("--replay"));
}

/// The checked-in JSON Schema of the report document (docs/report-schema.json; the
/// report_document tests keep it equal to the one the types generate).
fn report_schema() -> jsonschema::Validator {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/report-schema.json");
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    jsonschema::validator_for(&schema).unwrap()
}

/// Validates an exported file against the schema and reads it back with the document reader.
fn read_export(path: &std::path::Path) -> (serde_json::Value, itewatch::document::ReportDocument) {
    let text = std::fs::read_to_string(path).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let errors: Vec<String> = report_schema()
        .iter_errors(&v)
        .map(|e| format!("{e} at {}", e.instance_path))
        .collect();
    assert!(errors.is_empty(), "{}: {errors:#?}", path.display());
    let doc = itewatch::document::parse(&text).unwrap();
    (v, doc)
}

fn w1_origin() -> tui::export::Origin {
    tui::export::Origin {
        source: itewatch::trace::Source::Simulated {
            scenario: "w1-driver-inflight".into(),
            seed: 3,
        },
        path: None,
        error: None,
    }
}

#[test]
fn export_writes_the_versioned_report_document() {
    let mut app = scenario("w1-driver-inflight", 3, None);
    app.apply(Action::FocusNext);
    app.apply(Action::FocusNext);
    let inc = app.selected_incident().unwrap().clone();
    let dir = tempfile::tempdir().unwrap();
    let path = tui::export::export(
        &app,
        &w1_origin(),
        tui::export::Selection::One(&inc),
        dir.path(),
    )
    .unwrap();
    assert_eq!(
        path.file_name().unwrap().to_string_lossy(),
        format!("itewatch-incident-{}.json", inc.id)
    );
    let (v, doc) = read_export(&path);
    assert_eq!(v["schema_version"], itewatch::document::SCHEMA_VERSION);
    assert_eq!(doc.incidents, vec![inc.clone()]);
    assert_eq!(v["source"]["kind"], "trace");
    assert_eq!(v["source"]["origin"], "simulated");
    assert_eq!(v["source"]["scenario"], "w1-driver-inflight");
    assert_eq!(v["source"]["complete"], true, "the stream ended");
    assert_eq!(v["host"]["hostname"], serde_json::Value::Null);
    // Only this incident's fixes and devices.
    let fixes: Vec<&str> = inc.fixes.iter().map(|f| f.commit.as_str()).collect();
    assert!(!doc.fixes.is_empty());
    for f in &doc.fixes {
        assert!(fixes.contains(&f.commit.as_str()), "{}", f.commit);
        assert_eq!(f.incidents, vec![inc.id.clone()]);
    }
    assert_eq!(doc.inventory.len(), 1);
    assert_eq!(
        doc.inventory[0].bdf,
        inc.device.bdf.map(|b| b.to_string()),
        "{:?}",
        doc.inventory
    );
    // No temporary file is left behind.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn export_all_at_the_end_of_a_stream_equals_itewatch_report() {
    // The view's "all" export and `itewatch report --format json` of the same stream carry
    // the same incidents, fixes and inventory.
    for (name, seed) in [
        ("w1-driver-inflight", 3),
        ("w2-notifier-after-disconnect", 5),
        ("hang-no-hotplug", 0),
    ] {
        let sim = generate(name, seed).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let trace = dir.path().join("t.itw");
        itewatch::simulate::write_trace(&sim, &trace).unwrap();
        let report = itewatch::document::from_trace_file(&trace, Config::default()).unwrap();
        let app = tui::play(header(name), sim.records, None);
        let origin = tui::export::Origin {
            source: itewatch::trace::Source::Simulated {
                scenario: name.into(),
                seed,
            },
            path: Some(trace.clone()),
            error: None,
        };
        let path =
            tui::export::export(&app, &origin, tui::export::Selection::All, dir.path()).unwrap();
        let (_, doc) = read_export(&path);
        assert!(!doc.incidents.is_empty(), "{name}");
        assert_eq!(doc.incidents, report.incidents, "{name}");
        assert_eq!(doc.fixes, report.fixes, "{name}");
        assert_eq!(doc.inventory, report.inventory, "{name}");
        assert_eq!(doc.source, report.source, "{name}");
        assert_eq!(doc.loss, report.loss, "{name}");
    }
}

#[test]
fn export_mid_stream_says_the_capture_is_not_complete() {
    let sim = generate("w1-driver-inflight", 3).unwrap();
    let mid = sim.records[sim.records.len() / 2].ts().unwrap();
    let app = tui::play(header("w1"), sim.records, Some(mid));
    assert!(!app.ended);
    let dir = tempfile::tempdir().unwrap();
    let path =
        tui::export::export(&app, &w1_origin(), tui::export::Selection::All, dir.path()).unwrap();
    let (v, doc) = read_export(&path);
    assert_eq!(v["source"]["complete"], false);
    assert!(!doc.loss.complete);
    assert_eq!(doc.capture.end_ns, Some(app.snapshot.now.0));
    assert!(doc.capture.start_ns.is_some_and(|s| s <= mid.0));
}

#[test]
fn export_into_a_missing_directory_is_an_error_not_a_panic() {
    let app = scenario("w1-driver-inflight", 3, None);
    let dir = tempfile::tempdir().unwrap();
    let err = tui::export::export(
        &app,
        &w1_origin(),
        tui::export::Selection::All,
        &dir.path().join("no/such/dir"),
    )
    .unwrap_err();
    assert!(err.to_string().contains("cannot write"), "{err}");
}

// ----- end to end: the real binary in a real terminal (tmux) --------------------------------

/// A tmux server of the test's own (its socket in the test's temporary directory), so that
/// tests neither see nor touch anybody else's sessions; dropped, it kills that server.
struct Tmux {
    socket: std::path::PathBuf,
}

impl Tmux {
    fn available() -> bool {
        std::process::Command::new("tmux")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success())
    }

    fn run(&self, args: &[&str]) -> String {
        let o = std::process::Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux runs");
        assert!(
            o.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Starts `cmd` in a 120×40 pane of a new server whose socket is in `dir`.
    fn start(cmd: &str, dir: &std::path::Path) -> Tmux {
        let t = Tmux {
            socket: dir.join("tmux.sock"),
        };
        t.run(&[
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-s",
            "e2e",
            "-x",
            "120",
            "-y",
            "40",
            "-c",
            dir.to_str().unwrap(),
            cmd,
        ]);
        t
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "e2e"])
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "e2e"];
        args.extend_from_slice(keys);
        self.run(&args);
    }

    fn display(&self, fmt: &str) -> String {
        self.run(&["display-message", "-p", "-t", "e2e", fmt])
            .trim()
            .to_string()
    }

    /// Waits until the screen contains `what` (10 s at most).
    fn wait_for(&self, what: &str) -> String {
        let t0 = std::time::Instant::now();
        loop {
            let s = self.screen();
            if s.contains(what) {
                return s;
            }
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(10),
                "waited 10 s for {what:?}; the screen:\n{s}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = std::process::Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .arg("kill-server")
            .output();
    }
}

/// The shell command that runs `itewatch ARGS` in the pane: it writes itewatch's pid to
/// `DIR/pid` (the shell execs it), and after it exits its status to `DIR/exit` and the tty
/// settings to `DIR/stty`, then prints SHELL-BACK and stays on the screen. `env` goes before
/// the binary (`env VAR=value`); in `args`, `"$0"` is DIR. Its stderr goes to `DIR/stderr`, or
/// with `stderr_to_pane` to the terminal.
fn pane_command(dir: &std::path::Path, env: &str, args: &str, stderr_to_pane: bool) -> String {
    let bin = env!("CARGO_BIN_EXE_itewatch");
    let d = dir.display();
    let redirect = if stderr_to_pane {
        String::new()
    } else {
        format!(" 2> '{d}/stderr'")
    };
    format!(
        "sh -c 'echo $$ > \"$0/pid\"; exec {env} \"$1\" {args}' '{d}' '{bin}'{redirect}; \
         echo $? > '{d}/exit'; stty -a > '{d}/stty'; printf 'SHELL-BACK\\n'; sleep 60"
    )
}

/// After itewatch exited: its status, and the terminal back to normal (main screen, cursor
/// shown, cooked mode with echo and signals).
fn assert_terminal_restored(t: &Tmux, dir: &std::path::Path, want_exit: &str) {
    t.wait_for("SHELL-BACK");
    let exit = std::fs::read_to_string(dir.join("exit")).unwrap();
    let stderr = std::fs::read_to_string(dir.join("stderr")).unwrap_or_else(|_| t.screen());
    assert_eq!(exit.trim(), want_exit, "stderr: {stderr}");
    assert_eq!(
        t.display("#{alternate_on}"),
        "0",
        "left the alternate screen"
    );
    assert_eq!(t.display("#{cursor_flag}"), "1", "cursor visible again");
    let stty = std::fs::read_to_string(dir.join("stty")).unwrap();
    for flag in ["icanon", "echo", "isig", "icrnl", "opost"] {
        assert!(
            stty.split_whitespace().any(|w| w == flag),
            "tty flag {flag} not restored: {stty}"
        );
    }
}

#[test]
fn e2e_navigate_export_quit_restores_the_terminal() {
    if !Tmux::available() {
        eprintln!("SKIPPED: tmux is not installed (scripts/setup.sh installs it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cmd = pane_command(
        dir.path(),
        "",
        r#"live --simulate w1-driver-inflight --seed 3 --export-dir "$0""#,
        false,
    );
    let t = Tmux::start(&cmd, dir.path());
    t.wait_for("stream ended");
    assert_eq!(
        t.display("#{alternate_on}"),
        "1",
        "the view uses the alternate screen"
    );
    t.keys(&["Tab", "Tab"]);
    t.wait_for("Incidents (2) [sort: time]");
    t.keys(&["Enter"]);
    t.wait_for("case 1 of the ITE thread");
    t.keys(&["e"]);
    let s = t.wait_for("exported incident");
    assert!(s.contains("itewatch-incident-"), "{s}");
    t.keys(&["Escape"]);
    t.wait_for("In-flight invalidations");
    t.keys(&["q"]);
    assert_terminal_restored(&t, dir.path(), "0");

    // The exported report: one W1 incident, in the report document's schema.
    let exported: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("itewatch-incident-")
        })
        .collect();
    assert_eq!(exported.len(), 1, "{exported:?}");
    let (v, doc) = read_export(&exported[0]);
    assert_eq!(v["schema_version"], itewatch::document::SCHEMA_VERSION);
    assert_eq!(doc.incidents.len(), 1);
    assert_eq!(v["incidents"][0]["kind"], "inflight-across-disconnect");
    assert_eq!(v["incidents"][0]["window"], "W1");
    assert_eq!(v["source"]["scenario"], "w1-driver-inflight");
    assert_eq!(v["source"]["seed"], 3);
}

/// Regression: a bad `--export-dir` was found only when `e` was pressed, after the session it
/// was meant to save. Now the view refuses to start, naming the directory.
#[test]
fn e2e_an_unwritable_export_dir_is_refused_at_start() {
    if !Tmux::available() {
        eprintln!("SKIPPED: tmux is not installed (scripts/setup.sh installs it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cmd = pane_command(
        dir.path(),
        "",
        r#"live --simulate w1-driver-inflight --export-dir "$0/no-such-dir""#,
        false,
    );
    let t = Tmux::start(&cmd, dir.path());
    assert_terminal_restored(&t, dir.path(), "1");
    let stderr = std::fs::read_to_string(dir.path().join("stderr")).unwrap();
    assert!(
        stderr.contains("--export-dir") && stderr.contains("no-such-dir"),
        "{stderr}"
    );
    assert!(!t.screen().contains("In-flight invalidations"));
}

/// SIGTERM, SIGHUP and SIGINT end the view the way `q` does: the loop returns, the guards drop
/// (terminal, and live the BPF stats fd and the probes), exit status 0.
#[test]
fn e2e_signals_restore_the_terminal() {
    if !Tmux::available() {
        eprintln!("SKIPPED: tmux is not installed (scripts/setup.sh installs it)");
        return;
    }
    for (name, sig) in [
        ("sigterm", libc::SIGTERM),
        ("sighup", libc::SIGHUP),
        ("sigint", libc::SIGINT),
    ] {
        let dir = tempfile::tempdir().unwrap();
        // The endless stream: the view is still running when the signal arrives.
        let cmd = pane_command(dir.path(), "", "live --simulate soak --speed 0.01", false);
        let t = Tmux::start(&cmd, dir.path());
        t.wait_for("▶ running");
        assert_eq!(t.display("#{alternate_on}"), "1", "{name}");
        let pid: libc::pid_t = std::fs::read_to_string(dir.path().join("pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SAFETY: kill(2) with a pid this test's pane started (the shell exec'd itewatch).
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "{name}");
        assert_terminal_restored(&t, dir.path(), "0");
    }
}

/// A panic: the hook restores the terminal before the message prints, so the message is on
/// the main screen after the exit (printed on the alternate screen, it would vanish with it).
/// The panic is injected by a test-only environment variable (the view has no panic to
/// trigger otherwise).
#[test]
fn e2e_panic_restores_the_terminal() {
    if !Tmux::available() {
        eprintln!("SKIPPED: tmux is not installed (scripts/setup.sh installs it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cmd = pane_command(
        dir.path(),
        "env ITEWATCH_TEST_PANIC_AFTER_FRAMES=3",
        "live --simulate soak --speed 0.01",
        true,
    );
    let t = Tmux::start(&cmd, dir.path());
    assert_terminal_restored(&t, dir.path(), "101");
    let screen = t.screen();
    assert!(screen.contains("injected panic"), "{screen}");
    assert!(!screen.contains("In-flight invalidations"), "{screen}");
}

/// Whether process `pid` has ended (gone, or a zombie waiting for its reaper).
fn exited(pid: libc::pid_t) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// The terminal goes away without SIGHUP reaching the view: the pane's shell, the session
/// leader, gets the hang-up and the view (its child) gets nothing, as when an ssh session
/// drops or a tmux server dies. The view must notice the dead terminal and exit; crossterm's
/// reader alone spins on it at 100 % CPU forever, deaf even to SIGTERM (crossterm#793).
#[test]
fn e2e_a_vanished_terminal_ends_the_view() {
    if !Tmux::available() {
        eprintln!("SKIPPED: tmux is not installed (scripts/setup.sh installs it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cmd = pane_command(dir.path(), "", "live --simulate soak --speed 0.01", false);
    let t = Tmux::start(&cmd, dir.path());
    t.wait_for("▶ running");
    let pid: libc::pid_t = std::fs::read_to_string(dir.path().join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    t.run(&["kill-server"]);
    let t0 = std::time::Instant::now();
    while !exited(pid) && t0.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let gone = exited(pid);
    if !gone {
        // SAFETY: kill(2) on the pid this test's pane started, so that it does not outlive us.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    assert!(
        gone,
        "itewatch live still runs 10 s after its terminal went away"
    );
}

/// A terminal that reports no size (a serial line nobody ran `stty rows/cols` on, as the VM's
/// ttyS1 was at first): the view draws 80×24 instead of nothing. A pty opened with no window
/// size stands in for it.
#[test]
fn a_terminal_without_a_size_gets_80x24() {
    use std::io::Read;
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two new fds into `master` and `slave`; the null name, termios and
    // winsize pointers leave the name unwritten and the size 0×0.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just opened by openpty and are owned by nothing else.
    let (mut master, slave) = unsafe {
        (
            std::fs::File::from_raw_fd(master),
            std::fs::File::from_raw_fd(slave),
        )
    };
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_itewatch"))
        .args(["live", "--simulate", "w1-driver-inflight", "--seed", "3"])
        .args(["--exit-after", "2", "--fps", "4"])
        .env("TERM", "xterm")
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(slave);
    // Read the screen while it runs (a full pty would block the view); EIO once it is gone.
    let reader = std::thread::spawn(move || {
        let mut screen = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            screen.extend_from_slice(&buf[..n]);
        }
        screen
    });
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{status}: {err}");
    let screen = String::from_utf8_lossy(&reader.join().unwrap()).into_owned();
    assert!(
        screen.contains("In-flight invalidations"),
        "nothing drawn: {screen:?}"
    );
    // Every cursor move (ESC [ row ; col H) stays inside 24 rows and 80 columns.
    let mut moves = 0;
    for part in screen.split("\x1b[").skip(1) {
        let Some(end) = part.find(|c: char| c.is_ascii_alphabetic()) else {
            continue;
        };
        if part.as_bytes()[end] != b'H' {
            continue;
        }
        let mut it = part[..end]
            .split(';')
            .map(|n| n.parse::<u32>().unwrap_or(0));
        let (row, col) = (it.next().unwrap_or(1), it.next().unwrap_or(1));
        assert!(row <= 24 && col <= 80, "cursor moved to {row};{col}");
        moves += 1;
    }
    assert!(moves > 20, "{moves} cursor moves");
}

/// Regression (issue: the bundled demo trace was a build-time path, and a host that cannot be
/// traced got the VM trace's W2 with exit 0, so a script booked it against the host): with
/// tracing impossible (a BTF file that does not exist), `live --no-tui` run away from the
/// source tree plays the recording embedded in the binary, says it is not this host, and exits
/// with its own status.
#[test]
fn a_host_that_cannot_be_traced_gets_the_embedded_recording_and_exit_3() {
    let dir = std::env::temp_dir();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_itewatch"))
        .args([
            "live",
            "--no-tui",
            "--btf",
            "/nonexistent/itewatch-test-vmlinux",
        ])
        .env_remove("ITEWATCH_FALLBACK_TRACE")
        .current_dir(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(itewatch::tui::EXIT_NOT_THIS_HOST.into()),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("cannot be traced live"), "{stdout}");
    assert!(stdout.contains("flush-to-gone-device"), "{stdout}");
    assert!(stdout.contains("NOT THIS HOST"), "{stdout}");
}
