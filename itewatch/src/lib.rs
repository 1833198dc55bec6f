//! itewatch: trace and diagnose Intel VT-d device-TLB (ATS) invalidation time-outs that race
//! with PCIe hot-plug removal.
//!
//! Data flows one way (docs/architecture.md):
//! `probe` (the only code that touches the kernel) → [`event`] (typed events; [`trace`] is
//! their file format) → `correlate` (pure: events in, incidents out) → sinks (report, TUI,
//! agent). `replay` and `simulate` feed the same path without a kernel.

pub mod agent;
pub mod analyze;
pub mod btf;
pub mod correlate;
pub mod doctor;
pub mod document;
pub mod event;
pub mod host;
pub mod kallsyms;
pub mod live;
pub mod output;
pub mod perfetto;
pub mod probe;
pub mod record;
pub mod render;
pub mod replay;
pub mod report;
pub mod simulate;
pub mod sysfs;
pub mod trace;
pub mod tui;
