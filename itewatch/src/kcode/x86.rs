//! x86-64 shapes the fix checks look for, on top of the iced-x86 decoder. Each helper counts
//! one kind of instruction in one function copy; [`super::assess`] decides what the counts mean.

use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic, OpKind, Register};

use super::Function;

/// `DMAR_IQER_REG` (drivers/iommu/intel/iommu.h, 6.1–7.3): the register holding the ITE SID.
pub const DMAR_IQER_REG: i64 = 0xb0;

/// `-ETIMEDOUT` (-110) as the low 32 bits of an immediate.
pub const MINUS_ETIMEDOUT: u32 = (-110i32) as u32;

/// Most instructions between a loop's head and its back edge for it to count as the ITE abort
/// walk (the walks seen are 7–10 instructions long).
const MAX_WALK_INSNS: usize = 40;

/// Bytes around a callee's start that a patched call may target (the 16-byte function padding
/// of CONFIG_CALL_PADDING kernels before it, an entry sequence after it).
const ENTRY_SLACK: u64 = 16;

/// How far before the walk's head `head |= 1` is looked for.
const OR_ONE_WINDOW: usize = 60;

/// The ITE abort walk of `qi_check_fault` as found in the code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AbortWalk {
    pub function: String,
    /// Offset of the loop head in that function.
    pub offset: u64,
    /// Index step modulo 256 as a signed number (-1 fixed, -2 unfixed); 0 when the loop body
    /// holds no single recognisable step.
    pub step: i32,
    /// An `or reg32, 1` precedes the loop (`head |= 1`, the unfixed form).
    pub or_one_before: bool,
}

/// One decoded function copy.
pub struct Decoded<'a> {
    func: &'a Function,
    insns: Vec<Instruction>,
}

/// Decodes every byte of `f` (padding after the last instruction decodes as `int3`/`nop`).
pub fn decode(f: &Function) -> Result<Decoded<'_>, String> {
    if f.bytes.is_empty() {
        return Err(format!("{}: no code bytes", f.name));
    }
    let mut d = Decoder::with_ip(64, &f.bytes, f.addr, DecoderOptions::NONE);
    let mut insns = Vec::with_capacity(f.bytes.len() / 4);
    let mut i = Instruction::default();
    while d.can_decode() {
        d.decode_out(&mut i);
        insns.push(i);
    }
    Ok(Decoded { func: f, insns })
}

fn is_gpr_base(r: Register) -> bool {
    r != Register::None && r != Register::RIP && r != Register::RSP && r != Register::EIP
}

fn is_mem(i: &Instruction, op: u32) -> bool {
    i.op_kind(op) == OpKind::Memory && is_gpr_base(i.memory_base())
}

fn is_imm(i: &Instruction, op: u32) -> bool {
    matches!(
        i.op_kind(op),
        OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64
    )
}

/// `cmp <mem>, imm`.
fn is_cmp_mem_imm(i: &Instruction, imm: u64) -> bool {
    i.mnemonic() == Mnemonic::Cmp
        && i.op_count() == 2
        && is_mem(i, 0)
        && is_imm(i, 1)
        && i.immediate(1) == imm
}

/// `mov <mem>, imm`.
fn is_store_imm(i: &Instruction, imm: u64) -> bool {
    i.mnemonic() == Mnemonic::Mov
        && i.op_count() == 2
        && is_mem(i, 0)
        && is_imm(i, 1)
        && i.immediate(1) == imm
}

fn is_branch(i: &Instruction) -> bool {
    matches!(
        i.flow_control(),
        FlowControl::Call | FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch
    ) && matches!(i.op0_kind(), OpKind::NearBranch64)
}

/// The index step an instruction makes, modulo 256, if it is -1 or -2.
fn step_of(i: &Instruction) -> Option<i32> {
    let reg32 = |op| i.op_kind(op) == OpKind::Register && i.op_register(op).is_gpr32();
    let raw: i64 = match i.mnemonic() {
        Mnemonic::Add if i.op_count() == 2 && reg32(0) && is_imm(i, 1) => {
            i.immediate(1) as i64 as i32 as i64
        }
        Mnemonic::Sub if i.op_count() == 2 && reg32(0) && is_imm(i, 1) => {
            -(i.immediate(1) as i64 as i32 as i64)
        }
        Mnemonic::Lea
            if reg32(0)
                && i.memory_index() == Register::None
                && i.memory_base() != Register::None =>
        {
            i.memory_displacement64() as i64 as i32 as i64
        }
        Mnemonic::Dec if reg32(0) => -1,
        _ => return None,
    };
    match raw.rem_euclid(256) {
        255 => Some(-1),
        254 => Some(-2),
        _ => None,
    }
}

fn is_or_one(i: &Instruction) -> bool {
    i.mnemonic() == Mnemonic::Or
        && i.op_count() == 2
        && i.op_kind(0) == OpKind::Register
        && i.op_register(0).is_gpr32()
        && is_imm(i, 1)
        && i.immediate(1) == 1
}

impl Decoded<'_> {
    fn index_of(&self, ip: u64) -> Option<usize> {
        self.insns.binary_search_by_key(&ip, |i| i.ip()).ok()
    }

    /// Direct calls and jumps (tail calls, conditional ones included) to any of `targets`.
    /// Also counted: a branch up to [`ENTRY_SLACK`] bytes before or after a target's start —
    /// the kernel may patch a call site to a thunk in the function's padding (call-depth
    /// tracking) or past its entry sequence (`endbr64`, FineIBT); no other code lives there.
    pub fn calls_to(&self, targets: &[u64]) -> usize {
        self.insns
            .iter()
            .filter(|i| is_branch(i))
            .filter(|i| {
                let t = i.near_branch_target();
                targets
                    .iter()
                    .any(|&a| t >= a.saturating_sub(ENTRY_SLACK) && t <= a + ENTRY_SLACK)
            })
            .count()
    }

    /// Compares of a memory operand at one of `disps` with `imm`, directly (`cmp [r+d], imm`)
    /// or through a register loaded from it just before (`mov e, [r+d]; cmp e, imm`).
    pub fn compares_with(&self, disps: &[i64], imm: u64) -> usize {
        let at = |i: &Instruction| {
            is_mem(i, if i.op_kind(0) == OpKind::Memory { 0 } else { 1 })
                && i.memory_index() == Register::None
                && disps.contains(&(i.memory_displacement64() as i64))
        };
        let mut n = 0;
        for (k, i) in self.insns.iter().enumerate() {
            if is_cmp_mem_imm(i, imm) && at(i) {
                n += 1;
                continue;
            }
            let loads = i.mnemonic() == Mnemonic::Mov
                && i.op_count() == 2
                && i.op_kind(0) == OpKind::Register
                && i.op_kind(1) == OpKind::Memory
                && at(i);
            if !loads {
                continue;
            }
            let r = i.op_register(0);
            let hit = self.insns[k + 1..].iter().take(3).any(|c| {
                c.mnemonic() == Mnemonic::Cmp
                    && c.op_kind(0) == OpKind::Register
                    && c.op_register(0).full_register() == r.full_register()
                    && is_imm(c, 1)
                    && c.immediate(1) == imm
            });
            if hit {
                n += 1;
            }
        }
        n
    }

    /// 8-byte loads from `[reg + disp]`.
    pub fn qword_loads_at(&self, disp: i64) -> usize {
        self.insns
            .iter()
            .filter(|i| {
                i.mnemonic() == Mnemonic::Mov
                    && i.op_count() == 2
                    && i.op_kind(0) == OpKind::Register
                    && i.op_register(0).is_gpr64()
                    && is_mem(i, 1)
                    && i.memory_index() == Register::None
                    && i.memory_displacement64() as i64 == disp
            })
            .count()
    }

    /// Operands whose immediate's low 32 bits equal `v`.
    pub fn immediates(&self, v: u32) -> usize {
        self.insns
            .iter()
            .filter(|i| (0..i.op_count()).any(|op| is_imm(i, op) && i.immediate(op) as u32 == v))
            .count()
    }

    /// Loops shaped like the ITE abort walk: a backward conditional branch whose body compares
    /// a memory slot with `QI_IN_USE` (1) and stores `QI_ABORT` (3) there, in the body or in a
    /// block the body branches to.
    pub fn abort_walks(&self) -> Vec<AbortWalk> {
        let mut out = Vec::new();
        for (bi, br) in self.insns.iter().enumerate() {
            if br.flow_control() != FlowControl::ConditionalBranch
                || br.op0_kind() != OpKind::NearBranch64
            {
                continue;
            }
            let t = br.near_branch_target();
            if t > br.ip() {
                continue;
            }
            let Some(start) = self.index_of(t) else {
                continue;
            };
            if bi - start > MAX_WALK_INSNS {
                continue;
            }
            let body = &self.insns[start..=bi];
            if !body.iter().any(|i| is_cmp_mem_imm(i, 1)) {
                continue;
            }
            let stores_abort = body.iter().any(|i| is_store_imm(i, 3))
                || body.iter().any(|i| {
                    is_branch(i)
                        && i.flow_control() != FlowControl::Call
                        && self
                            .index_of(i.near_branch_target())
                            .is_some_and(|k| is_store_imm(&self.insns[k], 3))
                });
            if !stores_abort {
                continue;
            }
            let mut steps: Vec<i32> = body.iter().filter_map(step_of).collect();
            steps.sort_unstable();
            steps.dedup();
            let step = match steps.as_slice() {
                [s] => *s,
                _ => 0,
            };
            let or_one_before = self.insns[start.saturating_sub(OR_ONE_WINDOW)..start]
                .iter()
                .any(is_or_one);
            out.push(AbortWalk {
                function: self.func.name.clone(),
                offset: t - self.func.addr,
                step,
                or_one_before,
            });
        }
        out
    }
}
