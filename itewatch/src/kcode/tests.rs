//! The decision on code cut out of the Debian kernels of the VM matrix
//! (itewatch/tests/data/kcode/<kernel>/, written by `examples/kcode_fixture.rs` from each
//! package's vmlinuz and the System.map of its `-dbg` package; see the README there).
//! The expected verdicts are what each kernel's Debian source says (docs/kernel-support.md).

use std::path::{Path, PathBuf};

use super::*;
use crate::kallsyms::Kallsyms;

fn fixture_dir(kernel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/data/kcode/{kernel}"))
}

/// Loads a fixture directory into the decision's input.
pub(crate) fn load_fixture(dir: &Path) -> KernelCode {
    let syms = Kallsyms::load_from(&dir.join("symbols")).unwrap();
    let mut code = KernelCode::default();
    for base in FUNCTIONS {
        let v = syms
            .addresses_of(base)
            .into_iter()
            .filter(|s| s.kind == 't')
            .map(|s| Function {
                name: s.name.clone(),
                addr: s.addr,
                bytes: std::fs::read(dir.join(format!("{}.bin", s.name))).unwrap(),
            })
            .collect();
        code.functions.insert(base.to_string(), Copies::Read(v));
    }
    for c in CALLEES {
        let a = syms
            .addresses_of(c)
            .into_iter()
            .filter(|s| s.kind == 'T')
            .map(|s| s.addr)
            .collect();
        code.callees.insert(c.to_string(), a);
    }
    if let Ok(text) = std::fs::read_to_string(dir.join("layout")) {
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k)?.trim().parse::<u32>().ok())
                .unwrap()
        };
        code.pci_dev = Some(PciDevLayout {
            error_state: get("error_state "),
            dev: get("dev "),
        });
    }
    code
}

fn statuses(code: &KernelCode) -> Vec<(String, CodeStatus)> {
    assess(code)
        .into_iter()
        .map(|f| (f.commit, f.status))
        .collect()
}

use CodeStatus::{Absent, Present, Unknown};

/// Expected verdicts from each kernel's Debian source, in [`COMMITS`] order: the table in
/// itewatch/tests/data/kcode/expected (the VM test reads the same table).
fn expected(kernel: &str) -> Vec<CodeStatus> {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/kcode/expected"),
    )
    .unwrap();
    let header = text
        .lines()
        .find(|l| l.starts_with("# kernel "))
        .expect("header line");
    let commits: Vec<&str> = header.split_whitespace().skip(2).collect();
    assert_eq!(
        commits,
        COMMITS.iter().map(|f| f.commit).collect::<Vec<_>>(),
        "expected's columns are COMMITS"
    );
    let row = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.split_whitespace().next() == Some(kernel))
        .unwrap_or_else(|| panic!("no row for {kernel}"));
    row.split_whitespace()
        .skip(1)
        .map(|w| match w {
            "present" => Present,
            "absent" => Absent,
            "unknown" => Unknown,
            _ => panic!("bad status {w}"),
        })
        .collect()
}

fn check_kernel(kernel: &str) {
    let dir = fixture_dir(kernel);
    let code = load_fixture(&dir);
    let got = statuses(&code);
    let want: Vec<(String, CodeStatus)> = COMMITS
        .iter()
        .map(|f| f.commit.to_string())
        .zip(expected(kernel))
        .collect();
    assert_eq!(got, want, "{kernel}: {:#?}", assess(&code));
}

#[test]
fn debian_6_1_code_matches_its_source() {
    check_kernel("6.1");
}

#[test]
fn debian_6_12_code_matches_its_source() {
    check_kernel("6.12");
}

#[test]
fn debian_6_18_code_matches_its_source() {
    check_kernel("6.18");
}

/// 6.18.15's `devtlb_invalidation_with_pasid` has 4fc82cd907ac's inline
/// `pci_dev_is_disconnected()` (`mov ecx, [rax+error_state]; cmp ecx, 3`), not the presence
/// call; without BTF that test cannot be recognised, so 4fc82cd907ac becomes unknown.
#[test]
fn the_6_18_disconnected_test_needs_the_btf_layout() {
    let mut code = load_fixture(&fixture_dir("6.18"));
    assert_eq!(statuses(&code)[0].1, Present);
    code.pci_dev = None;
    let f = assess(&code);
    assert_eq!(f[0].status, Unknown, "{:?}", f[0]);
    // 10e60d878139 is a call, seen without BTF: still absent.
    assert_eq!(f[1].status, Absent, "{:?}", f[1]);
}

#[test]
fn the_6_18_abort_walk_is_the_unfixed_one_where_its_cpu_spun() {
    // The ite-surprise run on 6.18 saw CPU 0 spin at qi_submit_sync.cold+0x2ce
    // (docs/vm-tests.md): the head of this loop.
    let code = load_fixture(&fixture_dir("6.18"));
    let Some(Copies::Read(v)) = code.functions.get("qi_submit_sync") else {
        panic!("no qi_submit_sync");
    };
    let walks: Vec<AbortWalk> = v
        .iter()
        .flat_map(|f| x86::decode(f).unwrap().abort_walks())
        .collect();
    assert_eq!(
        walks,
        vec![AbortWalk {
            function: "qi_submit_sync.cold".into(),
            offset: 0x2ce,
            step: -2,
            or_one_before: true,
        }]
    );
}

#[test]
fn debian_7_3_code_matches_its_source() {
    check_kernel("7.3");
}

#[test]
fn the_6_1_abort_walk_steps_by_one_without_or_one() {
    let code = load_fixture(&fixture_dir("6.1"));
    let Some(Copies::Read(v)) = code.functions.get("qi_submit_sync") else {
        panic!("no qi_submit_sync");
    };
    let walks: Vec<AbortWalk> = v
        .iter()
        .flat_map(|f| x86::decode(f).unwrap().abort_walks())
        .collect();
    assert_eq!(walks.len(), 1, "{walks:?}");
    assert_eq!(walks[0].step, -1);
    assert!(!walks[0].or_one_before);
}

#[test]
fn without_btf_the_disconnected_test_cannot_be_ruled_out() {
    let mut code = load_fixture(&fixture_dir("6.1"));
    code.pci_dev = None;
    let got = statuses(&code);
    // The presence call is still seen; the legacy path's absence of a guard is not provable.
    assert_eq!(got[0].1, Present);
    assert_eq!(got[1].1, Present);
    assert_eq!(got[2].1, Unknown);
}

#[test]
fn missing_functions_and_callees_are_unknown_not_absent() {
    let code = KernelCode::default();
    for f in assess(&code) {
        assert_eq!(f.status, Unknown, "{f:?}");
        assert!(f.evidence.contains("not looked up"), "{f:?}");
    }
    let mut code = load_fixture(&fixture_dir("6.12"));
    code.callees.remove(PCI_DEVICE_IS_PRESENT);
    let got = statuses(&code);
    assert_eq!(got[0].1, Unknown);
    assert_eq!(got[3].1, Unknown);
    // The abort walk does not depend on callees.
    assert_eq!(got[4].1, Present);
}

#[test]
fn unreadable_code_is_unknown_with_the_reason() {
    let mut code = load_fixture(&fixture_dir("6.12"));
    code.functions.insert(
        "qi_submit_sync".into(),
        Copies::Unreadable("cannot read /proc/kcore".into()),
    );
    let f = assess(&code);
    assert_eq!(f[3].status, Unknown);
    assert!(f[3].evidence.contains("/proc/kcore"), "{:?}", f[3]);
    assert_eq!(f[4].status, Unknown);
}

#[test]
fn code_that_is_not_the_flush_is_unknown() {
    // devtlb_invalidation_with_pasid's bytes replaced by `ret`: no flush call, so the code is
    // not the one the check would guard.
    let mut code = load_fixture(&fixture_dir("6.12"));
    code.functions.insert(
        "devtlb_invalidation_with_pasid".into(),
        Copies::Read(vec![Function {
            name: "devtlb_invalidation_with_pasid".into(),
            addr: 0xffff_ffff_8100_0000,
            bytes: vec![0xc3],
        }]),
    );
    let got = statuses(&code);
    assert_eq!(got[0].1, Unknown);
    assert_eq!(got[1].1, Unknown);
}

/// A hand-made unfixed abort walk (the shape of 6.18.15's `qi_check_fault` in the source:
/// `head |= 1`, then steps of 2), assembled here:
/// ```text
///   or   esi, 1
/// l: movsxd rax, esi ; lea rax, [rdx+rax*4] ; cmp dword [rax], 1 ; jne s
///   mov  dword [rax], 3
/// s: add  esi, 0xfe ; movzx esi, sil ; cmp ebp, esi ; jne l ; ret
/// ```
#[test]
fn a_walk_stepping_by_two_after_or_one_is_the_unfixed_form() {
    let bytes: Vec<u8> = vec![
        0x83, 0xce, 0x01, // or esi,1
        0x48, 0x63, 0xc6, // movsxd rax,esi
        0x48, 0x8d, 0x04, 0x82, // lea rax,[rdx+rax*4]
        0x83, 0x38, 0x01, // cmp dword [rax],1
        0x75, 0x06, // jne +6
        0xc7, 0x00, 0x03, 0x00, 0x00, 0x00, // mov dword [rax],3
        0x81, 0xc6, 0xfe, 0x00, 0x00, 0x00, // add esi,0xfe
        0x40, 0x0f, 0xb6, 0xf6, // movzx esi,sil
        0x39, 0xf5, // cmp ebp,esi
        0x75, 0xe0, // jne l
        0xc3,
    ];
    let f = Function {
        name: "qi_submit_sync".into(),
        addr: 0x1000,
        bytes,
    };
    let walks = x86::decode(&f).unwrap().abort_walks();
    assert_eq!(
        walks,
        vec![AbortWalk {
            function: "qi_submit_sync".into(),
            offset: 3,
            step: -2,
            or_one_before: true,
        }]
    );
}

#[test]
fn a_call_into_the_callee_padding_still_counts() {
    // call rel32 from 0x1000 to 0x2000 - 16 (a call-depth thunk in the padding), then ret.
    let rel = (0x2000u64 - 16).wrapping_sub(0x1005) as u32;
    let mut bytes = vec![0xe8];
    bytes.extend_from_slice(&rel.to_le_bytes());
    bytes.push(0xc3);
    let f = Function {
        name: "f".into(),
        addr: 0x1000,
        bytes,
    };
    let d = x86::decode(&f).unwrap();
    assert_eq!(d.calls_to(&[0x2000]), 1);
    assert_eq!(d.calls_to(&[0x2000 + 64]), 0);
}
