//! The incident model: what the correlator says, and the JSON shape every sink (report, TUI,
//! agent) consumes. Field names here are the report's field names; keep them stable.
//!
//! An incident is one finding about one device (or one submission, for
//! [`IncidentKind::HungInvalidation`]). It may be updated while the stream goes on (a hung
//! submission escalates, a second flush joins a `flush-to-gone-device`): every update is
//! emitted again with the same [`IncidentId`] and a higher `revision`; the last revision is the
//! verdict.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::event::{Bdf, CallerPath, KTime, Sid};

/// The five kinds of incident. The kebab-case names are the JSON `kind` values that scripts and
/// alert rules key on.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum IncidentKind {
    /// W1: a device-TLB invalidation from the driver's path was in flight when its device was
    /// disconnected (the thread's case 1, the CPU0/CPU1 interleaving).
    InflightAcrossDisconnect,
    /// W2: a device-TLB invalidation issued after its device was disconnected or released
    /// (the thread's case 2: the bus-notifier flush after surprise removal).
    FlushToGoneDevice,
    /// W3: a flush issued during a safe removal of its slot that was slow or timed out
    /// (the thread's case 3).
    SafeRemovalFlushTimeout,
    /// A submission outstanding longer than the configured threshold.
    HungInvalidation,
    /// The kernel reported an invalidation time-out (ITE).
    IteReported,
}

impl IncidentKind {
    pub const ALL: [IncidentKind; 5] = [
        IncidentKind::InflightAcrossDisconnect,
        IncidentKind::FlushToGoneDevice,
        IncidentKind::SafeRemovalFlushTimeout,
        IncidentKind::HungInvalidation,
        IncidentKind::IteReported,
    ];

    /// The JSON / docs name.
    pub fn name(self) -> &'static str {
        match self {
            IncidentKind::InflightAcrossDisconnect => "inflight-across-disconnect",
            IncidentKind::FlushToGoneDevice => "flush-to-gone-device",
            IncidentKind::SafeRemovalFlushTimeout => "safe-removal-flush-timeout",
            IncidentKind::HungInvalidation => "hung-invalidation",
            IncidentKind::IteReported => "ite-reported",
        }
    }

    /// The race window of the thread this kind is, if it is one.
    pub fn window(self) -> Option<Window> {
        match self {
            IncidentKind::InflightAcrossDisconnect => Some(Window::W1),
            IncidentKind::FlushToGoneDevice => Some(Window::W2),
            IncidentKind::SafeRemovalFlushTimeout => Some(Window::W3),
            IncidentKind::HungInvalidation | IncidentKind::IteReported => None,
        }
    }
}

impl fmt::Display for IncidentKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for IncidentKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        IncidentKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("unknown incident kind {s:?}"))
    }
}

/// The race windows of the ITE thread (docs/scenarios.md).
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
pub enum Window {
    /// Driver invalidation in flight across the disconnect (case 1).
    W1,
    /// Notifier invalidation after a surprise removal disconnected the device (case 2).
    W2,
    /// Notifier invalidation during a safe removal, link lost meanwhile (case 3).
    W3,
}

impl Window {
    /// The case number of the thread the window comes from.
    pub fn case(self) -> u8 {
        match self {
            Window::W1 => 1,
            Window::W2 => 2,
            Window::W3 => 3,
        }
    }
}

/// How bad it is. Ordered: `info < latent < warning < critical`.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Severity {
    /// Worth knowing, no hazard.
    Info,
    /// The hazard happened but did no harm this time (the device answered, or QEMU completed
    /// it); on real hardware with the device gone it hangs.
    Latent,
    /// Something went wrong and the kernel coped (aborted, slow, still in flight).
    Warning,
    /// A CPU spins with IRQs off for long: a hard lockup is near or has happened.
    Critical,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Info => "info",
            Severity::Latent => "latent",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        })
    }
}

/// A stable incident id: 16 hex digits of a hash of what identifies the incident (kind,
/// device, first event). The same input gives the same ids, run after run.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(transparent)]
pub struct IncidentId(pub String);

impl IncidentId {
    /// Id from the parts that identify an incident.
    pub fn derive(kind: IncidentKind, key: &[u64]) -> IncidentId {
        let mut h = Fnv64::new();
        h.write(kind.name().as_bytes());
        for k in key {
            h.write(&k.to_le_bytes());
        }
        IncidentId(format!("{:016x}", h.finish()))
    }
}

impl fmt::Display for IncidentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// FNV-1a 64: tiny, fixed and unseeded, so ids do not depend on the process (std's hasher is
/// randomly keyed).
struct Fnv64(u64);

impl Fnv64 {
    fn new() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// What the device's state was at the incident's first moment.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceState {
    /// On the bus and findable.
    Present,
    /// Marked disconnected (surprise removal: `pci_dev_set_disconnected`).
    Disconnected,
    /// `pci_stop_and_remove_bus_device` started (driver being unbound).
    Removing,
    /// Left the IOMMU (`iommu_release_device`, BUS_NOTIFY_REMOVED_DEVICE): no longer findable
    /// by BDF.
    Released,
    /// Never seen: the SID matches no device the trace named.
    Unknown,
}

impl DeviceState {
    /// Whether the device was present; `None` when unknown.
    pub fn present(self) -> Option<bool> {
        match self {
            DeviceState::Present | DeviceState::Removing => Some(true),
            DeviceState::Disconnected | DeviceState::Released => Some(false),
            DeviceState::Unknown => None,
        }
    }
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

/// The device an incident is about.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct IncidentDevice {
    /// `segment:bus:dev.fn`; the segment is that of the IOMMU or the sysfs snapshot, `????`
    /// when unknown. `None` when no device could be attributed (e.g. an ITE with SID 0 and
    /// nothing in flight).
    pub bdf: Option<Bdf>,
    /// PCI source-id (`bus << 8 | devfn`) as the descriptor or the ITE report carried it.
    pub sid: Option<Sid>,
    pub driver: Option<String>,
    /// Hot-plug slot name, from sysfs or the pciehp log line.
    pub slot: Option<String>,
    /// The hot-plug port above the device.
    pub port: Option<Bdf>,
    pub vendor: Option<u16>,
    /// PCI device id (`device.device` before schema 2.0).
    #[serde(alias = "device")]
    pub device_id: Option<u16>,
    /// IOMMU unit (`dmarN`).
    pub iommu: Option<String>,
    /// State at the incident's first moment.
    pub state: Option<DeviceState>,
    /// `state` reduced to present / not present (null = unknown).
    pub present: Option<bool>,
    /// The device is a guess: the kernel did not name it (an ITE with SID 0, or a -ETIMEDOUT
    /// return whose ITE report was not seen) and it was inferred from what was in flight.
    /// `candidates` lists every device it may be. Schema 1.3; absent when false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub inferred: bool,
    /// Every SID the incident may be about, most likely first, when the kernel did not name
    /// one (`inferred`, or no device at all). Schema 1.3; absent when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<Sid>,
    /// The device is a VF matched through its PF: the descriptor's `pfsid` (this SID) is the
    /// device that went away, not `sid` itself. Schema 1.3; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via_pf: Option<Sid>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// One event of an incident's timeline, decoded for people.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TimelineEntry {
    /// Kernel time (CLOCK_MONOTONIC ns). Schema 2.0; `ts` before.
    #[serde(rename = "ts_ns", alias = "ts")]
    pub ts: KTime,
    pub cpu: u32,
    pub tid: u32,
    /// Task name (`comm`).
    pub task: String,
    /// Event kind (`submit`, `disconnect-walk`, .., `lost`, `device`).
    pub event: String,
    /// Decoded fields, `key=value` separated by spaces.
    pub detail: String,
    /// Caller path of invalidations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller: Option<CallerPath>,
}

/// Whether the running kernel carried a fix, as far as the events tell.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum FixStatus {
    /// The events show the kernel lacks it (it would have prevented what was seen).
    Missing,
    /// The events show the kernel has it (e.g. an ITE aborted with -ETIMEDOUT).
    Present,
    /// Addresses this class of problem; the events cannot tell whether it is there.
    Related,
}

/// An upstream fix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Fix {
    /// Upstream commit id (12 hex digits).
    pub commit: String,
    /// The commit subject.
    pub subject: String,
    pub status: FixStatus,
    /// Where it landed (mainline version, stable backports).
    pub landed: String,
}

/// How one submission ended (or has not yet).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum Outcome {
    /// Still outstanding at the incident's last update.
    InFlight { outstanding_ns: u64 },
    /// Returned 0 within the slow threshold.
    Completed { latency_ns: u64 },
    /// Returned 0, but only after the slow threshold (ITE then retry).
    CompletedLate { latency_ns: u64 },
    /// Returned -ETIMEDOUT (6.9+: 80a9b50c0b9e aborts when the ITE target is gone).
    Aborted { latency_ns: u64, ret: i64 },
    /// Returned another error.
    Failed { latency_ns: u64, ret: i64 },
    /// The stream ended (or the state was evicted) before it returned.
    NotReturned { outstanding_ns: u64 },
    /// A later submission on the same thread arrived before any return: the return was lost.
    ReturnLost,
}

impl Outcome {
    /// How long the submission took or has been outstanding.
    pub fn duration_ns(&self) -> Option<u64> {
        match *self {
            Outcome::InFlight { outstanding_ns } | Outcome::NotReturned { outstanding_ns } => {
                Some(outstanding_ns)
            }
            Outcome::Completed { latency_ns }
            | Outcome::CompletedLate { latency_ns }
            | Outcome::Aborted { latency_ns, .. }
            | Outcome::Failed { latency_ns, .. } => Some(latency_ns),
            Outcome::ReturnLost => None,
        }
    }

    /// Whether the submission has ended (returned, or will never be seen to).
    pub fn is_final(&self) -> bool {
        !matches!(self, Outcome::InFlight { .. })
    }

    /// Short name (`in-flight`, `completed`, ..).
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::InFlight { .. } => "in-flight",
            Outcome::Completed { .. } => "completed",
            Outcome::CompletedLate { .. } => "completed-late",
            Outcome::Aborted { .. } => "aborted",
            Outcome::Failed { .. } => "failed",
            Outcome::NotReturned { .. } => "not-returned",
            Outcome::ReturnLost => "return-lost",
        }
    }
}

/// One submission (one `qi_submit_sync` call) that is part of an incident.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SubmissionView {
    pub tid: u32,
    pub cpu: u32,
    pub task: String,
    pub iommu: String,
    /// Kernel time (ns) of the submit. Schema 2.0; `start` before.
    #[serde(rename = "start_ns", alias = "start")]
    pub start: KTime,
    /// Kernel time (ns) of the return, if seen. Schema 2.0; `end` before.
    #[serde(rename = "end_ns", alias = "end")]
    pub end: Option<KTime>,
    pub ret: Option<i64>,
    pub outcome: Outcome,
    pub caller: CallerPath,
    /// `count` passed to qi_submit_sync.
    pub descriptors: u32,
    /// SIDs of the device-TLB descriptors in the batch.
    pub dev_tlb_sids: Vec<Sid>,
}

/// The incident that explains (or is explained by) this one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Attribution {
    pub kind: IncidentKind,
    pub window: Option<Window>,
    pub id: IncidentId,
}

/// Safe (attention button / sysfs) or surprise removal.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum RemovalKind {
    Safe,
    Surprise,
}

/// One finding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Incident {
    pub id: IncidentId,
    /// 0 for the first emission; each update increments it.
    pub revision: u32,
    pub kind: IncidentKind,
    pub severity: Severity,
    /// W1/W2/W3, or null (hung and ITE incidents not explained by a window).
    pub window: Option<Window>,
    /// Case number of the ITE thread (1, 2, 3) this matches, or null.
    pub device: IncidentDevice,
    /// Removal of the device's slot involved, if any.
    pub removal: Option<RemovalKind>,
    /// First and last event time of the incident.
    /// Schema 2.0; `start` and `end` before.
    #[serde(rename = "start_ns", alias = "start")]
    pub start: KTime,
    #[serde(rename = "end_ns", alias = "end")]
    pub end: KTime,
    /// The worst outcome among `submissions` (null for an ITE with nothing attributed).
    pub outcome: Option<Outcome>,
    pub submissions: Vec<SubmissionView>,
    /// Finished submissions left out of `submissions` to keep it within the configured
    /// length (`max_members`); their outcomes still count in `outcome` and `severity`.
    /// Schema 1.2; absent when zero.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub submissions_omitted: u32,
    /// Ordered events that make up the incident.
    pub timeline: Vec<TimelineEntry>,
    /// Timeline entries left out to keep within the configured length.
    pub timeline_omitted: u32,
    /// Events were lost (or state evicted) inside the time window: the verdict may miss facts.
    pub partial: bool,
    /// Why the incident is partial.
    pub partial_reasons: Vec<String>,
    /// ITE reports merged into this incident (ite-reported only; 0 otherwise).
    pub reports: u32,
    /// The incident that explains this one (a hung submission re-attributed to W1, ..).
    pub attribution: Option<Attribution>,
    /// Other incidents about the same submissions.
    pub related: Vec<IncidentId>,
    /// Plain explanation.
    pub explanation: String,
    /// Upstream fixes that address it.
    pub fixes: Vec<Fix>,
    /// Whether this revision is the last (the incident is closed).
    pub closed: bool,
    /// The log lines an incident reconstructed from a kernel log (`itewatch analyze`) rests
    /// on, and how firmly; absent from traced incidents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<Evidence>,
}

impl Incident {
    /// The thread's case number (1, 2, 3) of `window`: the same fact, so the JSON carries
    /// only `window` since schema 2.0 (1.x documents' `case` is ignored on reading).
    pub fn case(&self) -> Option<u8> {
        self.window.map(Window::case)
    }
}

/// How firmly a log-reconstructed incident is established.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Certainty {
    /// Only timing links the lines (e.g. an ITE shortly after a slot's Link Down).
    #[default]
    Possible,
    /// A call trace shows the invalidation, but the case rests on the task name or on
    /// pciehp lines near it.
    Probable,
    /// The call trace itself shows both the invalidation and the path that issued it.
    Confirmed,
}

/// One log line supporting an incident.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct EvidenceLine {
    /// 1-based line number in the input.
    pub line: u64,
    /// What the analyzer read in it (`ite-detected`, `frame`, `link-down`, ..).
    pub fact: String,
    /// The message, without its timestamp prefix (cut at 512 bytes).
    pub text: String,
    /// The line's own timestamp as the log printed it, for logs stamped with the wall clock
    /// (syslog, journal, `dmesg -T`): sub-second digits as printed. Schema 1.3; absent for
    /// monotonic stamps (`[ 123.456789]`, which `start`/`end` carry) and unstamped lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
}

/// Why an incident reconstructed from a kernel log is believed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Evidence {
    /// Boot of the log the lines belong to (0-based, in input order).
    pub boot: u32,
    pub certainty: Certainty,
    /// What the diagnosis rests on, one statement each.
    pub basis: Vec<String>,
    /// What the log does not tell (and the diagnosis therefore does not claim).
    pub unknowns: Vec<String>,
    /// The supporting lines, in input order.
    pub lines: Vec<EvidenceLine>,
    /// Supporting lines left out to keep the incident small.
    pub lines_omitted: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_serialise_to_the_names_alert_rules_key_on() {
        for k in IncidentKind::ALL {
            let j = serde_json::to_string(&k).unwrap();
            assert_eq!(j, format!("\"{}\"", k.name()));
            assert_eq!(k.name().parse::<IncidentKind>().unwrap(), k);
        }
        assert_eq!(
            serde_json::to_string(&IncidentKind::InflightAcrossDisconnect).unwrap(),
            "\"inflight-across-disconnect\""
        );
        assert_eq!(serde_json::to_string(&Window::W2).unwrap(), "\"W2\"");
        assert_eq!(
            serde_json::to_string(&Severity::Latent).unwrap(),
            "\"latent\""
        );
    }

    #[test]
    fn ids_are_stable_and_distinct() {
        let a = IncidentId::derive(IncidentKind::FlushToGoneDevice, &[0, 0x100, 5]);
        assert_eq!(
            a,
            IncidentId::derive(IncidentKind::FlushToGoneDevice, &[0, 0x100, 5])
        );
        assert_ne!(
            a,
            IncidentId::derive(IncidentKind::IteReported, &[0, 0x100, 5])
        );
        assert_ne!(
            a,
            IncidentId::derive(IncidentKind::FlushToGoneDevice, &[0, 0x100, 6])
        );
        assert_eq!(a.0.len(), 16);
        // Pinned: a change here changes every id in every stored report.
        assert_eq!(
            IncidentId::derive(IncidentKind::HungInvalidation, &[1]).0,
            IncidentId::derive(IncidentKind::HungInvalidation, &[1]).0
        );
    }

    #[test]
    fn severity_orders_latent_between_info_and_warning() {
        assert!(Severity::Info < Severity::Latent);
        assert!(Severity::Latent < Severity::Warning);
        assert!(Severity::Warning < Severity::Critical);
    }

    #[test]
    fn outcome_serialises_with_a_state_tag() {
        let j = serde_json::to_value(Outcome::Aborted {
            latency_ns: 5,
            ret: -110,
        })
        .unwrap();
        assert_eq!(j["state"], "aborted");
        assert_eq!(j["ret"], -110);
    }
}
