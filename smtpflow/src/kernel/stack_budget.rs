//! The programs' stack budget, read from the embedded object. The frames of a program and of
//! every BPF function it calls share one 512-byte stack, which the verifier sums along the
//! deepest chain of calls (each frame rounded up to 32 bytes). Kernels differ in what they
//! accept beyond it (6.18 here took a 544-byte chain that 6.1 refused), so the budget is
//! checked on the object itself, on any host.
use std::collections::BTreeMap;

use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget};

/// A place in the object: (section index, instruction index).
type At = (usize, u64);

/// The stack the verifier lets a chain of calls use (`MAX_BPF_STACK`).
const MAX_STACK: u64 = 512;
const INSN: u64 = 8;
const CALL: u8 = 0x85;
const PSEUDO_CALL: u8 = 1;
const R10: u8 = 10;

/// A function: where it starts (section, instruction index), its frame, whom it calls.
struct Function {
    name: String,
    frame: u64,
    calls: Vec<At>,
}

/// The functions of every executable section, by (section, first instruction).
fn functions(obj: &object::File) -> BTreeMap<At, Function> {
    let mut starts: BTreeMap<At, String> = BTreeMap::new();
    for sym in obj.symbols() {
        if sym.kind() == object::SymbolKind::Text
            && let Some(sec) = sym.section_index()
        {
            starts.insert((sec.0, sym.address() / INSN), sym.name().unwrap_or("?").to_owned());
        }
    }
    let mut out = BTreeMap::new();
    for section in obj.sections() {
        let Ok(code) = section.data() else { continue };
        let sec = section.index().0;
        // A call into another section carries a relocation: the target is its symbol's place
        // plus the call's immediate plus one.
        let relocated: BTreeMap<u64, At> = section
            .relocations()
            .filter_map(|(at, r)| match r.target() {
                RelocationTarget::Symbol(s) => obj
                    .symbol_by_index(s)
                    .ok()
                    .and_then(|s| Some((at / INSN, (s.section_index()?.0, s.address() / INSN)))),
                _ => None,
            })
            .collect();
        let mut current: Option<(u64, Function)> = None;
        for (pc, insn) in code.chunks_exact(INSN as usize).enumerate() {
            let pc = pc as u64;
            if let Some(name) = starts.get(&(sec, pc)) {
                if let Some((at, f)) = current.take() {
                    out.insert((sec, at), f);
                }
                current = Some((pc, Function { name: name.clone(), frame: 0, calls: Vec::new() }));
            }
            let Some((_, f)) = current.as_mut() else { continue };
            let (op, dst, src) = (insn[0], insn[1] & 0x0f, insn[1] >> 4);
            let off = i16::from_le_bytes([insn[2], insn[3]]);
            let imm = i32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]);
            let class = op & 0x07;
            // LDX reads [src + off]; ST and STX write [dst + off].
            let base = match class {
                0x01 => Some(src),
                0x02 | 0x03 => Some(dst),
                _ => None,
            };
            if base == Some(R10) && off < 0 {
                f.frame = f.frame.max(u64::from(off.unsigned_abs()));
            }
            if op == CALL && src == PSEUDO_CALL {
                let (tsec, base) = relocated.get(&pc).copied().unwrap_or((sec, pc));
                let target = (tsec, (base as i64 + i64::from(imm) + 1) as u64);
                f.calls.push(target);
            }
        }
        if let Some((at, f)) = current {
            out.insert((sec, at), f);
        }
    }
    out
}

/// The deepest chain from `at`: its stack and the functions on it.
fn deepest(fns: &BTreeMap<At, Function>, at: At, depth: usize) -> (u64, Vec<String>) {
    let Some(f) = fns.get(&at) else { return (0, Vec::new()) };
    let own = f.frame.max(1).div_ceil(32) * 32;
    let mut best = (0, Vec::new());
    // BPF forbids recursion; the depth bound only guards against a misread call.
    if depth < 16 {
        for &c in &f.calls {
            let below = deepest(fns, c, depth + 1);
            if below.0 > best.0 {
                best = below;
            }
        }
    }
    let mut chain = vec![format!("{} ({} B)", readable(&f.name), f.frame)];
    chain.extend(best.1);
    (own + best.0, chain)
}

/// `observe::observe_smtp` for a Rust (v0) symbol of this crate: the path after the crate's
/// name, each part written as its length and its text; other symbols as they are.
fn readable(symbol: &str) -> String {
    let Some(at) = symbol.find("8smtpflow") else { return symbol.to_owned() };
    let mut rest = &symbol[at + "8smtpflow".len()..];
    let mut parts = Vec::new();
    while let Some(digits) = rest.find(|c: char| !c.is_ascii_digit()).filter(|&d| d > 0) {
        let Ok(n) = rest[..digits].parse::<usize>() else { break };
        let Some(part) = rest.get(digits..digits + n) else { break };
        parts.push(part);
        rest = &rest[digits + n..];
    }
    if parts.is_empty() { symbol.to_owned() } else { parts.join("::") }
}

#[test]
fn every_program_fits_the_stack_linux_6_1_allows() {
    let bytes = super::EBPF_OBJECT;
    if bytes.is_empty() {
        assert!(
            std::env::var_os("AYA_BUILD_SKIP").is_some(),
            "no kernel object embedded, and AYA_BUILD_SKIP is not set"
        );
        eprintln!("SKIPPED: built with AYA_BUILD_SKIP=1, no kernel object to check");
        return;
    }
    let obj = object::File::parse(bytes).expect("the embedded kernel object is ELF");
    let fns = functions(&obj);
    let mut programs = 0;
    for section in obj.sections() {
        let name = section.name().unwrap_or_default();
        if name == ".text" || section.kind() != object::SectionKind::Text {
            continue;
        }
        for (&(sec, at), _) in fns.range((section.index().0, 0)..=(section.index().0, u64::MAX)) {
            let (stack, chain) = deepest(&fns, (sec, at), 0);
            eprintln!("{name}: {stack} of {MAX_STACK} stack bytes: {}", chain.join(" -> "));
            assert!(
                stack <= MAX_STACK,
                "{name} needs {stack} bytes of stack along {}; older verifiers (6.1) refuse more \
                 than {MAX_STACK}",
                chain.join(" -> ")
            );
            programs += 1;
        }
    }
    assert!(programs >= 5, "only {programs} programs found in the object");
}
