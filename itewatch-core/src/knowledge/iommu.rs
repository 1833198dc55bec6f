//! How the kernel decides whether VT-d runs in scalable mode (drivers/iommu/intel/iommu.c).

/// What the command line says about VT-d: `Some(false)` for `intel_iommu=off`, the last of
/// `sm_on`/`sm_off` in any `intel_iommu=` option (the kernel parses them in order, later wins;
/// checked on 6.1/6.12 drivers/iommu/intel/iommu.c `intel_iommu_setup`), else `None`.
fn cmdline_sm(cmdline: &str) -> (Option<bool>, bool) {
    let mut sm = None;
    let mut off = false;
    for w in cmdline.split_whitespace() {
        let Some(v) = w.strip_prefix("intel_iommu=") else {
            continue;
        };
        for opt in v.split(',') {
            match opt {
                "sm_on" => sm = Some(true),
                "sm_off" => sm = Some(false),
                "off" => off = true,
                "on" => off = false,
                _ => {}
            }
        }
    }
    (sm, off)
}

/// Whether scalable mode is in use, and why. The kernel uses it on a unit when
/// `intel_iommu_sm` (the config default, overridden by `intel_iommu=sm_on|sm_off`) is set and
/// the unit has ECAP.SMTS (`sm_supported()`); "in use" here means on every VT-d unit.
/// `smts` has one entry per VT-d unit (`None`: ECAP unreadable).
pub fn scalable_mode(
    cmdline: Option<&str>,
    config_default: Option<bool>,
    smts: &[Option<bool>],
) -> (Option<bool>, String) {
    let (sm, off) = cmdline.map(cmdline_sm).unwrap_or((None, false));
    if off {
        return (Some(false), "intel_iommu=off on the command line".into());
    }
    if smts.contains(&Some(false)) {
        return (Some(false), "a VT-d unit lacks ECAP.SMTS".into());
    }
    let (wanted, why) = match (sm, config_default) {
        (Some(v), _) => (
            Some(v),
            format!(
                "intel_iommu={} on the command line",
                if v { "sm_on" } else { "sm_off" }
            ),
        ),
        (None, Some(v)) => (
            Some(v),
            format!(
                "kernel config default (CONFIG_INTEL_IOMMU_SCALABLE_MODE_DEFAULT_ON {})",
                if v { "=y" } else { "not set" }
            ),
        ),
        (None, None) => (
            None,
            "neither the command line nor a readable kernel config says".into(),
        ),
    };
    match wanted {
        Some(false) => (Some(false), why),
        Some(true) if smts.is_empty() => (None, format!("{why}, but no VT-d unit is visible")),
        Some(true) if smts.iter().all(|s| *s == Some(true)) => {
            (Some(true), format!("{why}; every unit has ECAP.SMTS"))
        }
        Some(true) => (None, format!("{why}, but some unit's ECAP is unreadable")),
        None => (None, why),
    }
}
