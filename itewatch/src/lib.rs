//! itewatch: trace and diagnose Intel VT-d device-TLB (ATS) invalidation time-outs that race
//! with PCIe hot-plug removal.
//!
//! Data flows one way (docs/architecture.md):
//! `probe` (the only code that touches the kernel) → [`event`] (typed events; [`trace`] is
//! their file format) → `correlate` (pure: events in, incidents out) → sinks (report, TUI,
//! agent). `replay` and `simulate` feed the same path without a kernel.

pub use itewatch_core::{analyze, correlate, document, event, knowledge, output, simulate, trace};

pub mod agent;
pub mod btf;
pub mod doctor;
pub mod host;
pub mod kallsyms;
pub mod kcode;
pub mod kmsg;
pub mod live;
pub mod perfetto;
pub mod preflight;
pub mod probe;
pub mod record;
pub mod render;
pub mod replay;
pub mod report;
pub mod sysfs;
#[cfg(test)]
mod test_records;
pub mod tui;
