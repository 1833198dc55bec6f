//! Keys → [`Action`]s. Pure: the loop performs what an action means (quit, export) and
//! [`App::apply`](super::state::App::apply) does the rest.

use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use super::state::App;

/// What the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    None,
    Quit,
    ToggleHelp,
    FocusNext,
    FocusPrev,
    Up,
    Down,
    Left,
    Right,
    PageUp,
    PageDown,
    Top,
    Bottom,
    /// Enter: open the incident detail view.
    Open,
    /// Esc inside a view: close it (or clear the filter).
    Back,
    StartFilter,
    FilterInput(char),
    FilterBackspace,
    FilterCommit,
    FilterCancel,
    TogglePause,
    /// Export the selected incident (or all when none is selected).
    Export,
    ExportAll,
    CycleSort,
}

/// The key bindings, for the help screen and docs/tui.md.
pub const KEYS: &[(&str, &str)] = &[
    ("q", "quit"),
    (
        "Esc",
        "back: close the detail view / help / filter (never quits)",
    ),
    ("?", "help"),
    ("Tab, Shift-Tab, ←/→, h/l", "move between panels"),
    (
        "↑/↓, k/j, PgUp/PgDn, g/G",
        "move the selection (scroll in the detail view)",
    ),
    (
        "Enter",
        "open the selected incident (or the incident of an in-flight submission)",
    ),
    (
        "/",
        "filter by BDF, SID, driver, slot (Enter keeps it, Esc clears it)",
    ),
    ("s", "cycle the sort order of the focused panel"),
    ("p", "pause / resume"),
    (
        "e",
        "export the selected incident (all when none is selected) as a JSON report",
    ),
    ("E", "export all incidents as a JSON report"),
];

/// Maps a key press to an action, given what is on screen.
pub fn map_key(app: &App, key: KeyEvent) -> Action {
    if key.kind == KeyEventKind::Release {
        return Action::None;
    }
    if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
        return Action::Quit;
    }
    if app.filter_editing {
        return match key.code {
            KeyCode::Enter => Action::FilterCommit,
            KeyCode::Esc => Action::FilterCancel,
            KeyCode::Backspace => Action::FilterBackspace,
            KeyCode::Char(c) => Action::FilterInput(c),
            _ => Action::None,
        };
    }
    if app.help {
        return match key.code {
            KeyCode::Char('q') => Action::Quit,
            _ => Action::ToggleHelp,
        };
    }
    match key.code {
        KeyCode::Char('q') => Action::Quit,
        // Esc only ever backs out: on the main view it does nothing, so that a reflexive Esc
        // does not end a live session (only `q` and Ctrl-C quit).
        KeyCode::Esc => Action::Back,
        KeyCode::Char('?') => Action::ToggleHelp,
        KeyCode::Tab => Action::FocusNext,
        KeyCode::BackTab => Action::FocusPrev,
        KeyCode::Left | KeyCode::Char('h') => Action::Left,
        KeyCode::Right | KeyCode::Char('l') => Action::Right,
        KeyCode::Up | KeyCode::Char('k') => Action::Up,
        KeyCode::Down | KeyCode::Char('j') => Action::Down,
        KeyCode::PageUp => Action::PageUp,
        KeyCode::PageDown => Action::PageDown,
        KeyCode::Home | KeyCode::Char('g') => Action::Top,
        KeyCode::End | KeyCode::Char('G') => Action::Bottom,
        KeyCode::Enter => Action::Open,
        KeyCode::Backspace => Action::Back,
        KeyCode::Char('/') => Action::StartFilter,
        KeyCode::Char('p') | KeyCode::Char(' ') => Action::TogglePause,
        KeyCode::Char('e') => Action::Export,
        KeyCode::Char('E') => Action::ExportAll,
        KeyCode::Char('s') => Action::CycleSort,
        _ => Action::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::correlate::Config;
    use crate::tui::state::HeaderInfo;

    fn k(c: KeyCode) -> KeyEvent {
        KeyEvent::new(c, KeyModifiers::NONE)
    }

    // Regression: Esc on the main view quit, ending a live session.
    #[test]
    fn esc_backs_out_and_never_quits() {
        let mut app = App::new(Config::default(), HeaderInfo::default());
        assert_eq!(map_key(&app, k(KeyCode::Esc)), Action::Back);
        let before = format!("{:?}", (app.detail.is_some(), &app.filter, app.help));
        app.apply(Action::Back);
        assert_eq!(
            format!("{:?}", (app.detail.is_some(), &app.filter, app.help)),
            before,
            "Esc on the main view changes nothing"
        );
        assert_eq!(map_key(&app, k(KeyCode::Char('q'))), Action::Quit);
        app.filter = "mlx".into();
        assert_eq!(map_key(&app, k(KeyCode::Esc)), Action::Back);
        app.filter_editing = true;
        assert_eq!(
            map_key(&app, k(KeyCode::Char('q'))),
            Action::FilterInput('q')
        );
        assert_eq!(map_key(&app, k(KeyCode::Esc)), Action::FilterCancel);
        app.filter_editing = false;
        app.help = true;
        assert_eq!(map_key(&app, k(KeyCode::Char('j'))), Action::ToggleHelp);
        assert_eq!(
            map_key(
                &app,
                KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)
            ),
            Action::Quit
        );
    }
}
