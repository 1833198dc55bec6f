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
    let mut t = Terminal::new(TestBackend::new(W, H)).unwrap();
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
    let text = u.text();
    assert!(text.contains("sudo itewatch doctor"));
    assert!(text.contains("--replay"));
}

#[test]
fn export_writes_the_report_document() {
    let mut app = scenario("w1-driver-inflight", 3, None);
    app.apply(Action::FocusNext);
    app.apply(Action::FocusNext);
    let inc = app.selected_incident().unwrap().clone();
    let dir = tempfile::tempdir().unwrap();
    let src = itewatch::trace::Source::Simulated {
        scenario: "w1-driver-inflight".into(),
        seed: 3,
    };
    let path =
        tui::export::export(&app, &src, tui::export::Selection::One(&inc), dir.path()).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(v["schema"], itewatch::report::SCHEMA);
    assert_eq!(v["incidents"].as_array().unwrap().len(), 1);
    assert_eq!(v["incidents"][0]["id"], inc.id.to_string());
    let all = tui::export::export(&app, &src, tui::export::Selection::All, dir.path()).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(all).unwrap()).unwrap();
    assert_eq!(
        v["incidents"].as_array().unwrap().len(),
        app.all_incidents().len()
    );
}

// ----- end to end: the real binary in a real terminal (tmux) --------------------------------

struct Tmux {
    session: String,
}

impl Tmux {
    fn available() -> bool {
        std::process::Command::new("tmux")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success())
    }

    fn run(args: &[&str]) -> String {
        let o = std::process::Command::new("tmux")
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

    fn start(cmd: &str, dir: &std::path::Path) -> Tmux {
        let session = format!("itewatch-e2e-{}", std::process::id());
        Self::run(&[
            "new-session",
            "-d",
            "-s",
            &session,
            "-x",
            "120",
            "-y",
            "40",
            "-c",
            dir.to_str().unwrap(),
            cmd,
        ]);
        Tmux { session }
    }

    fn screen(&self) -> String {
        Self::run(&["capture-pane", "-p", "-t", &self.session])
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", &self.session];
        args.extend_from_slice(keys);
        Self::run(&args);
    }

    fn display(&self, fmt: &str) -> String {
        Self::run(&["display-message", "-p", "-t", &self.session, fmt])
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
            .args(["kill-session", "-t", &self.session])
            .output();
    }
}

#[test]
fn e2e_navigate_export_quit_restores_the_terminal() {
    if !Tmux::available() {
        eprintln!("SKIPPED: tmux is not installed (scripts/setup.sh installs it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_itewatch");
    // After itewatch exits, record its status and the tty settings, then stay on the screen.
    let cmd = format!(
        "'{bin}' live --simulate w1-driver-inflight --seed 3 --export-dir '{d}'; \
         echo $? > '{d}/exit'; stty -a > '{d}/stty'; printf 'SHELL-BACK\\n'; sleep 60",
        d = dir.path().display()
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
    t.wait_for("SHELL-BACK");

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
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&exported[0]).unwrap()).unwrap();
    assert_eq!(v["schema"], itewatch::report::SCHEMA);
    assert_eq!(v["incidents"][0]["kind"], "inflight-across-disconnect");
    assert_eq!(v["incidents"][0]["window"], "W1");
    assert_eq!(v["source"]["scenario"], "w1-driver-inflight");

    // The terminal is restored: exit 0, main screen, cursor shown, cooked mode with echo.
    let exit = std::fs::read_to_string(dir.path().join("exit")).unwrap();
    assert_eq!(exit.trim(), "0");
    assert_eq!(
        t.display("#{alternate_on}"),
        "0",
        "left the alternate screen"
    );
    assert_eq!(t.display("#{cursor_flag}"), "1", "cursor visible again");
    let stty = std::fs::read_to_string(dir.path().join("stty")).unwrap();
    for flag in ["icanon", "echo", "isig"] {
        assert!(
            stty.split_whitespace().any(|w| w == flag),
            "tty flag {flag} not restored: {stty}"
        );
    }
}
