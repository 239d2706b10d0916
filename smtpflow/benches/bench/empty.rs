//! The floor: programs of the same types as smtpflow's that do nothing but return, loaded by aya
//! from an ELF object written here in memory, and test-run through the same aya API as the real
//! programs. Each is the two instructions `r0 = <verdict>; exit`, exactly what
//! `#[classifier] fn f(_: TcContext) -> i32 { TC_ACT_UNSPEC }` (or the `#[xdp]` equivalent
//! returning `XDP_PASS`) compiles to; writing them out saves a second kernel-crate build and
//! leaves the real object untouched.
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

/// `r0 = imm` (BPF_ALU64 | BPF_MOV | BPF_K), then `exit`.
fn return_imm(imm: i32) -> Vec<u8> {
    let mut insns = vec![0xb7, 0x00, 0, 0];
    insns.extend_from_slice(&imm.to_le_bytes());
    insns.extend_from_slice(&[0x95, 0, 0, 0, 0, 0, 0, 0]);
    insns
}

fn object() -> anyhow::Result<Vec<u8>> {
    let mut obj = Object::new(BinaryFormat::Elf, Architecture::Bpf, Endianness::Little);
    // TC_ACT_UNSPEC (-1) and XDP_PASS (2), as smtpflow's programs return.
    for (section, name, verdict) in [("classifier", EMPTY_TC, -1), ("xdp", EMPTY_XDP, 2)] {
        let code = return_imm(verdict);
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

/// Loads the empty TC and XDP programs (not attached anywhere).
pub fn load() -> anyhow::Result<Ebpf> {
    let mut ebpf = Ebpf::load(&object()?).context("loading the empty programs")?;
    let tc: &mut SchedClassifier =
        ebpf.program_mut(EMPTY_TC).context("empty_tc missing")?.try_into()?;
    tc.load().context("loading empty_tc")?;
    let xdp: &mut Xdp = ebpf.program_mut(EMPTY_XDP).context("empty_xdp missing")?.try_into()?;
    xdp.load().context("loading empty_xdp")?;
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
    let mut held = Vec::new();
    for t in [TcAttachType::Ingress, TcAttachType::Egress] {
        let mut ebpf = load()?;
        let iface = iface.to_owned();
        held.push(in_netns(ns, move || -> anyhow::Result<Ebpf> {
            let p: &mut SchedClassifier =
                ebpf.program_mut(EMPTY_TC).context("empty_tc missing")?.try_into()?;
            p.attach(&iface, t).with_context(|| format!("attaching empty_tc to {iface} {t:?}"))?;
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
