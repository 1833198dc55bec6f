//! itewatch's pure core: everything that needs neither the kernel, a terminal nor the network.
//!
//! Data flows one way (docs/architecture.md): probes (the `itewatch` crate) → [`event`] (typed
//! events; [`trace`] is their file format) → [`correlate`] (pure: events in, incidents out, no
//! clock, I/O or threads) → sinks. [`analyze`] reads kernel logs into the same incidents;
//! [`simulate`] produces the events no VM can; [`document`] is the report both give.
//! [`knowledge`] holds what the kernel does, once.
//!
//! This crate depends on no aya, tokio, ratatui or libc, so the compiler keeps it pure.

pub mod analyze;
pub mod correlate;
pub mod document;
pub mod event;
pub mod knowledge;
pub mod output;
pub mod pairing;
pub mod simulate;
pub mod trace;
