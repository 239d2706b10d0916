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
//!
//! And the floor of the tables the churn issue (#15) proposes: programs that, after those
//! reads, touch one slot of a peer table and one of a flow table for each SYN, the least any
//! exact per-peer, per-connection observer does ([`tables_program`]).
use std::mem::offset_of;

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    programs::{Program, SchedClassifier, TcAttachType, Xdp, XdpMode},
};
use object::{
    Architecture, BinaryFormat, Endianness, RelocationFlags, SectionKind, SymbolFlags, SymbolKind,
    SymbolScope,
    write::{Object, Relocation, Symbol, SymbolSection},
};
use smtpflow_common::{
    DEFAULT_MAX_FLOWS, DEFAULT_MAX_PEERS, FlowKey, FlowState, PeerCounters, PeerKey,
};
use smtpflow_tests::{Netns, in_netns};

pub const EMPTY_TC: &str = "empty_tc";
pub const EMPTY_XDP: &str = "empty_xdp";
pub const HEADERS_TC: &str = "headers_tc";
pub const HEADERS_XDP: &str = "headers_xdp";
pub const TABLES_TC: &str = "tables_tc";
pub const TABLES_XDP: &str = "tables_xdp";
pub const LOG_TC: &str = "log_tc";
pub const LOG_XDP: &str = "log_xdp";

/// One instruction: `op`, registers `dst` and `src`, offset and immediate.
fn insn(op: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let [o0, o1] = off.to_le_bytes();
    let [i0, i1, i2, i3] = imm.to_le_bytes();
    [op, (src << 4) | dst, o0, o1, i0, i1, i2, i3]
}

/// `r0 = imm` (BPF_ALU64 | BPF_MOV | BPF_K), then `exit`.
fn return_imm(imm: i32) -> Vec<u8> {
    [insn(MOV_K, 0, 0, 0, imm), insn(EXIT, 0, 0, 0, 0)].concat()
}

/// The context offsets of the packet's `data` and `data_end` (`struct __sk_buff`, `struct
/// xdp_md`).
const SKB_DATA: i16 = 76;
const SKB_DATA_END: i16 = 80;
const XDP_DATA: i16 = 0;
const XDP_DATA_END: i16 = 4;

// The opcodes the floor programs use.
const LDX_W: u8 = 0x61; // r_dst = *(u32 *)(r_src + off)
const LDX_H: u8 = 0x69;
const LDX_B: u8 = 0x71;
const STX_W: u8 = 0x63; // *(u32 *)(r_dst + off) = r_src
const LDX_DW: u8 = 0x79; // r_dst = *(u64 *)(r_src + off)
const STX_DW: u8 = 0x7b; // *(u64 *)(r_dst + off) = r_src
const MOV_X: u8 = 0xbf; // r_dst = r_src
const MOV_K: u8 = 0xb7; // r_dst = imm
const MOV32_X: u8 = 0xbc; // w_dst = w_src
const ADD_K: u8 = 0x07; // r_dst += imm
const AND_K: u8 = 0x57; // r_dst &= imm
const XOR_X: u8 = 0xaf; // r_dst ^= r_src
const OR_X: u8 = 0x4f; // r_dst |= r_src
const LSH_K: u8 = 0x67; // r_dst <<= imm
const MUL32_K: u8 = 0x24; // w_dst *= imm
const RSH32_K: u8 = 0x74; // w_dst >>= imm
const JGT_X: u8 = 0x2d; // if r_dst > r_src goto +off
const JNE_K: u8 = 0x55; // if r_dst != imm goto +off
const JEQ_K: u8 = 0x15; // if r_dst == imm goto +off
const LD_IMM64: u8 = 0x18; // r_dst = imm64 (two slots; a map's, relocated by the loader)
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
const MAP_LOOKUP_ELEM: i32 = 1;
const GET_SMP_PROCESSOR_ID: i32 = 8;

/// A program being written: its instructions, the jumps to its end that [`Asm::finish`]
/// patches, and where it loads a map's address (relocated by the loader, as the compiler's
/// output is).
#[derive(Default)]
struct Asm {
    insns: Vec<[u8; 8]>,
    to_end: Vec<usize>,
    maps: Vec<(usize, &'static str)>,
}

/// A written program: its bytes, and the byte offset of each map load with the map's name.
struct Written {
    code: Vec<u8>,
    maps: Vec<(u64, &'static str)>,
}

impl Asm {
    fn op(&mut self, op: u8, dst: u8, src: u8, off: i16, imm: i32) -> &mut Self {
        self.insns.push(insn(op, dst, src, off, imm));
        self
    }

    /// A conditional jump to the program's end (the `r0 = verdict` of [`Asm::finish`]).
    fn jump_to_end(&mut self, op: u8, dst: u8, src: u8, imm: i32) -> &mut Self {
        self.to_end.push(self.insns.len());
        self.op(op, dst, src, 0, imm)
    }

    /// `r_dst = &map`: a 64-bit immediate the loader fills with the map's descriptor.
    fn map(&mut self, dst: u8, name: &'static str) -> &mut Self {
        self.maps.push((self.insns.len(), name));
        self.op(LD_IMM64, dst, 0, 0, 0).op(0, 0, 0, 0, 0)
    }

    /// `r0 = &table[w1]`, or the end when there is no such element: one array lookup, which
    /// the verifier inlines (no call is made; the test is the verifier's, for an index out of
    /// range).
    fn lookup(&mut self, table: &'static str) -> &mut Self {
        self.op(STX_W, 10, 1, -4, 0)
            .map(1, table)
            .op(MOV_X, 2, 10, 0, 0)
            .op(ADD_K, 2, 0, 0, -4)
            .op(CALL, 0, 0, 0, MAP_LOOKUP_ELEM)
            .jump_to_end(JEQ_K, 0, 0, 0)
    }

    /// Ends the program with `r0 = verdict; exit`, where every jump to the end lands.
    fn finish(mut self, verdict: i32) -> Written {
        let end = self.insns.len();
        for at in self.to_end {
            let off = i16::try_from(end - at - 1).expect("a short program");
            self.insns[at][2..4].copy_from_slice(&off.to_le_bytes());
        }
        let mut code: Vec<u8> = self.insns.concat();
        code.extend(return_imm(verdict));
        let maps = self.maps.into_iter().map(|(at, name)| ((at * 8) as u64, name)).collect();
        Written { code, maps }
    }
}

/// Reads the Ethernet type, IPv4's version byte and protocol, and the TCP ports of an untagged
/// IPv4 frame (54 bytes, one bounds check), stopping at the first that is not IPv4 or TCP:
/// what a port filter must read before it can tell whether a segment is one to look at.
/// Leaves the packet's start in r2 and the ports in r5.
fn read_headers(a: &mut Asm, data: i16, data_end: i16) {
    a.op(LDX_W, 2, 1, data, 0)
        .op(LDX_W, 3, 1, data_end, 0)
        .op(MOV_X, 4, 2, 0, 0)
        .op(ADD_K, 4, 0, 0, 54)
        .jump_to_end(JGT_X, 4, 3, 0)
        .op(LDX_H, 5, 2, 12, 0) // Ethernet type, as loaded: 0x0800 in wire order
        .jump_to_end(JNE_K, 5, 0, 0x0008)
        .op(LDX_B, 5, 2, 14, 0) // IPv4 version and header length: no options
        .jump_to_end(JNE_K, 5, 0, 0x45)
        .op(LDX_B, 5, 2, 23, 0) // protocol
        .jump_to_end(JNE_K, 5, 0, 6)
        .op(LDX_W, 5, 2, 34, 0); // the TCP source and destination ports
}

fn headers_program(data: i16, data_end: i16, verdict: i32) -> Written {
    let mut a = Asm::default();
    read_headers(&mut a, data, data_end);
    a.finish(verdict)
}

/// The floor's tables, as big as smtpflow's maps are by default: a slot a peer of `--max-peers`
/// and a slot a flow of `--max-flows`, each the size of smtpflow's key and value.
const TABLE_PEERS: &str = "table_peers";
const TABLE_FLOWS: &str = "table_flows";
/// Where in a slot the floor writes: the first counter after the peer's key, the client's
/// sequence number after the flow's key.
const PEER_COUNT_AT: usize = size_of::<PeerKey>().next_multiple_of(8);
const PEER_SLOT: usize = PEER_COUNT_AT + size_of::<PeerCounters>();
const FLOW_STATE_AT: usize = size_of::<FlowKey>().next_multiple_of(8);
const FLOW_SEQ_AT: usize = FLOW_STATE_AT + offset_of!(FlowState, client_isn);
const FLOW_SLOT: usize = FLOW_STATE_AT + size_of::<FlowState>();
const _: () = assert!(DEFAULT_MAX_PEERS.is_power_of_two() && DEFAULT_MAX_FLOWS.is_power_of_two());

/// `r0` = the slot of `table` (of `slots` entries) at a multiplicative hash of the 32 bits in
/// `reg` ([`Asm::lookup`]).
fn slot(a: &mut Asm, reg: u8, table: &'static str, slots: u32) {
    const GOLDEN: u32 = 0x9e37_79b1;
    a.op(MOV32_X, 1, reg, 0, 0)
        .op(MUL32_K, 1, 0, 0, GOLDEN as i32)
        .op(RSH32_K, 1, 0, 0, 32 - slots.trailing_zeros() as i32)
        .lookup(table);
}

/// The fields both floors use of a segment with SYN set (the end for any other): after the
/// header reads, the source address in r6, the sequence number in r7 and a hash of the 4-tuple
/// in r8 (r6-r9 survive calls), and the destination address in r1.
fn syn_fields(a: &mut Asm, data: i16, data_end: i16) {
    const SYN: i32 = 0x02;
    read_headers(a, data, data_end);
    a.op(LDX_B, 6, 2, 47, 0) // the TCP flags
        .op(AND_K, 6, 0, 0, SYN)
        .jump_to_end(JEQ_K, 6, 0, 0)
        .op(LDX_W, 6, 2, 26, 0) // the source address
        .op(LDX_W, 1, 2, 30, 0) // the destination address
        .op(LDX_W, 7, 2, 38, 0) // the sequence number
        .op(MOV_X, 8, 6, 0, 0)
        .op(XOR_X, 8, 1, 0, 0)
        .op(XOR_X, 8, 5, 0, 0); // with the ports
}

/// The floor of any observer that keeps exact per-peer counts and follows each connection from
/// its SYN, with direct-mapped tables and nothing else: after the header reads, a segment with
/// SYN set adds one to a counter in its source's slot of a peer table and writes its sequence
/// number into its 4-tuple's slot of a flow table. One array access each, at a multiplicative
/// hash: no key compare, no ways, no collision handling, no clock, no other counter. The add is
/// a plain one, as a per-CPU table would allow; a table shared by the CPUs needs an atomic add,
/// which on a line out of the cache costs more. Every design that keeps per-peer counters in
/// kernel tables does at least this; a SYN of a new peer or a new connection finds its slots
/// out of the CPU's caches, as it would in a real table of that size.
fn tables_program(data: i16, data_end: i16, verdict: i32) -> Written {
    let mut a = Asm::default();
    syn_fields(&mut a, data, data_end);
    slot(&mut a, 6, TABLE_PEERS, DEFAULT_MAX_PEERS);
    let count = PEER_COUNT_AT as i16;
    a.op(LDX_DW, 1, 0, count, 0).op(ADD_K, 1, 0, 0, 1).op(STX_DW, 0, 1, count, 0);
    slot(&mut a, 8, TABLE_FLOWS, DEFAULT_MAX_FLOWS);
    a.op(STX_W, 0, 7, FLOW_SEQ_AT as i16, 0);
    a.finish(verdict)
}

/// The log's tables: each CPU's next record (a per-CPU counter), and the records, 2^20 of 16
/// bytes a CPU (16 MiB), a CPU's run at its number shifted by [`LOG_BITS`].
const LOG_HEAD: &str = "log_head";
const LOG: &str = "log";
const LOG_BITS: u32 = 20;

/// The floor of the other way to count per peer exactly: each SYN appends a record of its
/// addresses to a log of its CPU's (written in order, so its lines are the ones just written,
/// never a random one), which userspace would read and add up per peer; and, as in
/// [`tables_program`], writes its sequence number into its 4-tuple's slot of the flow table,
/// which the handshake's outcome needs in the kernel. Nothing else: no wrap detection, no
/// publication to userspace.
fn log_program(data: i16, data_end: i16, verdict: i32) -> Written {
    let mut a = Asm::default();
    syn_fields(&mut a, data, data_end);
    a.op(LSH_K, 1, 0, 0, 32)
        .op(OR_X, 6, 1, 0, 0) // the record: both addresses
        .op(CALL, 0, 0, 0, GET_SMP_PROCESSOR_ID)
        .op(MOV_X, 9, 0, 0, 0)
        .op(LSH_K, 9, 0, 0, LOG_BITS as i32)
        .op(MOV_K, 1, 0, 0, 0)
        .lookup(LOG_HEAD) // this CPU's next record
        .op(LDX_DW, 1, 0, 0, 0)
        .op(MOV_X, 2, 1, 0, 0)
        .op(ADD_K, 2, 0, 0, 1)
        .op(STX_DW, 0, 2, 0, 0)
        .op(AND_K, 1, 0, 0, (1 << LOG_BITS) - 1)
        .op(OR_X, 1, 9, 0, 0)
        .lookup(LOG)
        .op(STX_DW, 0, 6, 0, 0)
        .op(STX_DW, 0, 7, 8, 0);
    slot(&mut a, 8, TABLE_FLOWS, DEFAULT_MAX_FLOWS);
    a.op(STX_W, 0, 7, FLOW_SEQ_AT as i16, 0);
    a.finish(verdict)
}

/// A legacy map definition (`struct bpf_map_def`: type, key size, value size, entries, flags,
/// id, pinning) of an array of `entries` slots of `slot` bytes (per CPU with `per_cpu`).
fn array_def(entries: u32, slot: usize, per_cpu: bool) -> Vec<u8> {
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
    let kind = if per_cpu { BPF_MAP_TYPE_PERCPU_ARRAY } else { BPF_MAP_TYPE_ARRAY };
    let fields = [kind, 4, slot as u32, entries, 0, 0, 0];
    fields.iter().flat_map(|f| f.to_le_bytes()).collect()
}

/// Room in the log for every possible CPU's run.
fn log_records() -> u32 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    cpus.next_power_of_two() << LOG_BITS
}

/// The ELF object of the empty and header-reading programs, and with `floors` the tables' and
/// the log's too, with the maps they use: only a load that runs them pays for those (some 60
/// MiB, allocated and zeroed by the kernel at load, and freed after the programs are gone).
fn object(floors: bool) -> anyhow::Result<Vec<u8>> {
    let mut obj = Object::new(BinaryFormat::Elf, Architecture::Bpf, Endianness::Little);
    // TC_ACT_UNSPEC (-1) and XDP_PASS (2), as smtpflow's programs return.
    let empty = |verdict| Written { code: return_imm(verdict), maps: Vec::new() };
    let mut programs = vec![
        ("classifier", EMPTY_TC, empty(-1)),
        ("xdp", EMPTY_XDP, empty(2)),
        ("classifier", HEADERS_TC, headers_program(SKB_DATA, SKB_DATA_END, -1)),
        ("xdp", HEADERS_XDP, headers_program(XDP_DATA, XDP_DATA_END, 2)),
    ];
    let mut map_symbols = Vec::new();
    if floors {
        programs.extend([
            ("classifier", TABLES_TC, tables_program(SKB_DATA, SKB_DATA_END, -1)),
            ("xdp", TABLES_XDP, tables_program(XDP_DATA, XDP_DATA_END, 2)),
            ("classifier", LOG_TC, log_program(SKB_DATA, SKB_DATA_END, -1)),
            ("xdp", LOG_XDP, log_program(XDP_DATA, XDP_DATA_END, 2)),
        ]);
        let maps = obj.add_section(Vec::new(), b"maps".to_vec(), SectionKind::Data);
        for (name, def) in [
            (TABLE_PEERS, array_def(DEFAULT_MAX_PEERS, PEER_SLOT, false)),
            (TABLE_FLOWS, array_def(DEFAULT_MAX_FLOWS, FLOW_SLOT, false)),
            (LOG_HEAD, array_def(1, 8, true)),
            (LOG, array_def(log_records(), 16, false)),
        ] {
            let offset = obj.append_section_data(maps, &def, 4);
            let symbol = obj.add_symbol(Symbol {
                name: name.as_bytes().to_vec(),
                value: offset,
                size: def.len() as u64,
                kind: SymbolKind::Data,
                scope: SymbolScope::Dynamic,
                weak: false,
                section: SymbolSection::Section(maps),
                flags: SymbolFlags::None,
            });
            map_symbols.push((name, symbol));
        }
    }
    for (section, name, program) in programs {
        let id = obj.add_section(Vec::new(), section.as_bytes().to_vec(), SectionKind::Text);
        let offset = obj.append_section_data(id, &program.code, 8);
        obj.add_symbol(Symbol {
            name: name.as_bytes().to_vec(),
            value: offset,
            size: program.code.len() as u64,
            kind: SymbolKind::Text,
            scope: SymbolScope::Dynamic,
            weak: false,
            section: SymbolSection::Section(id),
            flags: SymbolFlags::None,
        });
        for (at, map) in program.maps {
            let (_, symbol) = map_symbols.iter().find(|(n, _)| *n == map).context("a map")?;
            obj.add_relocation(
                id,
                Relocation {
                    offset: offset + at,
                    symbol: *symbol,
                    addend: 0,
                    flags: RelocationFlags::Elf { r_type: object::elf::R_BPF_64_64 },
                },
            )
            .context("relocating a map load")?;
        }
    }
    let license = obj.add_section(Vec::new(), b"license".to_vec(), SectionKind::Data);
    obj.append_section_data(license, b"GPL\0", 1);
    obj.write().context("writing the empty programs' ELF object")
}

/// Loads every program of this object, the floors with their maps included (not attached
/// anywhere).
pub fn load() -> anyhow::Result<Ebpf> {
    load_object(true)
}

/// Loads what attaching `name` needs: the floors' programs and maps only for a floor.
fn load_for(name: &str) -> anyhow::Result<Ebpf> {
    load_object([TABLES_TC, TABLES_XDP, LOG_TC, LOG_XDP].contains(&name))
}

fn load_object(floors: bool) -> anyhow::Result<Ebpf> {
    let mut ebpf = Ebpf::load(&object(floors)?).context("loading the empty programs")?;
    for (name, program) in ebpf.programs_mut() {
        match program {
            Program::SchedClassifier(p) => p.load(),
            Program::Xdp(p) => p.load(),
            _ => bail!("{name}: not a TC or XDP program"),
        }
        .with_context(|| format!("loading {name}"))?;
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

/// Attaches the TC program `name` of this object ([`EMPTY_TC`], [`HEADERS_TC`], [`TABLES_TC`],
/// [`LOG_TC`]) as [`attach_tc`] does.
pub fn attach_tc_program(ns: &Netns, iface: &str, name: &'static str) -> anyhow::Result<Attached> {
    let mut held = Vec::new();
    for t in [TcAttachType::Ingress, TcAttachType::Egress] {
        let mut ebpf = load_for(name)?;
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

/// The XDP mode `smtpflow watch --mode xdp` attaches in on veth (`--xdp-mode auto`): the mode
/// the XDP floors are measured in, so that they compare with smtpflow's program.
pub const SMTPFLOW_XDP_MODE: XdpMode = XdpMode::Skb;

/// Attaches the empty XDP program to `iface` in `ns` in `mode` ([`SMTPFLOW_XDP_MODE`], or
/// driver mode for its own row). An interface has one XDP program only: this cannot run beside
/// smtpflow's.
pub fn attach_xdp(ns: &Netns, iface: &str, mode: XdpMode) -> anyhow::Result<Attached> {
    attach_xdp_program(ns, iface, EMPTY_XDP, mode)
}

/// Attaches the XDP program `name` of this object ([`EMPTY_XDP`], [`TABLES_XDP`], [`LOG_XDP`]) to
/// `iface` in `ns` in `mode` (generic, as smtpflow attaches on veth, or driver).
pub fn attach_xdp_program(
    ns: &Netns,
    iface: &str,
    name: &'static str,
    mode: XdpMode,
) -> anyhow::Result<Attached> {
    let mut ebpf = load_for(name)?;
    let iface = iface.to_owned();
    let ebpf = in_netns(ns, move || -> anyhow::Result<Ebpf> {
        let p: &mut Xdp =
            ebpf.program_mut(name).with_context(|| format!("{name} missing"))?.try_into()?;
        p.attach(&iface, mode).with_context(|| {
            format!(
                "attaching {name} to {iface} in {mode:?} mode (is another XDP program attached?)"
            )
        })?;
        Ok(ebpf)
    })?;
    Ok(Attached { _held: vec![ebpf] })
}
