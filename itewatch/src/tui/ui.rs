//! Rendering: pure functions from [`App`] to a ratatui frame. No I/O, no clock: the same state
//! draws the same screen (the snapshot tests rely on it).

use ratatui::layout::{Alignment, Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span, Text};
use ratatui::widgets::{Block, Cell, Clear, Paragraph, Row, Table, TableState, Wrap};
use ratatui::Frame;

use crate::correlate::incident::{FixStatus, Incident, Outcome, Severity};
use crate::correlate::Config;
use crate::event::CallerPath;

use super::input::KEYS;
use super::lanes::lanes;
use super::metrics::{
    age_bar, age_level, bucket_label, fmt_count, fmt_ns, log_height, sparkline, AgeLevel,
    LogHistogram,
};
use super::state::{device_state, App, Panel};

const DIM: Style = Style::new().fg(Color::DarkGray);
const BOLD: Style = Style::new().add_modifier(Modifier::BOLD);
const RED: Style = Style::new().fg(Color::Red).add_modifier(Modifier::BOLD);
const YELLOW: Style = Style::new().fg(Color::Yellow);
const GREEN: Style = Style::new().fg(Color::Green);
const SELECTED: Style = Style::new().add_modifier(Modifier::REVERSED);

fn severity_style(s: Severity) -> Style {
    match s {
        Severity::Critical => RED,
        Severity::Warning => YELLOW.add_modifier(Modifier::BOLD),
        Severity::Latent => Style::new().fg(Color::Magenta),
        Severity::Info => DIM,
    }
}

fn age_style(l: AgeLevel) -> Style {
    match l {
        AgeLevel::Ok => GREEN,
        AgeLevel::Warn => YELLOW.add_modifier(Modifier::BOLD),
        AgeLevel::Critical => RED,
    }
}

/// `driver-unmap`, `removal`, ...
pub fn caller_name(c: CallerPath) -> &'static str {
    match c {
        CallerPath::DriverUnmap => "driver-unmap",
        CallerPath::FlushQueue => "flush-queue",
        CallerPath::Removal => "removal",
        CallerPath::DriverTeardown => "driver-teardown",
        CallerPath::DomainChange => "domain-change",
        CallerPath::Other => "other",
        CallerPath::Unknown => "unknown",
    }
}

fn outcome_text(o: &Outcome) -> String {
    match o {
        Outcome::Aborted { latency_ns, ret } | Outcome::Failed { latency_ns, ret } => {
            format!("{} {} ({ret})", o.name(), fmt_ns(*latency_ns))
        }
        _ => match o.duration_ns() {
            Some(d) => format!("{} {}", o.name(), fmt_ns(d)),
            None => o.name().to_string(),
        },
    }
}

fn panel_block(app: &App, p: Panel, title: String) -> Block<'static> {
    let focused = app.focus == p && app.detail.is_none();
    let style = if focused {
        Style::new().fg(Color::Cyan)
    } else {
        Style::new()
    };
    Block::bordered().border_style(style).title(Span::styled(
        title,
        if focused { BOLD } else { Style::new() },
    ))
}

fn sort_suffix(app: &App, p: Panel) -> String {
    let i = Panel::ALL.iter().position(|x| *x == p).unwrap_or(0);
    let sorts = p.sorts();
    if sorts.len() > 1 {
        format!(" [sort: {}]", sorts[app.views[i].sort.min(sorts.len() - 1)])
    } else {
        String::new()
    }
}

/// Heights of the main view's panels (rows, borders included); 0 = not drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PanelHeights {
    pub inflight: u16,
    pub devices: u16,
    pub incidents: u16,
    pub histogram: u16,
}

/// A table panel's borders and column header.
const TABLE_CHROME: u16 = 3;
const HISTOGRAM_H: u16 = 9;

/// Splits `avail` rows among the panels. Where everything fits (120x40 and up, usually
/// 100x30), the full layout: in flight sized to its rows, devices and incidents sharing the
/// middle, the histogram. Where it does not, by priority: incidents, then what is in flight,
/// then devices get rows (at least one each, a panel title with no row under it says
/// nothing), and the histogram only if all of it fits; spare rows go to devices, then
/// incidents. Pure, so the policy is tested without a terminal.
pub fn panel_heights(
    avail: u16,
    inflight: usize,
    devices: usize,
    incidents: usize,
) -> PanelHeights {
    let want = |n: usize, cap: usize| TABLE_CHROME + n.clamp(1, cap) as u16;
    let inflight_h = want(inflight, 6);
    // Full layout: the middle gives devices and incidents two rows each at least.
    if avail >= inflight_h + HISTOGRAM_H + 2 * (TABLE_CHROME + 2) {
        let middle = avail - inflight_h - HISTOGRAM_H;
        return PanelHeights {
            inflight: inflight_h,
            devices: middle / 2,
            incidents: middle - middle / 2,
            histogram: HISTOGRAM_H,
        };
    }
    let mut left = avail;
    let mut take = |h: u16| {
        let h = if h <= left { h } else { 0 };
        left -= h;
        h
    };
    let mut incidents_h = take(want(incidents, 6).min(avail));
    let inflight_h = take(want(inflight, 3));
    let mut devices_h = take(TABLE_CHROME + 1);
    let histogram = take(HISTOGRAM_H);
    if devices_h > 0 {
        let more = (want(devices, usize::MAX) - devices_h).min(left);
        devices_h += more;
        left -= more;
    }
    incidents_h += left;
    PanelHeights {
        inflight: inflight_h,
        devices: devices_h,
        incidents: incidents_h,
        histogram,
    }
}

/// Draws the whole screen.
pub fn draw(f: &mut Frame<'_>, app: &App) {
    let area = f.area();
    let banner_h = banner_height(app);
    let avail = area.height.saturating_sub(4 + banner_h + 1);
    let h = panel_heights(
        avail,
        app.inflight_rows().len(),
        app.device_rows().len(),
        app.incident_rows().len(),
    );
    let [head, banner, infl, dev, inc, hist, foot] = Layout::vertical([
        Constraint::Length(4),
        Constraint::Length(banner_h),
        Constraint::Length(h.inflight),
        Constraint::Length(h.devices),
        Constraint::Length(h.incidents),
        Constraint::Length(h.histogram),
        Constraint::Length(1),
    ])
    .areas(area);
    draw_header(f, app, head);
    draw_banner(f, app, banner);
    for (height, a, draw) in [
        (
            h.inflight,
            infl,
            draw_inflight as fn(&mut Frame<'_>, &App, Rect),
        ),
        (h.devices, dev, draw_devices),
        (h.incidents, inc, draw_incidents),
        (h.histogram, hist, draw_histogram),
    ] {
        if height > 0 {
            draw(f, app, a);
        }
    }
    draw_footer(f, app, foot);
    if let Some((id, scroll)) = &app.detail {
        if let Some(inc) = app.incident(id) {
            let r = Rect {
                x: area.x,
                y: area.y + 4,
                width: area.width,
                height: area.height.saturating_sub(5),
            };
            f.render_widget(Clear, r);
            draw_detail(f, inc, *scroll, r);
        }
    }
    if app.help {
        draw_help(f, area);
    }
}

fn probe_summary(app: &App) -> String {
    let p = &app.header.probes;
    if p.is_empty() {
        return "probes: n/a (not live)".into();
    }
    let attached = p.iter().filter(|x| x.mechanism.is_some()).count();
    let fell: Vec<&str> = p
        .iter()
        .filter(|x| x.state == "fell-back")
        .map(|x| x.name.as_str())
        .collect();
    let missing: Vec<&str> = p
        .iter()
        .filter(|x| x.mechanism.is_none())
        .map(|x| x.name.as_str())
        .collect();
    let mut s = format!("probes {attached}/{} attached", p.len());
    if !fell.is_empty() {
        s.push_str(&format!("; fell back: {}", fell.join(", ")));
    }
    if !missing.is_empty() {
        s.push_str(&format!("; missing: {}", missing.join(", ")));
    }
    s
}

fn draw_header(f: &mut Frame<'_>, app: &App, area: Rect) {
    let h = &app.header;
    let sep = Span::styled(" │ ", DIM);
    let iommus: Vec<&str> = h.iommus.iter().map(String::as_str).collect();
    let l1 = Line::from(vec![
        Span::styled("itewatch", BOLD.fg(Color::Cyan)),
        Span::raw(" "),
        Span::raw(h.source.clone()),
        sep.clone(),
        Span::raw(format!("host {}", or_dash(&h.host))),
        sep.clone(),
        Span::raw(format!("kernel {}", or_dash(&h.kernel))),
        sep.clone(),
        Span::raw(format!(
            "IOMMU {}",
            if iommus.is_empty() {
                "-".to_string()
            } else {
                iommus.join(" ")
            }
        )),
    ]);
    let l_probes = Line::raw(probe_summary(app));
    let s = &app.snapshot.stats;
    let lost = app.lost_ringbuf + app.undecodable;
    let lost_style = if lost + app.missed > 0 {
        RED
    } else {
        Style::new()
    };
    let bpf = match (app.meters.bpf, app.meters.recorded_bpf) {
        (Some(c), _) => format!(
            "BPF {:.0} ns/run, {:.2}% of a CPU",
            c.ns_per_run, c.cpu_percent
        ),
        (None, Some(c)) => format!(
            "BPF (recorded) {:.0} ns/run, {:.2}% of a CPU",
            c.ns_per_run, c.cpu_percent
        ),
        (None, None) => "BPF cost n/a".into(),
    };
    let state = if app.ended {
        Span::styled("■ stream ended", YELLOW)
    } else if app.paused {
        Span::styled("⏸ paused", YELLOW)
    } else {
        Span::styled("▶ running", GREEN)
    };
    let l2 = Line::from(vec![
        Span::raw(format!(
            "events {}/s ({} total, {} submissions)",
            fmt_count(app.meters.events_per_s.round() as u64),
            fmt_count(app.events),
            fmt_count(s.submissions)
        )),
        sep.clone(),
        Span::styled(
            format!(
                "lost {} · missed {}",
                fmt_count(lost),
                fmt_count(app.missed)
            ),
            lost_style,
        ),
        sep.clone(),
        Span::raw(bpf),
        sep.clone(),
        Span::raw(format!("t={}", app.snapshot.now)),
        sep,
        state,
    ]);
    f.render_widget(
        Paragraph::new(vec![l1, l_probes, l2])
            .block(Block::new().borders(ratatui::widgets::Borders::BOTTOM)),
        area,
    );
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

fn banner_height(app: &App) -> u16 {
    let hung = app
        .worst_inflight()
        .and_then(|w| w.outcome.duration_ns())
        .is_some_and(|d| age_level(d, &app.cfg) != AgeLevel::Ok);
    u16::from(hung) + u16::from(app.header.warning.is_some())
}

fn draw_banner(f: &mut Frame<'_>, app: &App, area: Rect) {
    let mut lines = Vec::new();
    if let Some(w) = &app.header.warning {
        lines.push(Line::styled(
            format!(" ⚠ {w}"),
            YELLOW.add_modifier(Modifier::BOLD),
        ));
    }
    if let Some(w) = app.worst_inflight() {
        let d = w.outcome.duration_ns().unwrap_or(0);
        if age_level(d, &app.cfg) != AgeLevel::Ok {
            let sids: Vec<String> = w.dev_tlb_sids.iter().map(|s| s.to_string()).collect();
            lines.push(Line::styled(
                // The device and the age first: on a narrow terminal the line is cut at the
                // right, and those are what the reader must not lose.
                format!(
                    " ⚠ HUNG INVALIDATION: SID {} outstanding {} · qi_submit_sync on {} CPU{} ({}[{}], {})",
                    if sids.is_empty() { "-".into() } else { sids.join(",") },
                    fmt_ns(d),
                    w.iommu,
                    w.cpu,
                    w.task,
                    w.tid,
                    caller_name(w.caller),
                ),
                RED.add_modifier(Modifier::REVERSED),
            ));
        }
    }
    f.render_widget(Paragraph::new(lines), area);
}

fn draw_inflight(f: &mut Frame<'_>, app: &App, area: Rect) {
    let rows = app.inflight_rows();
    let worst = rows
        .iter()
        .map(|r| age_level(r.age_ns, &app.cfg))
        .max()
        .unwrap_or(AgeLevel::Ok);
    let title = format!(
        " In-flight invalidations ({}){} ",
        rows.len(),
        sort_suffix(app, Panel::InFlight)
    );
    let mut block = panel_block(app, Panel::InFlight, title);
    if worst != AgeLevel::Ok {
        block = block.border_style(age_style(worst));
    }
    // (width, priority): what a narrow terminal drops first has the highest number.
    const COLS: [(Option<u16>, u8); 8] = [
        (Some(10), 0),
        (Some(12), 3),
        (Some(6), 2),
        (Some(3), 1),
        (Some(20), 1),
        (None, 0),
        (Some(16), 4),
        (Some(13), 2),
    ];
    let mask = fit_columns(&COLS, area.width.saturating_sub(2), 16);
    let header = Row::new(kept(
        [
            "AGE",
            "",
            "IOMMU",
            "CPU",
            "TASK",
            "SIDs → DEVICES",
            "DESCRIPTORS",
            "CALLER",
        ],
        &mask,
    ))
    .style(BOLD);
    let table_rows: Vec<Row<'_>> = rows
        .iter()
        .map(|r| {
            let lvl = age_level(r.age_ns, &app.cfg);
            let devs: Vec<String> = r
                .devices
                .iter()
                .map(|(sid, d)| match d {
                    Some(d) => format!(
                        "{sid}→{}{}",
                        d.device.bdf.map(|b| b.to_string()).unwrap_or("?".into()),
                        d.device
                            .driver
                            .as_deref()
                            .map(|x| format!(" {x}"))
                            .unwrap_or_default()
                    ),
                    None => format!("{sid}→?"),
                })
                .collect();
            Row::new(kept(
                [
                    Cell::from(fmt_ns(r.age_ns)).style(age_style(lvl)),
                    Cell::from(age_bar(r.age_ns, app.cfg.hung_crit_ns, 12)).style(age_style(lvl)),
                    Cell::from(r.sub.iommu.clone()),
                    Cell::from(r.sub.cpu.to_string()),
                    Cell::from(format!("{}[{}]", r.sub.task, r.sub.tid)),
                    Cell::from(if devs.is_empty() {
                        "(no device-TLB)".to_string()
                    } else {
                        devs.join(", ")
                    }),
                    Cell::from(
                        r.kinds
                            .map(|k| k.label())
                            .unwrap_or_else(|| format!("{} desc", r.sub.descriptors)),
                    ),
                    Cell::from(caller_name(r.sub.caller)),
                ],
                &mask,
            ))
        })
        .collect();
    let widths = constraints(&kept(COLS, &mask));
    let empty = table_rows.is_empty();
    let mut state = table_state(app, Panel::InFlight, rows.len());
    f.render_stateful_widget(
        Table::new(table_rows, widths)
            .header(header)
            .block(block)
            .row_highlight_style(SELECTED),
        area,
        &mut state,
    );
    if empty {
        empty_message(f, area, "no invalidation in flight");
    }
}

/// Which columns of a table fit in `width` (inside the borders). Columns are `(width,
/// priority)`, `None` for the one that fills; the lowest priority (highest number) goes
/// first until the fixed widths, a space between columns and `fill_min` for the filling
/// column fit. A narrow terminal loses whole columns, in an order chosen per panel, instead
/// of having every column squeezed (and the filling one, often the device, vanish).
pub fn fit_columns(cols: &[(Option<u16>, u8)], width: u16, fill_min: u16) -> Vec<bool> {
    let mut keep = vec![true; cols.len()];
    let need = |keep: &[bool]| -> u32 {
        let n = keep.iter().filter(|k| **k).count() as u32;
        let widths: u32 = cols
            .iter()
            .zip(keep)
            .filter(|(_, k)| **k)
            .map(|((w, _), _)| u32::from(w.unwrap_or(fill_min)))
            .sum();
        widths + n.saturating_sub(1)
    };
    while need(&keep) > u32::from(width) {
        let drop = cols
            .iter()
            .enumerate()
            .filter(|(i, (_, p))| keep[*i] && *p > 0)
            .max_by_key(|(i, (_, p))| (*p, *i));
        match drop {
            Some((i, _)) => keep[i] = false,
            None => break,
        }
    }
    keep
}

/// The kept items of `v` (by [`fit_columns`]' mask).
fn kept<T>(v: impl IntoIterator<Item = T>, mask: &[bool]) -> Vec<T> {
    v.into_iter()
        .zip(mask)
        .filter(|(_, k)| **k)
        .map(|(x, _)| x)
        .collect()
}

fn constraints(cols: &[(Option<u16>, u8)]) -> Vec<Constraint> {
    cols.iter()
        .map(|(w, _)| w.map_or(Constraint::Fill(1), Constraint::Length))
        .collect()
}

fn table_state(app: &App, p: Panel, n: usize) -> TableState {
    let i = Panel::ALL.iter().position(|x| *x == p).unwrap_or(0);
    let sel = if app.focus == p && n > 0 && app.detail.is_none() {
        Some(app.views[i].selected)
    } else {
        None
    };
    TableState::default().with_selected(sel)
}

fn draw_devices(f: &mut Frame<'_>, app: &App, area: Rect) {
    let rows = app.device_rows();
    let title = format!(
        " Devices and slots ({}){} ",
        rows.len(),
        sort_suffix(app, Panel::Devices)
    );
    const COLS: [(Option<u16>, u8); 11] = [
        (Some(12), 0),
        (Some(7), 4),
        (Some(12), 0),
        (Some(12), 1),
        (None, 2),
        (Some(6), 3),
        (Some(24), 5),
        (Some(9), 1),
        (Some(9), 2),
        (Some(6), 3),
        (Some(4), 2),
    ];
    let mask = fit_columns(&COLS, area.width.saturating_sub(2), 6);
    let header = Row::new(kept(
        [
            "BDF",
            "SID",
            "STATE",
            "DRIVER",
            "SLOT",
            "IOMMU",
            "RECENT LATENCY",
            "LAST",
            "MAX",
            "N",
            "ERR",
        ],
        &mask,
    ))
    .style(BOLD);
    let table_rows: Vec<Row<'_>> = rows
        .iter()
        .map(|d| {
            let dv = &d.device;
            let st = dev_stats_for(app, dv.sid);
            let state = device_state(d);
            let state_style = match state {
                "present" => GREEN,
                "removing" => YELLOW,
                _ => RED,
            };
            let slot = dv
                .slot
                .as_deref()
                .map(|name| {
                    let removal = app
                        .snapshot
                        .slots
                        .iter()
                        .find(|s| s.name.as_deref() == Some(name) && s.removal_active)
                        .and_then(|s| s.removal)
                        .map(|r| match r {
                            crate::correlate::incident::RemovalKind::Safe => " safe-rm",
                            crate::correlate::incident::RemovalKind::Surprise => " surprise-rm",
                        })
                        .unwrap_or("");
                    format!("{name}{removal}")
                })
                .unwrap_or("-".into());
            let recent: Vec<u64> = st
                .map(|s| s.recent.iter().copied().collect())
                .unwrap_or_default();
            Row::new(kept(
                [
                    Cell::from(
                        dv.bdf
                            .map(|b| b.to_string())
                            .or(dv.sid.map(|s| s.to_string()))
                            .unwrap_or("?".into()),
                    ),
                    Cell::from(dv.sid.map(|s| s.to_string()).unwrap_or("-".into())),
                    Cell::from(state).style(state_style),
                    Cell::from(dv.driver.clone().unwrap_or("-".into())),
                    Cell::from(slot),
                    Cell::from(dv.iommu.clone().unwrap_or("-".into())),
                    Cell::from(sparkline(&recent, super::state::RECENT)),
                    Cell::from(recent.last().map(|x| fmt_ns(*x)).unwrap_or("-".into())),
                    Cell::from(st.map(|s| fmt_ns(s.max_ns)).unwrap_or("-".into())),
                    Cell::from(st.map(|s| fmt_count(s.count)).unwrap_or("0".into())),
                    Cell::from(st.map(|s| s.errors.to_string()).unwrap_or("0".into())).style(
                        if st.is_some_and(|s| s.errors > 0) {
                            RED
                        } else {
                            Style::new()
                        },
                    ),
                ],
                &mask,
            ))
        })
        .collect();
    let widths = constraints(&kept(COLS, &mask));
    let empty = table_rows.is_empty();
    let mut state = table_state(app, Panel::Devices, rows.len());
    f.render_stateful_widget(
        Table::new(table_rows, widths)
            .header(header)
            .block(panel_block(app, Panel::Devices, title))
            .row_highlight_style(SELECTED),
        area,
        &mut state,
    );
    if empty {
        empty_message(f, area, "no ATS device or hot-plug slot seen yet");
    }
}

fn dev_stats_for(app: &App, sid: Option<crate::event::Sid>) -> Option<&super::state::DevStats> {
    sid.and_then(|s| app.dev_stats.get(&s))
}

fn device_label(i: &Incident) -> String {
    let d = &i.device;
    let mut s = match (d.bdf, d.sid) {
        (Some(b), _) => b.to_string(),
        (None, Some(s)) => format!("SID {s}"),
        (None, None) => "no device".into(),
    };
    if let Some(drv) = &d.driver {
        s.push(' ');
        s.push_str(drv);
    }
    if d.inferred {
        // A guess is never shown as known.
        s = format!("{s}? (inferred)");
    }
    s
}

fn kind_label(i: &Incident) -> String {
    match i.window {
        Some(w) => format!("{w:?} {}", i.kind),
        None => i.kind.to_string(),
    }
}

fn draw_incidents(f: &mut Frame<'_>, app: &App, area: Rect) {
    let rows = app.incident_rows();
    let title = format!(
        " Incidents ({}){} ",
        rows.len(),
        sort_suffix(app, Panel::Incidents)
    );
    const COLS: [(Option<u16>, u8); 6] = [
        (Some(9), 0),
        (Some(29), 0),
        (None, 0),
        (Some(6), 3),
        (Some(13), 2),
        (Some(24), 1),
    ];
    let mask = fit_columns(&COLS, area.width.saturating_sub(2), 12);
    let header = Row::new(kept(
        ["SEVERITY", "KIND", "DEVICE", "SLOT", "START", "OUTCOME"],
        &mask,
    ))
    .style(BOLD);
    let table_rows: Vec<Row<'_>> = rows
        .iter()
        .map(|i| {
            Row::new(kept(
                [
                    Cell::from(format!("{}{}", i.severity, if i.closed { "" } else { "*" }))
                        .style(severity_style(i.severity)),
                    Cell::from(kind_label(i)),
                    Cell::from(device_label(i)),
                    Cell::from(i.device.slot.clone().unwrap_or("-".into())),
                    Cell::from(i.start.to_string()),
                    Cell::from(match (&i.outcome, app.live_age(i)) {
                        (Some(Outcome::InFlight { .. }), Some(age)) => {
                            format!("in-flight {}", fmt_ns(age))
                        }
                        (o, _) => o.as_ref().map(outcome_text).unwrap_or("-".into()),
                    }),
                ],
                &mask,
            ))
        })
        .collect();
    let widths = constraints(&kept(COLS, &mask));
    let empty = table_rows.is_empty();
    let mut state = table_state(app, Panel::Incidents, rows.len());
    f.render_stateful_widget(
        Table::new(table_rows, widths)
            .header(header)
            .block(panel_block(app, Panel::Incidents, title))
            .row_highlight_style(SELECTED),
        area,
        &mut state,
    );
    if empty {
        empty_message(f, area, "no incident");
    }
}

/// The text lines of a log2 histogram `height` rows tall: bars (log-scaled counts, eighth
/// blocks), then the counts, then the bucket labels; 4 columns per bucket.
pub fn histogram_lines(h: &LogHistogram, width: usize, height: usize) -> Vec<String> {
    const EIGHTHS: [char; 9] = [' ', '▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let Some((first, last)) = h.span() else {
        return vec!["no completed submission yet".into()];
    };
    let bars = height.saturating_sub(2).max(1);
    let fit = (width / 4).max(1);
    let last = last.min(first + fit - 1);
    let max = h.counts[first..=last].iter().copied().max().unwrap_or(0);
    let top = (bars * 8) as u64;
    let heights: Vec<u64> = h.counts[first..=last]
        .iter()
        .map(|&c| log_height(c, max, top))
        .collect();
    let mut out = Vec::new();
    for row in (0..bars).rev() {
        let mut s = String::new();
        for &ht in &heights {
            let base = (row * 8) as u64;
            let fill = ht.saturating_sub(base).min(8) as usize;
            let ch = EIGHTHS[fill];
            s.push(ch);
            s.push(ch);
            s.push(ch);
            s.push(' ');
        }
        out.push(s.trim_end().to_string());
    }
    let counts: String = h.counts[first..=last]
        .iter()
        .map(|&c| {
            let t = if c == 0 {
                String::new()
            } else {
                short_count(c)
            };
            format!("{t:<4}")
        })
        .collect();
    out.push(counts.trim_end().to_string());
    let labels: String = (first..=last)
        .map(|i| format!("{:<4}", bucket_label(i)))
        .collect();
    out.push(labels.trim_end().to_string());
    out
}

/// At most 3 characters: `7`, `42`, `999`, `12k`, `3M`.
fn short_count(c: u64) -> String {
    if c < 1_000 {
        c.to_string()
    } else if c < 1_000_000 {
        format!("{}k", (c / 1_000).min(999))
    } else {
        format!("{}M", (c / 1_000_000).min(999))
    }
}

fn draw_histogram(f: &mut Frame<'_>, app: &App, area: Rect) {
    let units = app.histogram_units();
    let sel = app.views[3].selected.min(units.len().saturating_sub(1));
    let title = " qi_submit_sync latency per IOMMU (log2 buckets, log-scaled counts) ".to_string();
    let block = panel_block(app, Panel::Histogram, title);
    let inner = block.inner(area);
    f.render_widget(block, area);
    let [list, chart] =
        Layout::horizontal([Constraint::Length(32), Constraint::Fill(1)]).areas(inner);
    let mut lines = Vec::new();
    if units.is_empty() {
        lines.push(Line::styled("no IOMMU seen yet", DIM));
    }
    for (i, u) in units.iter().enumerate() {
        let h = app.histograms.get(*u);
        let text = format!(
            "{} {u:<6} n={:<6} max {:<9}",
            if i == sel { "▸" } else { " " },
            fmt_count(h.map_or(0, |h| h.total)),
            h.map(|h| fmt_ns(h.max_ns)).unwrap_or("-".into())
        );
        lines.push(if i == sel {
            Line::styled(text, BOLD)
        } else {
            Line::raw(text)
        });
    }
    f.render_widget(Paragraph::new(lines), list);
    let empty = LogHistogram::default();
    let h = units
        .get(sel)
        .and_then(|u| app.histograms.get(*u))
        .unwrap_or(&empty);
    let text: Vec<Line<'_>> = histogram_lines(h, chart.width as usize, chart.height as usize)
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            if i + 2 >= chart.height as usize {
                Line::styled(l, DIM)
            } else {
                Line::styled(l, Style::new().fg(Color::Cyan))
            }
        })
        .collect();
    f.render_widget(Paragraph::new(text), chart);
}

fn draw_footer(f: &mut Frame<'_>, app: &App, area: Rect) {
    let line = if app.filter_editing {
        Line::from(vec![
            Span::styled(" filter: /", BOLD),
            Span::raw(app.filter.clone()),
            Span::styled("▏", BOLD),
            Span::styled("  (Enter keep · Esc clear)", DIM),
        ])
    } else if let Some(s) = &app.status {
        Line::styled(format!(" {s}"), BOLD.fg(Color::Green))
    } else {
        let mut spans = vec![Span::styled(
            if app.detail.is_some() {
                " Esc back · ↑↓ scroll · e export this incident · p pause · q quit"
            } else {
                " q quit · ? help · Tab panels · ↑↓ select · Enter detail · / filter · s sort · p pause · e export"
            },
            DIM,
        )];
        if !app.filter.is_empty() {
            spans.push(Span::styled(format!("  filter: {}", app.filter), YELLOW));
        }
        Line::from(spans)
    };
    f.render_widget(Paragraph::new(line), area);
}

fn fix_status(s: FixStatus) -> (&'static str, Style) {
    match s {
        FixStatus::Missing => ("MISSING", RED),
        FixStatus::Present => ("present", GREEN),
        FixStatus::Related => ("related", DIM),
    }
}

/// The incident detail view: summary, per-CPU lanes, explanation and fixes.
pub fn draw_detail(f: &mut Frame<'_>, inc: &Incident, scroll: u16, area: Rect) {
    let title = Line::from(vec![
        Span::raw(" Incident "),
        Span::styled(inc.id.to_string(), BOLD),
        Span::raw(" · "),
        Span::styled(inc.severity.to_string(), severity_style(inc.severity)),
        Span::raw(format!(
            " · {}{} ",
            inc.kind,
            match (inc.window, inc.case()) {
                (Some(w), Some(c)) => format!(" ({w:?}, case {c} of the ITE thread)"),
                (Some(w), None) => format!(" ({w:?})"),
                _ => String::new(),
            }
        )),
    ]);
    let block = Block::bordered()
        .title(title)
        .border_style(Style::new().fg(Color::Cyan));
    let inner = block.inner(area);
    f.render_widget(block, area);

    let d = &inc.device;
    let mut summary = vec![Line::from(vec![
        Span::styled("device ", DIM),
        Span::raw(device_label(inc)),
        Span::styled("  SID ", DIM),
        Span::raw(d.sid.map(|s| s.to_string()).unwrap_or("-".into())),
        Span::styled("  slot ", DIM),
        Span::raw(d.slot.clone().unwrap_or("-".into())),
        Span::styled("  IOMMU ", DIM),
        Span::raw(d.iommu.clone().unwrap_or("-".into())),
        Span::styled("  state ", DIM),
        Span::raw(
            d.state
                .map(|s| format!("{s:?}").to_lowercase())
                .unwrap_or("-".into()),
        ),
        Span::styled("  removal ", DIM),
        Span::raw(
            inc.removal
                .map(|r| format!("{r:?}").to_lowercase())
                .unwrap_or("-".into()),
        ),
    ])];
    summary.push(Line::from(vec![
        Span::styled("time ", DIM),
        Span::raw(format!(
            "{} .. {} ({})",
            inc.start,
            inc.end,
            fmt_ns(inc.end.saturating_sub(inc.start))
        )),
        Span::styled("  outcome ", DIM),
        Span::raw(inc.outcome.as_ref().map(outcome_text).unwrap_or("-".into())),
        Span::styled("  submissions ", DIM),
        Span::raw(inc.submissions.len().to_string()),
        Span::raw(if inc.closed { "  closed" } else { "  open" }),
        if inc.partial {
            Span::styled(
                format!("  PARTIAL: {}", inc.partial_reasons.join("; ")),
                YELLOW,
            )
        } else {
            Span::raw("")
        },
    ]));

    let mut bottom: Vec<Line<'_>> = vec![Line::styled("Explanation", BOLD)];
    bottom.push(Line::raw(inc.explanation.clone()));
    if !inc.fixes.is_empty() {
        bottom.push(Line::styled("Upstream fixes", BOLD));
    }
    for fx in &inc.fixes {
        let (label, style) = fix_status(fx.status);
        bottom.push(Line::from(vec![
            Span::styled(format!(" {label:<8}"), style),
            Span::styled(format!("{} ", fx.commit), BOLD),
            Span::raw(fx.subject.clone()),
            Span::styled(format!("  [{}]", fx.landed), DIM),
        ]));
    }
    let w = inner.width.max(20) as usize;
    let wrapped: usize = bottom.iter().map(|l| l.width().div_ceil(w).max(1)).sum();
    let bottom_h = (wrapped as u16 + 1).min(inner.height / 2);
    let [sum_a, lanes_a, bottom_a] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Fill(1),
        Constraint::Length(bottom_h),
    ])
    .areas(inner);
    f.render_widget(Paragraph::new(summary), sum_a);
    f.render_widget(
        Paragraph::new(Text::from(bottom))
            .wrap(Wrap { trim: true })
            .block(Block::new().borders(ratatui::widgets::Borders::TOP)),
        bottom_a,
    );
    draw_lanes(f, inc, scroll, lanes_a);
}

fn truncate(s: &str, w: usize) -> String {
    if s.chars().count() <= w {
        s.to_string()
    } else if w == 0 {
        String::new()
    } else {
        let mut t: String = s.chars().take(w - 1).collect();
        t.push('…');
        t
    }
}

fn draw_lanes(f: &mut Frame<'_>, inc: &Incident, scroll: u16, area: Rect) {
    let time_w = 11usize;
    let max_lanes = ((area.width as usize).saturating_sub(time_w) / 28).clamp(1, 4);
    let l = lanes(&inc.timeline, inc.start, max_lanes);
    if l.rows.is_empty() {
        f.render_widget(Paragraph::new(Line::styled("(empty timeline)", DIM)), area);
        return;
    }
    let n = l.titles.len().max(1);
    let lane_w = ((area.width as usize).saturating_sub(time_w) / n).max(8);
    let cell = |lane: usize, text: &str| -> String {
        let mut s = String::new();
        for i in 0..n {
            let t = if i == lane { text } else { "" };
            s.push_str("│ ");
            s.push_str(&format!("{:<w$}", truncate(t, lane_w - 2), w = lane_w - 2));
        }
        s
    };
    let mut lines = Vec::new();
    let mut head = format!("{:>w$}", "+ms ", w = time_w);
    for t in &l.titles {
        head.push_str("│ ");
        head.push_str(&format!("{:<w$}", t, w = lane_w - 2));
    }
    let head_line = Line::styled(head, BOLD);
    for r in &l.rows {
        let important = r.head.starts_with("submit")
            || r.head.starts_with("device-disconnected")
            || r.head.starts_with("disconnect-walk")
            || r.detail.contains("Time-out")
            || r.head.starts_with("lost");
        let style = if important { BOLD } else { Style::new() };
        lines.push(Line::styled(
            format!(
                "{:>w$}{}",
                format!("{:.3} ", r.rel_ns as f64 / 1e6),
                cell(r.lane, &r.head),
                w = time_w
            ),
            style,
        ));
        lines.push(Line::styled(
            format!(
                "{:>w$}{}",
                "",
                cell(r.lane, &format!("  {}", r.detail)),
                w = time_w
            ),
            DIM,
        ));
    }
    if inc.timeline_omitted > 0 {
        lines.push(Line::styled(
            format!(
                "{:>w$}({} more events omitted)",
                "",
                inc.timeline_omitted,
                w = time_w
            ),
            DIM,
        ));
    }
    let [h, body] = Layout::vertical([Constraint::Length(1), Constraint::Fill(1)]).areas(area);
    f.render_widget(Paragraph::new(head_line), h);
    let max_scroll = (lines.len() as u16).saturating_sub(body.height);
    f.render_widget(
        Paragraph::new(lines).scroll((scroll.min(max_scroll), 0)),
        body,
    );
}

fn draw_help(f: &mut Frame<'_>, area: Rect) {
    let w = area.width.min(96);
    let h = (KEYS.len() as u16 + 6).min(area.height);
    let r = Rect {
        x: area.x + (area.width - w) / 2,
        y: area.y + (area.height - h) / 2,
        width: w,
        height: h,
    };
    let mut lines: Vec<Line<'_>> = KEYS
        .iter()
        .map(|(k, what)| {
            Line::from(vec![
                Span::styled(format!(" {k:<26}"), BOLD),
                Span::raw(*what),
            ])
        })
        .collect();
    lines.push(Line::raw(""));
    lines.push(Line::styled(
        " Age bars turn yellow at the hung threshold and red at the critical one.",
        DIM,
    ));
    lines.push(Line::styled(" Any key closes this help.", DIM));
    f.render_widget(Clear, r);
    f.render_widget(
        Paragraph::new(lines).block(
            Block::bordered()
                .title(" Keys ")
                .title_alignment(Alignment::Center),
        ),
        r,
    );
}

/// Why live tracing is not possible here, and what is shown instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unavailable {
    /// The loader's error, in one sentence.
    pub reason: String,
    /// Failing doctor checks: (name, detail).
    pub missing: Vec<(String, String)>,
    /// What will be shown instead (`the bundled trace recorded in the VM on 6.1`, ..).
    pub fallback: String,
}

impl Unavailable {
    /// The same explanation as plain text (for a pipe or CI).
    pub fn text(&self) -> String {
        let mut s = format!(
            "itewatch live: this host cannot be traced live.\n  why: {}\n",
            self.reason
        );
        if !self.missing.is_empty() {
            s.push_str("  missing (from itewatch doctor):\n");
            for (n, d) in &self.missing {
                s.push_str(&format!("    ✗ {n}: {d}\n"));
            }
        }
        s.push_str("  what to run: `sudo itewatch doctor` on a VT-d host for the full check, then `sudo itewatch live`;\n");
        s.push_str("  without VT-d: `itewatch live --replay TRACE` or `itewatch live --simulate SCENARIO` (`itewatch simulate --list`).\n");
        s.push_str(&format!("  showing instead: {}\n", self.fallback));
        s
    }
}

/// Rows `line` takes when wrapped to `width` (by characters; word wrapping may take a row
/// more, which the caller's budget leaves room for).
fn wrapped_rows(line: &Line<'_>, width: u16) -> u16 {
    (line.width() as u16).div_ceil(width.max(1)).max(1)
}

/// The one-screen explanation shown when live tracing is not possible.
pub fn draw_unavailable(f: &mut Frame<'_>, u: &Unavailable) {
    let area = f.area();
    let head = vec![
        Line::styled("This host cannot be traced live.", RED),
        Line::raw(""),
        Line::from(vec![
            Span::styled("Why: ", BOLD),
            Span::raw(u.reason.clone()),
        ]),
        Line::raw(""),
    ];
    let run = vec![
        Line::styled("What to run:", BOLD),
        Line::raw(
            "  sudo itewatch doctor          the full check of this host (privileges, BTF, probes, VT-d, ATS)",
        ),
        Line::raw("  sudo itewatch live            on a host with VT-d, kprobes and BTF"),
        Line::raw("  itewatch live --replay FILE   a trace recorded with `itewatch record`"),
        Line::raw(
            "  itewatch live --simulate w1-driver-inflight   a simulated race (itewatch simulate --list)",
        ),
    ];
    // The keys have a line of their own at the bottom: on a small terminal the text above is
    // shortened, never the way on (it was cut off at 80x24).
    let keys = Line::from(vec![
        Span::styled("Enter", BOLD.fg(Color::Green)),
        Span::raw(format!(": show {}    ", u.fallback)),
        Span::styled("q", BOLD.fg(Color::Green)),
        Span::raw(": quit"),
    ]);
    let block = Block::bordered()
        .title(" itewatch live ")
        .border_style(Style::new().fg(Color::Yellow));
    let inner = block.inner(area);
    f.render_widget(block, area);
    let w = inner.width;
    let keys_h = wrapped_rows(&keys, w).min(3);
    let [text_a, keys_a] =
        Layout::vertical([Constraint::Fill(1), Constraint::Length(keys_h)]).areas(inner);
    // doctor's findings get the rows the rest leaves (one spare for word wrapping); what does
    // not fit is counted, and `itewatch doctor` shows it.
    let fixed: u16 = head.iter().chain(&run).map(|l| wrapped_rows(l, w)).sum();
    let mut budget = text_a.height.saturating_sub(fixed + 1);
    let mut lines = head;
    if !u.missing.is_empty() && budget >= 3 {
        lines.push(Line::styled("Missing (from itewatch doctor):", BOLD));
        budget -= 2; // the title and the blank line after the list
        let item = |(n, d): &(String, String)| {
            Line::from(vec![
                Span::styled("  ✗ ", RED),
                Span::styled(format!("{n}: "), BOLD),
                Span::raw(d.clone()),
            ])
        };
        let mut shown = 0;
        for m in &u.missing {
            let l = item(m);
            let h = wrapped_rows(&l, w);
            let rest = u.missing.len() - shown - 1;
            // Keep a row for the "more" line unless this is the last one.
            if h + u16::from(rest > 0) > budget {
                break;
            }
            budget -= h;
            lines.push(l);
            shown += 1;
        }
        if shown < u.missing.len() {
            lines.push(Line::styled(
                format!(
                    "  … {} more: run `sudo itewatch doctor`",
                    u.missing.len() - shown
                ),
                DIM,
            ));
        }
        lines.push(Line::raw(""));
    }
    lines.extend(run);
    f.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }), text_a);
    f.render_widget(Paragraph::new(keys).wrap(Wrap { trim: false }), keys_a);
}

/// Plain-text summary of the view (no terminal): header, incidents, what is in flight.
pub fn summary_text(app: &App, cfg: &Config) -> String {
    let h = &app.header;
    let mut s = String::new();
    s.push_str(&format!(
        "itewatch {} │ host {} │ kernel {} │ IOMMU {} │ {}\n",
        h.source,
        or_dash(&h.host),
        or_dash(&h.kernel),
        if h.iommus.is_empty() {
            "-".to_string()
        } else {
            h.iommus.iter().cloned().collect::<Vec<_>>().join(" ")
        },
        probe_summary(app)
    ));
    let st = &app.snapshot.stats;
    s.push_str(&format!(
        "{} events, {} submissions ({} device-TLB descriptors), lost {}, missed {}\n",
        app.events,
        st.submissions,
        st.dev_tlb_descriptors,
        app.lost_ringbuf + app.undecodable,
        app.missed
    ));
    if let Some(w) = &h.warning {
        s.push_str(&format!("note: {w}\n"));
    }
    for (unit, hist) in &app.histograms {
        s.push_str(&format!(
            "{unit}: {} submissions, max {}\n",
            hist.total,
            fmt_ns(hist.max_ns)
        ));
    }
    let infl = app.inflight_rows();
    if !infl.is_empty() {
        s.push_str(&format!("\nin flight at the end ({}):\n", infl.len()));
        for r in infl {
            let lvl = age_level(r.age_ns, cfg);
            s.push_str(&format!(
                "  {:>10} {:<8} {} CPU{} {}[{}] SIDs {} {}\n",
                fmt_ns(r.age_ns),
                match lvl {
                    AgeLevel::Ok => "",
                    AgeLevel::Warn => "HUNG",
                    AgeLevel::Critical => "HUNG!!",
                },
                r.sub.iommu,
                r.sub.cpu,
                r.sub.task,
                r.sub.tid,
                r.devices
                    .iter()
                    .map(|(s, _)| s.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                caller_name(r.sub.caller)
            ));
        }
    }
    let incs = app.incident_rows();
    s.push_str(&format!("\nincidents ({}):\n", incs.len()));
    if incs.is_empty() {
        s.push_str("  none\n");
    }
    for i in incs {
        s.push_str(&format!(
            "  [{}] {} {} {}  id {}\n",
            i.severity,
            kind_label(i),
            device_label(i),
            i.outcome.as_ref().map(outcome_text).unwrap_or_default(),
            i.id
        ));
        s.push_str(&format!("      {}\n", i.explanation));
        for fx in &i.fixes {
            s.push_str(&format!(
                "      fix {} {}: {}\n",
                fx.commit,
                fix_status(fx.status).0,
                fx.subject
            ));
        }
    }
    s
}

/// The dim message of an empty table, on its first row.
fn empty_message(f: &mut Frame<'_>, area: Rect, msg: &str) {
    if area.height < 4 || area.width < 4 {
        return;
    }
    let r = Rect {
        x: area.x + 1,
        y: area.y + 2,
        width: area.width - 2,
        height: 1,
    };
    f.render_widget(Paragraph::new(Span::styled(msg.to_string(), DIM)), r);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn total(h: PanelHeights) -> u16 {
        h.inflight + h.devices + h.incidents + h.histogram
    }

    #[test]
    fn a_tall_terminal_gets_every_panel() {
        // 120x40 without a banner: 35 rows for the panels.
        let h = panel_heights(35, 0, 4, 2);
        assert_eq!(h.histogram, HISTOGRAM_H);
        assert_eq!(h.inflight, TABLE_CHROME + 1);
        assert_eq!(total(h), 35);
        assert!(h.devices >= TABLE_CHROME + 2 && h.incidents >= TABLE_CHROME + 2);
    }

    // Regression: at 80x24 every panel showed its title and no row.
    #[test]
    fn a_small_terminal_drops_the_histogram_and_keeps_rows_in_every_table() {
        // 80x24 without a banner: 19 rows.
        let h = panel_heights(19, 0, 4, 2);
        assert_eq!(h.histogram, 0);
        assert!(h.incidents >= TABLE_CHROME + 2, "{h:?}");
        assert!(h.inflight > TABLE_CHROME, "{h:?}");
        assert!(h.devices > TABLE_CHROME, "{h:?}");
        assert_eq!(total(h), 19);
    }

    #[test]
    fn the_last_rows_go_to_incidents_then_in_flight_then_devices() {
        let only = |avail| panel_heights(avail, 2, 10, 3);
        // Room for incidents only (3 rows of them).
        let h = only(6);
        assert_eq!(
            (h.incidents, h.inflight, h.devices, h.histogram),
            (6, 0, 0, 0)
        );
        // Then in flight (2 rows), then devices.
        let h = only(11);
        assert_eq!((h.incidents, h.inflight, h.devices), (6, 5, 0));
        let h = only(15);
        assert_eq!((h.incidents, h.inflight, h.devices), (6, 5, 4));
        // Even a screen too small for one incident row draws the incidents panel.
        assert_eq!(panel_heights(3, 2, 10, 3).incidents, 3);
    }

    #[test]
    fn narrow_tables_drop_whole_columns_by_priority() {
        let cols = [(Some(10), 0), (None, 0), (Some(20), 2), (Some(8), 1)];
        assert_eq!(fit_columns(&cols, 60, 10), [true; 4]);
        // 10 + 10 + 8 + 2 spaces = 30: the priority-2 column goes first.
        assert_eq!(fit_columns(&cols, 30, 10), [true, true, false, true]);
        assert_eq!(fit_columns(&cols, 25, 10), [true, true, false, false]);
        // Priority 0 is never dropped.
        assert_eq!(fit_columns(&cols, 5, 10), [true, true, false, false]);
    }
}
