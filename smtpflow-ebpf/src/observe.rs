//! The per-packet pipeline of the TC and XDP programs: locate the TCP segment, keep only the
//! SMTP ports, classify the event, advance the connection's flow, and count what it decided.
use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::map, maps::PerCpuArray};
use smtpflow_common::{
    Counter, CounterKey, Direction, Event, HistKind, Outcome, PeerCounters, PeerGreetingKey,
    PeerKey, Scope, Side, Stat, classify, direction_of,
    flow::{Actions, FlowPacket},
    smtp_port,
};

use crate::{
    flow,
    maps::{
        NO_SCOPE, PeerBumps, bump, config, count, count_peer, count_peer_greeting,
        observe_duration, scope_counter, scope_of,
    },
    packet::{Frame as _, Packet, opaque},
    parse::{
        self, Located, Ports, Segment, Skip,
        icmp::{self, Quoted},
        locate, segment,
    },
    payload,
};

/// What the per-packet steps need, built once by [`inspect`], and what they decide: kept in a
/// per-CPU slot ([`SEEN`]), not on the stack.
pub struct Seen {
    seg: Segment,
    peer: PeerKey,
    /// The packet's [`smtpflow_common::Config::scope_index`] ([`scope_of`]).
    scope: u64,
    at: flow::Where,
    packet: FlowPacket,
    event: Option<Event>,
    actions: Actions,
    bumps: PeerBumps,
    flow: flow::Scratch,
}

/// The packet being observed, one slot per CPU (the programs are not re-entered on a CPU).
/// Off the stack for two reasons. The frames of a packet's calls share 512 bytes. And the
/// verifier knows nothing of a map value's contents: each step reads what the previous one
/// decided as unknown values, so the verifier walks it once for all packets. From the stack,
/// Linux 6.1 walked the flow tracker once for every combination of the values known before
/// it, and TC egress came within 7 % of the million instructions it allows.
#[map(name = "SEEN")]
static SEEN: PerCpuArray<Seen> = PerCpuArray::with_max_entries(1, 0);

/// What an ICMP destination unreachable quotes ([`observe_unreachable`]), one slot per CPU, for
/// the same reason as [`SEEN`].
#[map(name = "QUOTED")]
static QUOTED: PerCpuArray<Quoted> = PerCpuArray::with_max_entries(1, 0);

/// The per-packet path of the TC and XDP programs. Most packets are not SMTP: they cost the
/// header reads of [`locate`] in place and two loads of the port set, in the program itself
/// (no call, no per-packet state). A segment of an SMTP port adds the [`quiet`] test, in place:
/// only one that is not quiet costs a call, to [`observe_smtp`]. (Each call costs its `ret`,
/// and a kernel with return-thunk mitigations makes that dear: inlining the test took 8 ns off
/// every segment of a transfer here.)
#[inline(always)]
pub fn observe<P: Packet>(p: &P, side: Side) {
    let linear = p.linear();
    match locate(&linear, is_smtp) {
        Ok(loc) => observe_located(p, &loc, side),
        // Headers past the linear data of an skb may still be in its fragments. An XDP frame
        // has none: this path is not in the XDP program at all.
        Err(Skip::Malformed) if !P::LINEAR && linear.len() < p.len() => {
            let mut loc = Located::EMPTY;
            match locate_whole(p, &mut loc) {
                Ok(()) => observe_located(p, &loc, side),
                Err(skip) => skipped(p, skip, side),
            }
        }
        Err(skip) => skipped(p, skip, side),
    }
}

/// [`locate`] through the helper that reads an skb's fragments too, into `loc`. Rarely needed,
/// and not inlined: its buffers stay out of the program's own frame, and it has returned
/// before [`observe_smtp`] runs, so its frame is not in that call chain's stack either. The
/// located segment comes back through `loc`, not as a return value: merged with the program's
/// own path, a returned one went through the stack, uninitialised bytes and all, which the
/// verifier refuses. (A subprogram holding this path and its own copy of the counting's call
/// was tried: the verifier then walks the counting once for each call site, and Linux 6.1
/// walked 215,325 instructions for TC ingress instead of 126,793.)
#[inline(never)]
fn locate_whole<P: Packet>(p: &P, loc: &mut Located) -> Result<(), Skip> {
    *loc = locate(p, is_smtp)?;
    Ok(())
}

/// A segment of an SMTP port: the [`quiet`] test in place (the segments of a transfer, ACKs
/// and data, have nothing to count and no flow to change), and the one call to
/// [`observe_smtp`] for the others.
#[inline(always)]
fn observe_located<P: Packet>(p: &P, loc: &Located, side: Side) {
    if !quiet(p, loc) {
        observe_smtp(p, loc, side);
    }
}

/// A frame [`locate`] did not take: counted if malformed; an ICMP message goes to
/// [`observe_unreachable`] on ingress, where an answer to one of our SYNs comes in.
#[inline(always)]
fn skipped<P: Packet>(p: &P, skip: Skip, side: Side) {
    match skip {
        Skip::Malformed => bump(Stat::Malformed),
        Skip::Icmp if side == Side::Peer => observe_unreachable(p),
        Skip::NotTcp | Skip::OtherPorts | Skip::Icmp => {}
    }
}

/// An ICMP or ICMPv6 message seen on ingress: if it is a destination unreachable answering our
/// SYN to an SMTP port, decides that handshake's outcome (`unreachable`, once) and counts it
/// with the class of its code. The cold path: only ICMP packets come here; it never touches
/// the TCP path's state, and decides nothing about the packet's fate.
#[inline(never)]
fn observe_unreachable<P: Packet>(p: &P) {
    let Some(slot) = QUOTED.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot, this program's alone while it runs (not re-entered on a CPU).
    let fresh = unsafe { &mut *slot };
    // Emptied first: the parse writes only what the message has (an IPv4 address's 4 bytes).
    *fresh = Quoted::EMPTY;
    if icmp::unreachable(p, fresh).is_err() {
        return;
    }
    // Read back from the slot, through a pointer LLVM cannot trace to the writes: the verifier
    // knows nothing of a map value's contents, so it walks the flow lookup below once, not
    // once for every reason, family and header layout the parse took a path for.
    // SAFETY: as above; the same slot.
    let q = unsafe { &*(opaque(slot as usize) as *const Quoted) };
    let config = config();
    // Our SYN: sent by the client (us) to an SMTP port. A quoted segment from an SMTP port is
    // our answer to a peer's SYN, not an attempt of ours.
    let Some(m) = smtp_port(q.src_port, q.dst_port, config.ports()) else { return };
    if !m.sender_is_client {
        return;
    }
    let ifindex = p.ifindex();
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if flow::track_unreachable(q, ifindex, now) != Some(Outcome::Unreachable) {
        return;
    }
    let peer = PeerKey {
        ifindex,
        addr: q.dst,
        port: m.port,
        family: q.family,
        direction: Direction::Outbound as u8,
    };
    let scope = Scope { ifindex, port: m.port, direction: Direction::Outbound };
    let at = scope_of(ifindex, m.index, Direction::Outbound);
    for counter in [Counter::Handshake(Outcome::Unreachable), Counter::Unreachable(q.reason)] {
        count(&CounterKey::new(scope, counter), scope_counter(at, counter));
    }
    count_peer(&peer, &PeerBumps { outcome: Outcome::Unreachable as u8, ..PeerBumps::EMPTY });
}

/// Whether a located SMTP segment is [`FlowPacket::quiet`]: from what [`locate`] read (flags,
/// window, lengths, which port is SMTP) and, for a client's data, its first 8 bytes, the only
/// read of its own. Inlined in the program: a quiet segment costs no call.
#[inline(always)]
fn quiet<P: Packet>(p: &P, loc: &Located) -> bool {
    let to_smtp = loc.wanted & TO_SMTP != 0;
    if to_smtp && loc.wanted & FROM_SMTP != 0 {
        return false; // which side is the client is for the full path to decide
    }
    let (off, len) = parse::payload(p, loc);
    // A client's payload: its first 8 bytes in one load, else its first byte.
    let mut head = [0u8; 8];
    if to_smtp && len >= 8 {
        match p.linear().load::<u64>(off) {
            Ok(v) => head = v.to_ne_bytes(),
            // A burst of several segments (GRO or TSO), its payload in page fragments: bulk
            // data, whose first bytes begin no command the state machine acts on (STARTTLS
            // and EHLO each wait for their reply, and a TLS session's first application data
            // follows its handshake in a flight of its own), so it is read as data, without
            // the helper call and the cold fragment it costs under load.
            Err(()) if p.segments() > 1 => {}
            Err(()) => match p.load::<u64>(off) {
                Ok(v) => head = v.to_ne_bytes(),
                Err(()) => return false,
            },
        }
    } else if to_smtp && len > 0 {
        head[0] = flow::first_byte(p, off);
    }
    FlowPacket::quiet(loc.ports.flags, loc.ports.window, to_smtp, len as u32, &head)
}

/// What [`is_smtp`] says of a segment's ports: its destination port is an SMTP port (it goes to
/// the server), its source port is (it comes from the server); 0 for neither.
const TO_SMTP: u8 = 1;
const FROM_SMTP: u8 = 2;

/// Which of the ports are SMTP ports ([`TO_SMTP`], [`FROM_SMTP`]): two loads of the port set.
#[inline(always)]
fn is_smtp(ports: &Ports) -> u8 {
    let config = config();
    (u8::from(config.is_smtp_port(ports.dst)) * TO_SMTP)
        | (u8::from(config.is_smtp_port(ports.src)) * FROM_SMTP)
}

/// Counts a segment of an SMTP port. The steps with frames of their own (the segment's read,
/// the payload's, the flow, the counting) are BPF subprograms called one after the other, so
/// their stack frames sit side by side (the 512-byte stack limit applies to a whole call
/// chain), and they share one [`Seen`] instead of copying it.
#[inline(never)]
fn observe_smtp<P: Packet>(p: &P, loc: &Located, side: Side) {
    let Some(seen) = SEEN.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot, this program's alone while it runs (not re-entered on a CPU).
    let seen = unsafe { &mut *seen };
    let ifindex = p.ifindex();
    seen.seg = Segment::EMPTY;
    seen.peer = PeerKey { ifindex, addr: [0; 16], port: 0, family: 0, direction: 0 };
    seen.at = flow::Where { ifindex, direction: Direction::Inbound };
    seen.scope = u64::from(NO_SCOPE);
    seen.event = None;
    seen.bumps = PeerBumps::EMPTY;
    if !inspect(p, loc, side, seen) {
        return;
    }
    // Each step below is a call only where it has work: every call costs its return, dear on
    // a kernel with return-thunk mitigations.
    if let Some(event) = seen.event {
        count_event(&seen.peer, seen.scope as u32, event, side);
        seen.bumps.event = PeerCounters::index(event, side) as u8;
    }
    // Replies are read on plaintext ports; the client's first byte everywhere (a TLS
    // application-data record completes the TLS handshake).
    if seen.packet.payload_len > 0 && (seen.packet.plaintext || seen.packet.from_client) {
        flow::read_payload(p, &seen.seg, &mut seen.packet);
    }
    // The segments of a transfer (ACKs, plain data) change no flow: no lookup, no clock read.
    if seen.packet.may_change_flow() {
        flow::track(&seen.seg, &seen.at, &seen.packet, &mut seen.actions, &mut seen.flow);
        // A SYN that opens a flow has nothing to count here.
        if !seen.actions.counts_nothing() {
            record(&seen.actions, &seen.peer, seen.scope as u32, side, &mut seen.bumps);
        }
        if let Some(kind) = seen.actions.payload {
            payload::emit(p, &seen.seg, &seen.peer, kind);
        }
    }
    if !seen.bumps.is_empty() {
        count_peer(&seen.peer, &seen.bumps);
    }
}

/// Reads the segment and matches its SMTP port; `false` if the frame changed under us.
/// Inlined in [`observe_smtp`]: no frame of its own to speak of, and one call fewer.
#[inline(always)]
fn inspect<P: Packet>(p: &P, loc: &Located, side: Side, seen: &mut Seen) -> bool {
    if segment(p, loc, &mut seen.seg).is_err() {
        return false;
    }
    let seg = &seen.seg;
    let config = config();
    let Some(m) = smtp_port(seg.src_port, seg.dst_port, config.ports()) else {
        return false;
    };
    let direction = direction_of(side, m.sender_is_client);
    seen.peer.addr = match side {
        Side::Peer => seg.src,
        Side::Local => seg.dst,
    };
    seen.peer.port = m.port;
    seen.peer.family = seg.family;
    seen.peer.direction = direction as u8;
    seen.scope = u64::from(scope_of(seen.peer.ifindex, m.index, direction));
    seen.event = classify(seg.flags, seg.window);
    seen.at.direction = direction;
    seen.packet = FlowPacket {
        flags: seg.flags,
        from_client: m.sender_is_client,
        seq: seg.seq,
        payload_len: seg.payload_len,
        ends_line: true,
        plaintext: config.is_plaintext(m.index),
        ingress_only: P::INGRESS_ONLY,
        ..FlowPacket::default()
    };
    true
}

/// Counts a segment's event: in place, as [`count`] does (a sparse counter's key is built only
/// on its own path).
#[inline(always)]
fn count_event(peer: &PeerKey, at: u32, event: Event, side: Side) {
    let Some(direction) = Direction::from_repr(peer.direction) else {
        return;
    };
    let scope = Scope { ifindex: peer.ifindex, port: peer.port, direction };
    let counter = Counter::Event(event, side);
    count(&CounterKey::new(scope, counter), scope_counter(at, counter));
}

/// Counts what the flow tracker decided, and adds its per-peer counts to `bumps`. Not inlined,
/// to keep the entry frame small (the BPF stack limit of 512 bytes is for a whole call chain).
#[inline(never)]
fn record(a: &Actions, peer: &PeerKey, at: u32, side: Side, bumps: &mut PeerBumps) {
    let Some(direction) = Direction::from_repr(peer.direction) else {
        return;
    };
    let scope = Scope { ifindex: peer.ifindex, port: peer.port, direction };
    let count_in_scope =
        |counter| count(&CounterKey::new(scope, counter), scope_counter(at, counter));
    if let Some(outcome) = a.outcome {
        count_in_scope(Counter::Handshake(outcome));
        if outcome != Outcome::Timeout {
            bumps.outcome = outcome as u8;
        }
    }
    if a.syn_retransmit {
        count_in_scope(Counter::SynRetransmit);
    }
    if let Some(phase) = a.reset {
        count_in_scope(Counter::Reset(phase, side));
        bumps.reset = phase as u8;
    }
    if let Some(ns) = a.handshake_ns {
        observe_duration(at, HistKind::Handshake, ns);
    }
    if let Some(ns) = a.greeting_ns {
        observe_duration(at, HistKind::Greeting, ns);
    }
    if let Some(reply) = a.reply {
        let code = reply.code;
        count_in_scope(Counter::Reply(code));
        if code >= 400 {
            count_in_scope(Counter::ReplyStatus(code, reply.status));
        }
        count_peer_greeting(&PeerGreetingKey::any(*peer, code));
        if a.greeting {
            count_in_scope(Counter::Greeting(code));
            count_peer_greeting(&PeerGreetingKey::greeting(*peer, code));
        }
    }
    if a.throttled {
        count_in_scope(Counter::Throttled);
        bumps.throttled = true;
    }
    if let Some(stage) = a.starttls {
        count_in_scope(Counter::Starttls(stage));
    }
    if let Some(stage) = a.tls {
        count_in_scope(Counter::Starttls(stage));
    }
}
