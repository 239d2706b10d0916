//! The floor: programs of the same types as smtpflow's that do nothing but return, loaded by aya
//! from an ELF object written here in memory, and test-run through the same aya API as the real
//! programs. Each is the two instructions `r0 = <verdict>; exit`, exactly what
//! `#[classifier] fn f(_: TcContext) -> i32 { TC_ACT_UNSPEC }` (or the `#[xdp]` equivalent
//! returning `XDP_PASS`) compiles to; writing them out saves a second kernel-crate build and
//! leaves the real object untouched.
//!
//! Beside them, the floor of any observer that looks at a packet at all: programs that read the
//! header fields a port filter needs (the Ethernet type, IPv4's version and protocol, the TCP
//! ports) behind one bounds check, and return. What they cost over the empty programs is the
//! packet's header reads alone, cache misses included, with no decision made on them.
use anyhow::Context as _;
use aya::{
    Ebpf,
    programs::{SchedClassifier, TcAttachType, Xdp, XdpMode},
};
use object::{
    Architecture, BinaryFormat, Endianness, SectionKind, SymbolFlags, SymbolKind, SymbolScope,
    write::{Object, Symbol, SymbolSection},
};
use smtpflow_tests::{Netns, in_netns};

pub const EMPTY_TC: &str = "empty_tc";
pub const EMPTY_XDP: &str = "empty_xdp";
pub const HEADERS_TC: &str = "headers_tc";
pub const HEADERS_XDP: &str = "headers_xdp";

/// One instruction: `op`, registers `dst` and `src`, offset and immediate.
fn insn(op: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let [o0, o1] = off.to_le_bytes();
    let [i0, i1, i2, i3] = imm.to_le_bytes();
    [op, (src << 4) | dst, o0, o1, i0, i1, i2, i3]
}

/// `r0 = imm` (BPF_ALU64 | BPF_MOV | BPF_K), then `exit`.
fn return_imm(imm: i32) -> Vec<u8> {
    [insn(0xb7, 0, 0, 0, imm), insn(0x95, 0, 0, 0, 0)].concat()
}

/// The context offsets of the packet's `data` and `data_end` (`struct __sk_buff`, `struct
/// xdp_md`).
const SKB_DATA: i16 = 76;
const SKB_DATA_END: i16 = 80;
const XDP_DATA: i16 = 0;
const XDP_DATA_END: i16 = 4;

/// Reads the Ethernet type, IPv4's version byte and protocol, and the TCP ports of an untagged
/// IPv4 frame (54 bytes, one bounds check), stopping at the first that is not IPv4 or TCP, then
/// returns `verdict`: what a port filter must read before it can tell whether a segment is
/// one to look at.
fn read_headers(data: i16, data_end: i16, verdict: i32) -> Vec<u8> {
    const LDX_W: u8 = 0x61; // r_dst = *(u32 *)(r_src + off)
    const LDX_H: u8 = 0x69;
    const LDX_B: u8 = 0x71;
    const MOV_X: u8 = 0xbf; // r_dst = r_src
    const ADD_K: u8 = 0x07; // r_dst += imm
    const JGT_X: u8 = 0x2d; // if r_dst > r_src goto +off
    const JNE_K: u8 = 0x55; // if r_dst != imm goto +off
    // Every jump goes to the `r0 = verdict` at index 12.
    let to_end = |at: i16| 12 - at - 1;
    let code = [
        insn(LDX_W, 2, 1, data, 0),
        insn(LDX_W, 3, 1, data_end, 0),
        insn(MOV_X, 4, 2, 0, 0),
        insn(ADD_K, 4, 0, 0, 54),
        insn(JGT_X, 4, 3, to_end(4), 0),
        insn(LDX_H, 5, 2, 12, 0), // Ethernet type, as loaded: 0x0800 in wire order
        insn(JNE_K, 5, 0, to_end(6), 0x0008),
        insn(LDX_B, 5, 2, 14, 0), // IPv4 version and header length: no options
        insn(JNE_K, 5, 0, to_end(8), 0x45),
        insn(LDX_B, 5, 2, 23, 0), // protocol
        insn(JNE_K, 5, 0, to_end(10), 6),
        insn(LDX_W, 5, 2, 34, 0), // the TCP source and destination ports
    ];
    let mut insns: Vec<u8> = code.concat();
    insns.extend(return_imm(verdict));
    insns
}

fn object() -> anyhow::Result<Vec<u8>> {
    let mut obj = Object::new(BinaryFormat::Elf, Architecture::Bpf, Endianness::Little);
    // TC_ACT_UNSPEC (-1) and XDP_PASS (2), as smtpflow's programs return.
    let programs = [
        ("classifier", EMPTY_TC, return_imm(-1)),
        ("xdp", EMPTY_XDP, return_imm(2)),
        ("classifier", HEADERS_TC, read_headers(SKB_DATA, SKB_DATA_END, -1)),
        ("xdp", HEADERS_XDP, read_headers(XDP_DATA, XDP_DATA_END, 2)),
    ];
    for (section, name, code) in programs {
        let id = obj.add_section(Vec::new(), section.as_bytes().to_vec(), SectionKind::Text);
        let offset = obj.append_section_data(id, &code, 8);
        obj.add_symbol(Symbol {
            name: name.as_bytes().to_vec(),
            value: offset,
            size: code.len() as u64,
            kind: SymbolKind::Text,
            scope: SymbolScope::Dynamic,
            weak: false,
            section: SymbolSection::Section(id),
            flags: SymbolFlags::None,
        });
    }
    let license = obj.add_section(Vec::new(), b"license".to_vec(), SectionKind::Data);
    obj.append_section_data(license, b"GPL\0", 1);
    obj.write().context("writing the empty programs' ELF object")
}

/// Loads the empty and the header-reading TC and XDP programs (not attached anywhere).
pub fn load() -> anyhow::Result<Ebpf> {
    let mut ebpf = Ebpf::load(&object()?).context("loading the empty programs")?;
    for name in [EMPTY_TC, HEADERS_TC] {
        let tc: &mut SchedClassifier =
            ebpf.program_mut(name).with_context(|| format!("{name} missing"))?.try_into()?;
        tc.load().with_context(|| format!("loading {name}"))?;
    }
    for name in [EMPTY_XDP, HEADERS_XDP] {
        let xdp: &mut Xdp =
            ebpf.program_mut(name).with_context(|| format!("{name} missing"))?.try_into()?;
        xdp.load().with_context(|| format!("loading {name}"))?;
    }
    Ok(ebpf)
}

/// Empty programs attached to an interface; detached when dropped.
pub struct Attached {
    _held: Vec<Ebpf>,
}

/// Attaches the empty TC program to TCX ingress and egress of `iface` in `ns`, after whatever is
/// there already (TCX runs every program in turn: smtpflow's return `TC_ACT_UNSPEC`, "next", so
/// both see every packet). One load per direction, so that the kernel accounts them apart, as it
/// does smtpflow's `smtpflow_tc_in` and `smtpflow_tc_out`.
pub fn attach_tc(ns: &Netns, iface: &str) -> anyhow::Result<Attached> {
    attach_tc_program(ns, iface, EMPTY_TC)
}

/// Attaches the TC program `name` of this object ([`EMPTY_TC`], [`HEADERS_TC`]) as
/// [`attach_tc`] does.
pub fn attach_tc_program(ns: &Netns, iface: &str, name: &'static str) -> anyhow::Result<Attached> {
    let mut held = Vec::new();
    for t in [TcAttachType::Ingress, TcAttachType::Egress] {
        let mut ebpf = load()?;
        let iface = iface.to_owned();
        held.push(in_netns(ns, move || -> anyhow::Result<Ebpf> {
            let p: &mut SchedClassifier =
                ebpf.program_mut(name).with_context(|| format!("{name} missing"))?.try_into()?;
            p.attach(&iface, t).with_context(|| format!("attaching {name} to {iface} {t:?}"))?;
            Ok(ebpf)
        })?);
    }
    Ok(Attached { _held: held })
}

/// Attaches the empty XDP program to `iface` in `ns` in driver mode, as smtpflow attaches on
/// veth. An interface has one XDP program only: this cannot run beside smtpflow's.
pub fn attach_xdp(ns: &Netns, iface: &str) -> anyhow::Result<Attached> {
    let mut ebpf = load()?;
    let iface = iface.to_owned();
    let ebpf = in_netns(ns, move || -> anyhow::Result<Ebpf> {
        let p: &mut Xdp = ebpf.program_mut(EMPTY_XDP).context("empty_xdp missing")?.try_into()?;
        p.attach(&iface, XdpMode::Driver).with_context(|| {
            format!("attaching empty_xdp to {iface} (is another XDP program attached?)")
        })?;
        Ok(ebpf)
    })?;
    Ok(Attached { _held: vec![ebpf] })
}
