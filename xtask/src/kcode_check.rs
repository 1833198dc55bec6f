//! The VM check of `itewatch::kcode`: the fixes `itewatch doctor --json` read from the guest
//! kernel's own code (`/proc/kcore`) and the ones `record` wrote into the trace header must be
//! the ones that kernel's Debian source has — the table in itewatch/tests/data/kcode/expected,
//! which the kcode unit tests compare the code cut out of the same images against.

use std::fs;
use std::path::Path;

use crate::assert::Check;

/// The expected table, shared with the unit tests.
const EXPECTED: &str = include_str!("../../itewatch/tests/data/kcode/expected");

/// (commit, status) pairs of one kernel's row; `None` for a kernel without a row.
pub fn expected(kernel: &str) -> Option<Vec<(String, String)>> {
    let commits: Vec<&str> = EXPECTED
        .lines()
        .find(|l| l.starts_with("# kernel "))?
        .split_whitespace()
        .skip(2)
        .collect();
    let row = EXPECTED
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.split_whitespace().next() == Some(kernel))?;
    Some(
        commits
            .iter()
            .map(|c| c.to_string())
            .zip(row.split_whitespace().skip(1).map(str::to_string))
            .collect(),
    )
}

fn compare(want: &[(String, String)], got: &[(String, String)]) -> Vec<String> {
    want.iter()
        .filter_map(|(c, w)| {
            let g = got
                .iter()
                .find(|(gc, _)| gc == c)
                .map_or("(missing)", |(_, s)| s.as_str());
            (g != w).then(|| format!("{c}: expected {w}, detected {g}"))
        })
        .collect()
}

/// doctor.json's `kernel_code` and the trace header's `kernel_fixes` against the table.
pub fn kernel_code_check(
    kernel: &str,
    out: &Path,
    header_fixes: Option<Vec<(String, String)>>,
) -> Check {
    let name = "kernel code fixes = source";
    let Some(want) = expected(kernel) else {
        return Check::fail(name, format!("no row for {kernel} in the expected table"));
    };
    let text = fs::read_to_string(out.join("doctor.json")).unwrap_or_default();
    let v: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => return Check::fail(name, format!("doctor.json: {e}")),
    };
    if let Some(err) = v["kernel_code"]["error"].as_str() {
        return Check::fail(name, format!("doctor could not read the code: {err}"));
    }
    let doctor: Vec<(String, String)> = v["kernel_code"]["findings"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| {
            (
                f["commit"].as_str().unwrap_or("").to_string(),
                f["status"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let mut problems: Vec<String> = compare(&want, &doctor)
        .into_iter()
        .map(|p| format!("doctor {p}"))
        .collect();
    match &header_fixes {
        Some(h) => problems.extend(
            compare(&want, h)
                .into_iter()
                .map(|p| format!("trace header {p}")),
        ),
        None => problems.push("no trace header".into()),
    }
    let row = want
        .iter()
        .map(|(c, s)| format!("{c} {s}"))
        .collect::<Vec<_>>()
        .join(", ");
    if problems.is_empty() {
        Check::new(name, true, format!("doctor and trace header: {row}"))
    } else {
        Check::fail(name, problems.join("; "))
    }
}

/// `itewatch preflight --slot N --json` in the guest: before any removal the surprise disk's
/// slot (ATS on) is a risk, exit 1, with the kernel's fixes as in the table; with reads on that
/// disk a 2 s probe window (`--watch 2`) counts device-TLB invalidations to it; after the safe
/// removal the safe slot is empty: go, exit 0. The kernel log read before any removal holds
/// no ITE report.
pub fn preflight_check(kernel: &str, out: &Path, surprise_dev: Option<&str>) -> Check {
    let name = "preflight risk / go";
    let read = |f: &str| -> Result<(String, serde_json::Value), String> {
        let rc =
            fs::read_to_string(out.join(format!("{f}.rc"))).map_err(|e| format!("{f}.rc: {e}"))?;
        let text = fs::read_to_string(out.join(format!("{f}.json"))).unwrap_or_default();
        let v = serde_json::from_str(&text).map_err(|e| {
            format!(
                "{f}.json: {e}; stderr: {}",
                fs::read_to_string(out.join(format!("{f}.err")))
                    .unwrap_or_default()
                    .trim()
            )
        })?;
        Ok((rc.trim().to_string(), v))
    };
    let mut problems = Vec::new();
    let mut detail = Vec::new();
    match read("preflight-surprise") {
        Err(e) => problems.push(e),
        Ok((rc, v)) => {
            let verdict = v["verdict"].as_str().unwrap_or("?");
            if rc != "1" || verdict != "risk" {
                problems.push(format!("surprise slot: exit {rc}, verdict {verdict}"));
            }
            let funcs = v["functions"].as_array().cloned().unwrap_or_default();
            let ats_on = funcs.iter().any(|f| {
                Some(f["bdf"].as_str().unwrap_or("")) == surprise_dev
                    && f["ats"]["state"].as_str() == Some("enabled")
            });
            if !ats_on {
                problems.push(format!(
                    "surprise slot: {surprise_dev:?} not listed with ATS enabled"
                ));
            }
            if v["slot"]["caps"]["Ok"]["power_controller"].as_bool() != Some(true) {
                problems.push(format!("surprise slot caps: {}", v["slot"]["caps"]));
            }
            if v["invalidations"]["measured"].as_bool() != Some(false) {
                problems.push("invalidations not said to be unmeasured".into());
            }
            if v["schema_version"].as_str() != Some("1.1") {
                problems.push(format!("schema_version {}", v["schema_version"]));
            }
            problems.extend(crate::preflight_vm::no_ite_yet(&v));
            let got: Vec<(String, String)> = v["kernel_fixes"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|f| {
                    (
                        f["commit"].as_str().unwrap_or("").to_string(),
                        f["status"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect();
            if let Some(want) = expected(kernel) {
                problems.extend(
                    compare(&want, &got)
                        .into_iter()
                        .map(|p| format!("preflight {p}")),
                );
            }
            detail.push(format!("surprise slot: exit {rc} {verdict}"));
        }
    }
    match read("preflight-dma") {
        Err(e) => problems.push(e),
        Ok((rc, v)) => {
            let verdict = v["verdict"].as_str().unwrap_or("?");
            let inv = &v["invalidations"];
            let n = inv["submissions"].as_u64().unwrap_or(0);
            if rc != "1" || verdict != "risk" || inv["measured"].as_bool() != Some(true) || n == 0 {
                problems.push(format!("surprise slot with reads, 2 s window: exit {rc}, verdict {verdict}, invalidations {inv}"));
            }
            detail.push(format!(
                "with reads: exit {rc} {verdict}, {n} device-TLB submissions in {} ms, {} in flight at its end",
                inv["window_ms"], inv["in_flight_at_end"]
            ));
        }
    }
    match read("preflight-empty") {
        Err(e) => problems.push(e),
        Ok((rc, v)) => {
            let verdict = v["verdict"].as_str().unwrap_or("?");
            if rc != "0"
                || verdict != "go"
                || v["functions"].as_array().is_none_or(|f| !f.is_empty())
            {
                problems.push(format!("emptied safe slot: exit {rc}, verdict {verdict}"));
            }
            detail.push(format!("emptied safe slot: exit {rc} {verdict}"));
        }
    }
    if problems.is_empty() {
        Check::new(name, true, detail.join(", "))
    } else {
        Check::fail(name, problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_matrix_kernel_has_a_row_of_five() {
        for k in ["6.1", "6.12", "6.18", "7.3"] {
            let row = expected(k).unwrap();
            assert_eq!(row.len(), 5, "{k}");
            assert!(row
                .iter()
                .all(|(_, s)| matches!(s.as_str(), "present" | "absent" | "unknown")));
        }
        assert!(expected("5.15").is_none());
    }

    #[test]
    fn a_mismatch_names_the_commit() {
        let want = expected("6.1").unwrap();
        let mut got = want.clone();
        got[3].1 = "present".into();
        let p = compare(&want, &got);
        assert_eq!(
            p,
            vec!["80a9b50c0b9e: expected absent, detected present".to_string()]
        );
        got.remove(0);
        assert_eq!(compare(&want, &got).len(), 2);
    }
}
