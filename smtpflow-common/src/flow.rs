//! Per-connection tracking: handshake outcomes, reset phases, time to greeting and SMTP reply
//! codes. [`step`] is the whole state machine, a pure function the kernel calls per packet (with
//! the flow's stored state) and the unit tests below drive directly.
use crate::{
    StarttlsStage,
    payload::PayloadKind,
    reply::{HEAD_LEN, Reply, read_reply},
    rules::tcp_flags::{ACK, FIN, RST, SYN},
};

/// Key of the flow map: one SMTP connection attempt, as seen on one interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowKey {
    pub ifindex: u32,
    pub client: [u8; 16],
    pub server: [u8; 16],
    pub client_port: u16,
    pub server_port: u16,
    pub family: u8,
    /// [`crate::Direction`] as u8 (fixed for a flow: the client is the peer or the local host).
    pub direction: u8,
    pub _pad: [u8; 2],
}

/// Flow states, in the order a connection goes through them.
///
/// A connection is open while its flow is [`ESTABLISHED`] or [`GREETED`] ([`is_open`]):
/// userspace counts open connections by listing the flow map. The kernel deletes a flow when
/// its connection ends, except a [`flag::LATE`] one, which the sweep must still see: that one
/// becomes [`CLOSED`] instead, and its way goes to a new flow once it is idle ([`IDLE_NS`]).
pub mod state {
    /// SYN seen, no answer yet.
    pub const SYN_SENT: u8 = 1;
    /// Handshake completed (SYN-ACK seen, or the client's ACK when the SYN-ACK is not visible).
    pub const ESTABLISHED: u8 = 2;
    /// The server has sent payload (its greeting).
    pub const GREETED: u8 = 3;
    /// The connection ended (a RST, or a FIN that ends a flow) but the flow is kept for the
    /// sweep ([`super::flag::LATE`]): no longer open.
    pub const CLOSED: u8 = 4;

    /// Whether a flow in `state` is an open connection.
    #[inline(always)]
    pub const fn is_open(state: u8) -> bool {
        state == ESTABLISHED || state == GREETED
    }
}

/// [`FlowState::tls`]: where the session's TLS is.
pub mod tls {
    /// No TLS (yet): plaintext, or an implicit-TLS attempt before its TCP handshake completed.
    pub const NONE: u8 = 0;
    /// TLS started (a 220 answered STARTTLS, or the TCP handshake of an implicit-TLS port
    /// completed); neither completed nor failed yet.
    pub const HANDSHAKE: u8 = 1;
    /// The client sent its first TLS application-data record: the handshake completed.
    pub const COMPLETED: u8 = 2;
    /// A RST or FIN ended the connection during the TLS handshake.
    pub const FAILED: u8 = 3;
}

/// [`FlowState::session`]: the payload events already sent for the session (each at most once).
pub mod session {
    /// The client's `EHLO`/`HELO` ([`crate::payload::PayloadKind::Ehlo`]) was sent; its reply is
    /// awaited until [`EHLO_REPLY`].
    pub const EHLO: u8 = 1;
    /// The reply to it ([`crate::payload::PayloadKind::EhloReply`]) was sent.
    pub const EHLO_REPLY: u8 = 2;
    /// The server's first segment once TLS started
    /// ([`crate::payload::PayloadKind::ServerHello`]) was sent.
    pub const SERVER_HELLO: u8 = 4;
}

/// Flow flags.
pub mod flag {
    /// TLS started (port 465, or a 220 answering STARTTLS): payload is no longer read.
    pub const TLS: u8 = 1;
    /// The client sent STARTTLS; the next server reply decides.
    pub const STARTTLS_PENDING: u8 = 2;
    /// The server's last segment did not end a line: its next segment starts mid-line.
    pub const MID_LINE: u8 = 4;
    /// The first reply (the greeting) was counted.
    pub const REPLIED: u8 = 8;
    /// `server_next_seq` is valid.
    pub const SEQ_KNOWN: u8 = 16;
    /// The answer to the first SYN (SYN-ACK, RST, or the client's ACK in XDP mode) came later
    /// than the handshake timeout: the kernel counted no outcome, userspace's sweep counts a
    /// timeout. The kernel never deletes such a flow (the sweep must see it); its way goes to a
    /// new flow once it is idle, or when a new flow overwrites it.
    pub const LATE: u8 = 32;
    /// A throttling reply was counted for this session.
    pub const THROTTLED: u8 = 64;
    /// The attempt was answered in time by an ICMP destination unreachable quoting its SYN
    /// ([`unreachable`]): its outcome is decided. A later answer decides nothing (the
    /// connection is still followed), and the sweep never counts it as a timeout.
    pub const UNREACHABLE: u8 = 128;
}

/// Value of the flow map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowState {
    /// `bpf_ktime_get_ns` of the first SYN; 0 when the SYN was not seen.
    pub syn_ns: u64,
    /// `bpf_ktime_get_ns` when the handshake completed.
    pub established_ns: u64,
    /// Sequence number after the server's last new byte (to skip retransmissions).
    pub server_next_seq: u32,
    /// The client's initial sequence number: a SYN carrying it again is a retransmission.
    pub client_isn: u32,
    /// One of [`state`].
    pub state: u8,
    /// Bits of [`flag`].
    pub flags: u8,
    /// One of [`tls`].
    pub tls: u8,
    /// Bits of [`session`].
    pub session: u8,
    /// When the entry was last written: `bpf_ktime_get_ns() >> ACTIVE_SHIFT` (units of about
    /// 1.07 s). Set only when the state is written anyway, so it costs no extra write.
    pub active: u32,
}

/// [`FlowState::active`] is the kernel clock shifted right by this.
pub const ACTIVE_SHIFT: u32 = 30;

labelled_enum! {
    /// Handshake outcome.
    pub enum Outcome: u8 {
        /// The SYN was answered by a SYN-ACK.
        Established = 0 => "established",
        /// The SYN was answered by a RST.
        Refused = 1 => "refused",
        /// No answer within `--handshake-timeout` (decided by userspace's sweep).
        Timeout = 2 => "timeout",
        /// Answered by an ICMP or ICMPv6 destination unreachable quoting the SYN.
        Unreachable = 3 => "unreachable",
    }
}

labelled_enum! {
    /// The phase of its connection a RST ends.
    pub enum Phase: u8 {
        /// Before the handshake completed: a refusal.
        Handshake = 0 => "handshake",
        /// After the handshake, before the server's first payload.
        PreGreeting = 1 => "pre_greeting",
        /// After the server's first payload, or a connection we did not see start.
        Session = 2 => "session",
    }
}

labelled_enum! {
    /// Which duration a histogram holds.
    pub enum HistKind: u8 {
        /// First SYN to SYN-ACK.
        Handshake = 0 => "handshake",
        /// Handshake completion to the server's first payload.
        Greeting = 1 => "greeting",
    }
}

/// Key of the per-CPU duration histograms map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HistKey {
    pub ifindex: u32,
    pub port: u16,
    /// [`crate::Direction`] as u8.
    pub direction: u8,
    /// [`HistKind`] as u8.
    pub kind: u8,
}

impl HistKey {
    #[inline(always)]
    pub const fn new(scope: crate::Scope, kind: HistKind) -> Self {
        Self {
            ifindex: scope.ifindex,
            port: scope.port,
            direction: scope.direction as u8,
            kind: kind as u8,
        }
    }

    /// Where the histogram belongs and which duration it holds; `None` for unknown bytes.
    pub const fn decode(&self) -> Option<(crate::Scope, HistKind)> {
        match (crate::Direction::from_repr(self.direction), HistKind::from_repr(self.kind)) {
            (Some(direction), Some(kind)) => {
                Some((crate::Scope { ifindex: self.ifindex, port: self.port, direction }, kind))
            }
            _ => None,
        }
    }
}

/// Upper bounds of the histogram buckets in nanoseconds: 50 µs to 10 s.
pub const HIST_BOUNDS_NS: [u64; 17] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];
/// One bucket per bound plus +Inf.
pub const HIST_BUCKETS: usize = HIST_BOUNDS_NS.len() + 1;

/// A histogram: per-bucket (not cumulative) counts and the sum of the durations.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Histogram {
    pub buckets: [u64; HIST_BUCKETS],
    pub sum_ns: u64,
}

impl Histogram {
    pub const ZERO: Self = Self { buckets: [0; HIST_BUCKETS], sum_ns: 0 };

    /// The bucket a duration falls in (`le` semantics: a bound is inclusive).
    #[inline(always)]
    pub fn bucket(ns: u64) -> usize {
        let mut i = 0;
        while i < HIST_BOUNDS_NS.len() {
            if ns <= HIST_BOUNDS_NS[i] {
                return i;
            }
            i += 1;
        }
        HIST_BOUNDS_NS.len()
    }
}

const _: () = {
    assert!(size_of::<FlowKey>() == 44);
    assert!(size_of::<FlowState>() == 32);
    assert!(size_of::<HistKey>() == 8);
    assert!(size_of::<Histogram>() == 8 * (HIST_BUCKETS + 1));
};

/// What [`step`] needs from a packet of the flow.
#[derive(Clone, Copy, Debug, Default)]
pub struct FlowPacket {
    pub flags: u8,
    /// Sent by the SMTP client.
    pub from_client: bool,
    pub seq: u32,
    pub payload_len: u32,
    /// The reply line the payload starts with ([`Reply::NONE`] if none;
    /// [`FlowPacket::read_head`]).
    pub reply: Reply,
    /// The payload starts with `STARTTLS` ([`FlowPacket::read_head`]).
    pub starttls: bool,
    /// The payload starts with `EHLO ` or `HELO `, in any case ([`FlowPacket::read_head`]).
    pub ehlo: bool,
    /// The payload's first byte (0 when not read): the kernel reads it from the client's
    /// segments, where `0x17` (a TLS application-data record) says the TLS handshake completed.
    pub first_byte: u8,
    /// Whether the payload's last byte is `\n` (`true` also when it could not be read).
    pub ends_line: bool,
    /// Replies on this port are read (plaintext SMTP).
    pub plaintext: bool,
    /// Seen where only ingress is visible (XDP): the local host's packets never show, so the
    /// client's FIN or RST ends an inbound connection.
    pub ingress_only: bool,
}

impl FlowPacket {
    /// Whether this packet can change its flow or be counted by [`step`]: the kernel looks the
    /// flow up (and reads the clock) only then, so the segments of a bulk transfer cost no map
    /// access. Not: a server's segment with no payload and no SYN, RST or FIN (an ACK), and a
    /// client's data segment with none of them whose head is not `STARTTLS`, `EHLO`/`HELO` or a
    /// TLS application-data record. A client's segment with no payload (the ACK that completes
    /// a handshake whose SYN-ACK is not visible) always can. `step` itself ignores the packets
    /// this rejects, so the kernel's shortcut and the state machine agree by construction.
    #[inline(always)]
    pub const fn may_change_flow(&self) -> bool {
        if self.flags & (SYN | RST | FIN) != 0 {
            return true;
        }
        if !self.from_client {
            return self.payload_len > 0;
        }
        self.payload_len == 0
            || self.starttls
            || self.ehlo
            || self.first_byte == TLS_APPLICATION_DATA
    }

    /// Whether a segment is one smtpflow has nothing to do with, decided from its TCP header
    /// and, for a client's data, the first 8 bytes of its payload (`head`: only its first byte
    /// is used under 8, none of it with no payload): no SYN, RST or FIN, a window that is not
    /// zero (so [`crate::classify`] finds no event), and either a server's segment with no
    /// payload, or a client's data segment that is not `STARTTLS`, `EHLO`, `HELO` or a TLS
    /// application-data record. Such a segment is neither counted nor
    /// [`FlowPacket::may_change_flow`]: the kernel returns as soon as it has located it and read
    /// those bytes.
    #[inline(always)]
    pub fn quiet(
        flags: u8,
        window: u16,
        from_client: bool,
        payload_len: u32,
        head: &[u8; 8],
    ) -> bool {
        if flags & (SYN | RST | FIN) != 0 || window == 0 {
            return false;
        }
        if !from_client {
            return payload_len == 0;
        }
        payload_len > 0
            && head[0] != TLS_APPLICATION_DATA
            && !(payload_len >= 8 && (is_starttls8(head) || is_ehlo8(head)))
    }

    /// Reads what the state machine needs from the payload's first bytes (`len` of them were
    /// read; the rest of `head` is zero): from the server the reply line it starts with; from
    /// the client whether it is `STARTTLS` or `EHLO`/`HELO` (set [`FlowPacket::from_client`]
    /// first). Each side's head is read only for what [`step`] uses of that side, so a client's
    /// data segment costs no reply parsing.
    #[inline(always)]
    pub fn read_head(&mut self, head: &[u8; HEAD_LEN], len: u8) {
        if self.from_client {
            self.starttls = is_starttls(head, len);
            self.ehlo = is_ehlo(head, len);
        } else {
            self.reply = read_reply(head, len);
        }
    }
}

/// What to count and store after a packet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Actions {
    pub outcome: Option<Outcome>,
    pub handshake_ns: Option<u64>,
    pub syn_retransmit: bool,
    pub reset: Option<Phase>,
    pub greeting_ns: Option<u64>,
    /// SMTP reply at the start of a server segment: its code and enhanced status.
    pub reply: Option<Reply>,
    /// The reply is the connection's first: its greeting.
    pub greeting: bool,
    /// The session's first throttling reply.
    pub throttled: bool,
    /// A STARTTLS stage the session reached in clear text (`requested`, `accepted`, `refused`).
    pub starttls: Option<StarttlsStage>,
    /// How the session's TLS handshake ended (`completed` or `failed`), once.
    pub tls: Option<StarttlsStage>,
    /// Copy this segment's payload into a payload event of this kind (each kind once per
    /// session).
    pub payload: Option<PayloadKind>,
    /// Write the new state back.
    pub store: bool,
    /// Remove the flow (reset, or the connection closed).
    pub delete: bool,
}

impl Actions {
    /// Whether these actions count nothing: no outcome, SYN retransmission, reset, duration,
    /// reply, throttling or STARTTLS/TLS stage. What is left (`store`, `delete`, `payload`) is
    /// the flow's and the payload ring's business. A SYN that opens a flow is one: the kernel
    /// programs skip their counting step for it.
    #[inline(always)]
    pub const fn counts_nothing(&self) -> bool {
        self.outcome.is_none()
            && self.handshake_ns.is_none()
            && !self.syn_retransmit
            && self.reset.is_none()
            && self.greeting_ns.is_none()
            && self.reply.is_none()
            && !self.throttled
            && self.starttls.is_none()
            && self.tls.is_none()
    }
}

#[inline(always)]
fn is_starttls(head: &[u8; HEAD_LEN], len: u8) -> bool {
    len >= 8 && is_starttls8(&first8(head))
}

#[inline(always)]
fn is_ehlo(head: &[u8; HEAD_LEN], len: u8) -> bool {
    len >= 8 && is_ehlo8(&first8(head))
}

#[inline(always)]
fn first8(head: &[u8; HEAD_LEN]) -> [u8; 8] {
    let [a, b, c, d, e, f, g, h, ..] = *head;
    [a, b, c, d, e, f, g, h]
}

/// Whether a payload's first 8 bytes are `STARTTLS`, in any case. As one 64-bit word: every
/// byte of the command is a letter, and for a letter `b | 0x20` is its lower case, equal to the
/// lower-case letter only for that letter in either case (exactly `eq_ignore_ascii_case`). Byte
/// by byte, the BPF code spilled each byte to the stack and compared it with range tests.
#[inline(always)]
fn is_starttls8(head: &[u8; 8]) -> bool {
    u64::from_le_bytes(*head) | LOWER_8 == u64::from_le_bytes(*b"starttls")
}

/// Whether a payload's first 8 bytes start with `EHLO ` or `HELO `, in any case: the four
/// letters folded as in [`is_starttls8`], the space matched exactly.
#[inline(always)]
fn is_ehlo8(head: &[u8; 8]) -> bool {
    let five = (u64::from_le_bytes(*head) & 0xff_ffff_ffff) | LOWER_4;
    five == u64::from_le_bytes(*b"ehlo \0\0\0") || five == u64::from_le_bytes(*b"helo \0\0\0")
}

/// The ASCII case bit in each of 8 bytes, and in the first 4.
const LOWER_8: u64 = 0x2020_2020_2020_2020;
const LOWER_4: u64 = 0x2020_2020;

/// The first byte of a TLS application-data record.
pub const TLS_APPLICATION_DATA: u8 = 0x17;

/// `a` comes before `b` in sequence space.
#[inline(always)]
const fn seq_before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// Whether an answer at `now` to the attempt whose first SYN was at `syn_ns` comes later than
/// the handshake timeout (`timeout_ns` 0: never).
#[inline(always)]
pub const fn is_late(syn_ns: u64, now: u64, timeout_ns: u64) -> bool {
    timeout_ns != 0 && syn_ns != 0 && now.saturating_sub(syn_ns) > timeout_ns
}

/// Advances a flow by one packet. `exists`: `st` holds the flow's stored state (otherwise it is
/// zeroed and the flow is not tracked yet). `now` is in the same clock as the stored times;
/// `timeout_ns` is the handshake timeout ([`crate::Config::handshake_timeout_ns`]).
///
/// Handshake outcomes are decided here only, once: an answer within the timeout is
/// `established` or `refused`; a later one decides nothing and marks the flow [`flag::LATE`],
/// and userspace's [`sweep`] counts the attempt as a timeout (it never writes the flow).
#[inline(always)]
pub fn step(
    st: &mut FlowState,
    exists: bool,
    p: &FlowPacket,
    now: u64,
    timeout_ns: u64,
) -> Actions {
    if !p.may_change_flow() {
        // The kernel does not look the flow up. The one packet this ignores that the state
        // machine could use: a client's plain data segment while the attempt is pending, which
        // would complete a handshake whose ACK was not seen (a client ACKs the SYN-ACK at once,
        // before it sends). Such an attempt waits for a later segment that can change it, or
        // is counted as a timeout.
        return Actions::default();
    }
    step_may_change(st, exists, p, now, timeout_ns)
}

/// [`step`] for a packet the caller has already found [`FlowPacket::may_change_flow`] (the
/// kernel, which checks before its lookup).
#[inline(always)]
pub fn step_may_change(
    st: &mut FlowState,
    exists: bool,
    p: &FlowPacket,
    now: u64,
    timeout_ns: u64,
) -> Actions {
    let mut a = Actions::default();
    step_may_change_into(st, exists, p, || now, timeout_ns, &mut a);
    a
}

/// [`step_may_change`] writing its actions into `a` in place (the kernel keeps them in a map
/// value, off its small stack), and reading the clock only when the step needs it: `now` is
/// not called for a retransmitted SYN ([`is_syn_retransmit`]) or a RST that ends its flow
/// without the time ([`is_timeless_reset`]), whose steps are the same at any time. A clock
/// read costs the kernel some 34 ns; retransmitted SYNs come exactly when handshakes fail, and
/// every attempt of a SYN flood ends in a RST.
#[inline(always)]
pub fn step_may_change_into(
    st: &mut FlowState,
    exists: bool,
    p: &FlowPacket,
    now: impl FnOnce() -> u64,
    timeout_ns: u64,
    a: &mut Actions,
) {
    if is_syn_retransmit(st, exists, p) {
        *a = Actions { syn_retransmit: true, ..Actions::default() };
        return;
    }
    if is_timeless_reset(st, exists, p) {
        // No answer to judge late, nothing stored: any time gives the same step.
        advance(st, exists, p, 0, timeout_ns, a);
        return;
    }
    let now = now();
    advance(st, exists, p, now, timeout_ns, a);
    if a.store {
        st.active = (now >> ACTIVE_SHIFT) as u32;
    }
}

/// Whether `p` is a RST whose step needs no time: one for no flow (counted as a `session`
/// reset), or one that ends a flow that is not pending (no answer whose lateness the time
/// would decide) and was never late (so it is deleted, not kept and stored for the sweep).
/// The RST a SYN flood's sources answer every SYN-ACK with is one.
#[inline(always)]
pub const fn is_timeless_reset(st: &FlowState, exists: bool, p: &FlowPacket) -> bool {
    p.flags & RST != 0 && (!exists || (st.state != state::SYN_SENT && st.flags & flag::LATE == 0))
}

/// Whether `p` is the client's SYN of an existing flow with the initial sequence number it
/// started with: a retransmission, which [`step`] counts ([`Actions::syn_retransmit`]) and
/// which changes nothing, whatever the time.
#[inline(always)]
pub const fn is_syn_retransmit(st: &FlowState, exists: bool, p: &FlowPacket) -> bool {
    exists && p.from_client && p.flags & (SYN | ACK | RST) == SYN && p.seq == st.client_isn
}

#[inline(always)]
fn advance(
    st: &mut FlowState,
    exists: bool,
    p: &FlowPacket,
    now: u64,
    timeout_ns: u64,
    a: &mut Actions,
) {
    *a = Actions::default();
    let (syn, ack, rst, fin) =
        (p.flags & SYN != 0, p.flags & ACK != 0, p.flags & RST != 0, p.flags & FIN != 0);
    let pending = exists && st.state == state::SYN_SENT;
    // An answer to an attempt whose outcome an ICMP unreachable decided: it decides nothing.
    let decided = pending && st.flags & flag::UNREACHABLE != 0;
    // An answer to a pending attempt, too late to decide its outcome.
    let late = pending && !decided && is_late(st.syn_ns, now, timeout_ns);

    if rst {
        a.reset = Some(if !exists {
            Phase::Session
        } else {
            match st.state {
                state::SYN_SENT => Phase::Handshake,
                state::ESTABLISHED => Phase::PreGreeting,
                _ => Phase::Session,
            }
        });
        if !exists {
            return;
        }
        if late {
            // Kept: the sweep counts the attempt as a timeout.
            st.flags |= flag::LATE;
            a.store = true;
            return;
        }
        a.tls = tls_failed(st, p);
        if st.flags & flag::LATE != 0 {
            // Kept until the sweep has seen it, no longer open.
            close(st, a);
            return;
        }
        if st.state == state::SYN_SENT && !p.from_client && !decided {
            a.outcome = Some(Outcome::Refused);
        }
        a.delete = true;
        return;
    }
    if syn && !ack {
        if !p.from_client {
            return; // a SYN from the SMTP port: simultaneous open, not tracked
        }
        if exists && p.seq == st.client_isn {
            a.syn_retransmit = true;
            return;
        }
        // A new attempt (possibly reusing the ports of an old connection).
        *st = FlowState {
            syn_ns: now,
            client_isn: p.seq,
            state: state::SYN_SENT,
            ..FlowState::default()
        };
        a.store = true;
        return;
    }
    if syn {
        // SYN-ACK.
        if p.from_client || (exists && st.state != state::SYN_SENT) {
            return; // not a server's answer, or a duplicate
        }
        if late {
            // No outcome; the connection is still followed.
            st.flags |= flag::LATE;
        } else if !decided {
            a.outcome = Some(Outcome::Established);
            if exists && st.syn_ns != 0 {
                a.handshake_ns = Some(now.saturating_sub(st.syn_ns));
            }
        }
        if !exists {
            *st = FlowState::default();
        }
        establish(st, p, now);
        st.server_next_seq = p.seq.wrapping_add(1);
        st.flags |= flag::SEQ_KNOWN;
        a.store = true;
        return;
    }
    if !exists {
        return; // a connection we did not see start
    }
    if st.state == state::SYN_SENT {
        if !(p.from_client && ack) {
            return;
        }
        // The client completed the handshake and we never saw the SYN-ACK (XDP sees no egress).
        if late {
            st.flags |= flag::LATE;
        } else if !decided {
            a.outcome = Some(Outcome::Established);
        }
        establish(st, p, now);
        a.store = true;
    }
    let reading = p.plaintext && st.flags & flag::TLS == 0;
    // A flow whose attempt was late is kept for the sweep.
    let may_end = st.flags & flag::LATE == 0;
    if p.from_client {
        if reading && st.flags & flag::STARTTLS_PENDING == 0 && p.starttls {
            st.flags |= flag::STARTTLS_PENDING;
            a.starttls = Some(StarttlsStage::Requested);
            a.store = true;
        }
        if reading && p.ehlo && st.session & session::EHLO == 0 {
            st.session |= session::EHLO;
            a.payload = Some(PayloadKind::Ehlo);
            a.store = true;
        }
        if st.tls == tls::HANDSHAKE && p.payload_len > 0 && p.first_byte == TLS_APPLICATION_DATA {
            st.tls = tls::COMPLETED;
            a.tls = Some(StarttlsStage::Completed);
            a.store = true;
        }
        // XDP never sees the server's FIN: the client's ends the flow.
        if fin {
            end(st, a, p, p.ingress_only, may_end);
        }
        return;
    }
    if p.payload_len == 0
        || (st.flags & flag::SEQ_KNOWN != 0 && seq_before(p.seq, st.server_next_seq))
    {
        // No payload, or a retransmission: already counted.
        if fin {
            end(st, a, p, true, may_end);
        }
        return;
    }
    st.server_next_seq = p.seq.wrapping_add(p.payload_len);
    st.flags |= flag::SEQ_KNOWN;
    a.store = true;
    if st.state == state::ESTABLISHED {
        st.state = state::GREETED;
        if st.established_ns != 0 {
            a.greeting_ns = Some(now.saturating_sub(st.established_ns));
        }
    }
    // Decided before this segment's reply is read: the 220 answering STARTTLS is not the
    // ServerHello.
    if st.tls != tls::NONE && st.session & session::SERVER_HELLO == 0 {
        st.session |= session::SERVER_HELLO;
        a.payload = Some(PayloadKind::ServerHello);
    }
    if reading && st.session & (session::EHLO | session::EHLO_REPLY) == session::EHLO {
        st.session |= session::EHLO_REPLY;
        a.payload = Some(PayloadKind::EhloReply);
    }
    if reading && st.flags & flag::MID_LINE == 0 && p.reply.is_some() {
        let reply = p.reply;
        a.reply = Some(reply);
        if st.flags & flag::REPLIED == 0 {
            a.greeting = true;
            a.payload = Some(PayloadKind::Greeting);
            st.flags |= flag::REPLIED;
            // A reply to an EHLO sent before the greeting (no client waits for it) is the next
            // segment's.
            st.session &= !session::EHLO_REPLY;
        }
        if reply.is_throttling() && st.flags & flag::THROTTLED == 0 {
            a.throttled = true;
            st.flags |= flag::THROTTLED;
        }
        if st.flags & flag::STARTTLS_PENDING != 0 {
            st.flags &= !flag::STARTTLS_PENDING;
            a.starttls = Some(if reply.code == 220 {
                st.flags |= flag::TLS;
                st.tls = tls::HANDSHAKE;
                StarttlsStage::Accepted
            } else {
                StarttlsStage::Refused
            });
        }
    }
    if p.ends_line {
        st.flags &= !flag::MID_LINE;
    } else {
        st.flags |= flag::MID_LINE;
    }
    if fin {
        end(st, a, p, true, may_end);
    }
}

/// The TCP handshake completed: the flow is established, and on an implicit-TLS port (not
/// plaintext) its TLS handshake starts.
#[inline(always)]
fn establish(st: &mut FlowState, p: &FlowPacket, now: u64) {
    st.state = state::ESTABLISHED;
    st.established_ns = now;
    if !p.plaintext {
        st.tls = tls::HANDSHAKE;
    }
}

/// `failed`, once, when the connection ends (by `p`, a RST or a FIN) during its TLS handshake.
/// Not from the server's packets where only ingress is seen (XDP): there the client's are never
/// seen (an outbound connection), so neither is its handshake's completion.
#[inline(always)]
fn tls_failed(st: &mut FlowState, p: &FlowPacket) -> Option<StarttlsStage> {
    if st.tls != tls::HANDSHAKE || (p.ingress_only && !p.from_client) {
        return None;
    }
    st.tls = tls::FAILED;
    Some(StarttlsStage::Failed)
}

/// A kept flow's connection ended: [`state::CLOSED`] when it was open, so that it no longer
/// counts as open.
#[inline(always)]
fn close(st: &mut FlowState, a: &mut Actions) {
    if state::is_open(st.state) {
        st.state = state::CLOSED;
        a.store = true;
    }
    if a.tls.is_some() {
        a.store = true;
    }
}

/// A FIN: a failed TLS handshake if it was under way; and, when this FIN `ends` the flow (the
/// server's, or the client's where only ingress is seen), the flow is deleted, or closed when it
/// must be kept for the sweep (`may_end` false).
#[inline(always)]
fn end(st: &mut FlowState, a: &mut Actions, p: &FlowPacket, ends: bool, may_end: bool) {
    if a.tls.is_none() {
        a.tls = tls_failed(st, p);
    }
    if ends && may_end {
        a.delete = true;
    } else if ends {
        close(st, a);
    } else if a.tls.is_some() {
        a.store = true;
    }
}

/// Advances a flow by an ICMP or ICMPv6 destination unreachable that quotes the client's segment
/// with sequence number `seq` (the flow's key comes from the quoted addresses and ports), at
/// `now`. The outcome `unreachable` is decided once, for an attempt still pending (no answer,
/// not late) whose first SYN carried `seq`, when the message comes within the timeout; anything
/// else decides nothing and writes nothing (after the timeout the sweep counts the timeout).
#[inline(always)]
pub fn unreachable(st: &mut FlowState, seq: u32, now: u64, timeout_ns: u64) -> Actions {
    let mut a = Actions::default();
    if st.state != state::SYN_SENT
        || st.flags & (flag::LATE | flag::UNREACHABLE) != 0
        || seq != st.client_isn
        || is_late(st.syn_ns, now, timeout_ns)
    {
        return a;
    }
    st.flags |= flag::UNREACHABLE;
    st.active = (now >> ACTIVE_SHIFT) as u32;
    a.outcome = Some(Outcome::Unreachable);
    a.store = true;
    a
}

/// Time after the handshake timeout before userspace's sweep decides a timeout: more than the
/// time between the kernel's clock read for a packet and its write of the flow, so that an
/// answer the kernel decided in time is always seen written.
pub const SWEEP_GRACE_NS: u64 = 1_000_000_000;

/// Flows not written for this long are no longer followed: 15 minutes, longer than any SMTP
/// timeout (RFC 5321 lets a client wait 10 minutes for the reply to the end of DATA).
/// Userspace's sweep no longer shows them, and the kernel gives their ways to new flows without
/// counting an eviction. Only needed where the end of a connection is not seen (XDP sees no
/// server FIN; a FIN lost or a peer gone silent in either mode), and for [`state::CLOSED`]
/// flows (kept after their end for the sweep); otherwise the kernel frees a flow's way as it
/// ends.
pub const IDLE_NS: u64 = 15 * 60 * 1_000_000_000;

/// What userspace's sweep decides for one flow entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// The attempt timed out: its first SYN is older than the timeout plus [`SWEEP_GRACE_NS`]
    /// and no answer came in time (still pending, or [`flag::LATE`]), nor an ICMP unreachable
    /// ([`flag::UNREACHABLE`]: its outcome is decided). Counted once per attempt
    /// (the sweep remembers the flows it counted, by key and `syn_ns`).
    pub timeout: bool,
    /// Not written for [`IDLE_NS`]: no longer followed (not shown, its way free to take).
    pub idle: bool,
}

/// The sweep's decision for a flow entry read at `now` (`CLOCK_MONOTONIC`, the clock of
/// `bpf_ktime_get_ns`). Pure: the sweep never writes a flow, it only counts.
pub const fn sweep(st: &FlowState, now: u64, timeout_ns: u64) -> Swept {
    let unanswered = (st.state == state::SYN_SENT || st.flags & flag::LATE != 0)
        && st.flags & flag::UNREACHABLE == 0;
    let timeout = unanswered
        && st.syn_ns != 0
        && now.saturating_sub(st.syn_ns) > timeout_ns.saturating_add(SWEEP_GRACE_NS);
    let idle = (now >> ACTIVE_SHIFT).saturating_sub(st.active as u64) > IDLE_NS >> ACTIVE_SHIFT;
    Swept { timeout, idle }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ReplyStatus, rules::tcp_flags::PSH};

    /// The handshake timeout of these tests.
    const TIMEOUT: u64 = 1_000_000;

    /// Every counted field makes the actions count something; the flow's own fields do not.
    #[test]
    fn counts_nothing_sees_every_counted_field() {
        let none = Actions::default();
        assert!(none.counts_nothing());
        let flow_only =
            Actions { store: true, delete: true, payload: Some(PayloadKind::Greeting), ..none };
        assert!(flow_only.counts_nothing());
        let reply = Reply { code: 250, status: ReplyStatus::NONE };
        for counted in [
            Actions { outcome: Some(Outcome::Established), ..none },
            Actions { handshake_ns: Some(1), ..none },
            Actions { syn_retransmit: true, ..none },
            Actions { reset: Some(Phase::Handshake), ..none },
            Actions { greeting_ns: Some(1), ..none },
            Actions { reply: Some(reply), ..none },
            Actions { throttled: true, ..none },
            Actions { starttls: Some(StarttlsStage::Requested), ..none },
            Actions { tls: Some(StarttlsStage::Completed), ..none },
        ] {
            assert!(!counted.counts_nothing(), "{counted:?}");
        }
    }

    /// The word-wise command tests against the byte-wise definition: every byte value at
    /// every position of each command (and of a mixed-case spelling), which covers each case
    /// fold, the exact space and the bytes past the command.
    #[test]
    fn command_words_match_bytewise_definition() {
        let starttls = |h: &[u8; 8]| h.eq_ignore_ascii_case(b"STARTTLS");
        let ehlo = |h: &[u8; 8]| {
            let [a, b, c, d, e, ..] = *h;
            ([a, b, c, d].eq_ignore_ascii_case(b"EHLO")
                || [a, b, c, d].eq_ignore_ascii_case(b"HELO"))
                && e == b' '
        };
        let mut checked = 0;
        for base in
            [b"STARTTLS", b"sTaRtTlS", b"EHLO mx.", b"helo a.b", b"HeLo x\r\n", b"\0\0\0\0\0\0\0\0"]
        {
            for at in 0..8 {
                for byte in 0..=u8::MAX {
                    let mut h = *base;
                    h[at] = byte;
                    assert_eq!(is_starttls8(&h), starttls(&h), "{h:?}");
                    assert_eq!(is_ehlo8(&h), ehlo(&h), "{h:?}");
                    checked += usize::from(starttls(&h) || ehlo(&h));
                }
            }
        }
        // Each base's own spelling matches at every position (plus the case variants).
        assert!(checked > 5 * 8, "the matching cases were exercised: {checked}");
    }

    fn pkt(flags: u8, from_client: bool) -> FlowPacket {
        FlowPacket { flags, from_client, plaintext: true, ends_line: true, ..Default::default() }
    }

    /// What the kernel reads of a payload ([`crate::reference::kernel_head`]).
    fn read_head(p: &mut FlowPacket, text: &[u8]) {
        let (head, n) = crate::reference::kernel_head(text);
        p.read_head(&head, n);
    }

    fn data(from_client: bool, seq: u32, text: &[u8]) -> FlowPacket {
        let mut p = pkt(ACK | PSH, from_client);
        p.seq = seq;
        p.payload_len = text.len() as u32;
        read_head(&mut p, text);
        p.ends_line = text.last() == Some(&b'\n');
        p
    }

    /// The kernel's shortcut ([`FlowPacket::may_change_flow`]) skips only packets the state
    /// machine would do nothing with, in every state, but one: a client's data segment while
    /// the attempt is pending (documented on [`step`]).
    #[test]
    fn packets_the_kernel_skips_change_no_flow() {
        let texts: [&[u8]; 5] = [
            b"",
            b"hello world, a body line\r\n",
            b"\x16\x03\x01\x02\x00\x01",
            b"QUIT\r\n",
            b"250 ok\r\n",
        ];
        let mut skipped = 0;
        for st_state in [0, state::SYN_SENT, state::ESTABLISHED, state::GREETED, state::CLOSED] {
            for tls_stage in [tls::NONE, tls::HANDSHAKE, tls::COMPLETED] {
                for flags in [ACK, ACK | PSH, 0, PSH] {
                    for from_client in [false, true] {
                        for plaintext in [false, true] {
                            for text in texts {
                                let mut p = data(from_client, 7, text);
                                p.flags = flags;
                                p.plaintext = plaintext;
                                p.first_byte = if from_client {
                                    text.first().copied().unwrap_or(0)
                                } else {
                                    0
                                };
                                if p.may_change_flow() {
                                    continue;
                                }
                                skipped += 1;
                                let exists = st_state != 0;
                                let before = FlowState {
                                    state: st_state,
                                    tls: tls_stage,
                                    syn_ns: 1_000,
                                    flags: if tls_stage == tls::NONE { 0 } else { flag::TLS },
                                    ..FlowState::default()
                                };
                                let mut st = before;
                                let a = step_may_change(&mut st, exists, &p, 2_000, TIMEOUT);
                                if exists
                                    && st_state == state::SYN_SENT
                                    && from_client
                                    && flags & ACK != 0
                                {
                                    // The one exception: the state machine would complete the
                                    // handshake; `step`, as the kernel, ignores the segment.
                                    assert_eq!(a.outcome, Some(Outcome::Established), "{p:?}");
                                    let mut st = before;
                                    let skipped = step(&mut st, exists, &p, 2_000, TIMEOUT);
                                    assert_eq!((skipped, st), (Actions::default(), before));
                                    continue;
                                }
                                assert_eq!(a, Actions::default(), "{p:?} in {before:?}");
                                assert_eq!(st, before, "{p:?}");
                                assert_eq!(
                                    step(&mut st, exists, &p, 2_000, TIMEOUT),
                                    Actions::default()
                                );
                            }
                        }
                    }
                }
            }
        }
        assert!(skipped > 100, "{skipped}");
        // Never skipped: SYN, RST, FIN, a server's payload, a client's ACK, STARTTLS, EHLO, a
        // TLS application-data record.
        for p in [pkt(SYN, true), pkt(RST, false), pkt(FIN | ACK, true), pkt(ACK, true)] {
            assert!(p.may_change_flow(), "{p:?}");
        }
        for (from_client, text) in [
            (false, &b"250 ok\r\n"[..]),
            (true, b"STARTTLS\r\n"),
            (true, b"EHLO mx.example.net\r\n"),
        ] {
            assert!(data(from_client, 7, text).may_change_flow(), "{text:?}");
        }
        let mut app = data(true, 7, b"\x17\x03\x03\x00\x20");
        app.first_byte = TLS_APPLICATION_DATA;
        assert!(app.may_change_flow());
    }

    /// The clock is read for every step but a retransmitted SYN's and a timeless RST's, and the
    /// steps are what they were with the clock read first (`advance`, then the activity stamp
    /// when stored): every state and flag, SYNs, RSTs and others with every other flag, from
    /// either side, with the flow's own initial sequence number or another, early and late.
    #[test]
    fn a_retransmitted_syn_and_a_timeless_reset_read_no_clock() {
        const ISN: u32 = 7_000;
        let (mut retransmits, mut timeless) = (0, 0);
        for st_state in [0, state::SYN_SENT, state::ESTABLISHED, state::GREETED, state::CLOSED] {
            for st_flags in [0, flag::LATE, flag::UNREACHABLE, flag::TLS | flag::REPLIED] {
                for flags in [SYN, SYN | ACK, SYN | RST, SYN | FIN, SYN | PSH, ACK, RST, FIN | ACK]
                {
                    for from_client in [false, true] {
                        for seq in [ISN, ISN + 1] {
                            for now in [1_500, 1_000 + 3 * TIMEOUT] {
                                let exists = st_state != 0;
                                let before = FlowState {
                                    state: st_state,
                                    flags: st_flags,
                                    syn_ns: 1_000,
                                    client_isn: ISN,
                                    ..FlowState::default()
                                };
                                let mut p = pkt(flags, from_client);
                                p.seq = seq;
                                let (mut want_st, mut want) = (before, Actions::default());
                                advance(&mut want_st, exists, &p, now, TIMEOUT, &mut want);
                                if want.store {
                                    want_st.active = (now >> ACTIVE_SHIFT) as u32;
                                }
                                let (mut st, mut a, mut read) = (before, Actions::default(), false);
                                let clock = || {
                                    read = true;
                                    now
                                };
                                step_may_change_into(&mut st, exists, &p, clock, TIMEOUT, &mut a);
                                assert_eq!((a, st), (want, want_st), "{p:?} in {before:?}");
                                let retransmit = is_syn_retransmit(&before, exists, &p);
                                let reset = is_timeless_reset(&before, exists, &p);
                                assert_eq!(
                                    read,
                                    !(retransmit || reset),
                                    "{p:?} in {before:?} at {now}"
                                );
                                if retransmit {
                                    retransmits += 1;
                                    assert!(a.syn_retransmit && st == before, "{p:?}");
                                }
                                if reset {
                                    timeless += 1;
                                    assert!(!a.store && a.reset.is_some(), "{p:?} in {before:?}");
                                }
                            }
                        }
                    }
                }
            }
        }
        assert!(retransmits > 0 && timeless > 0);
    }

    /// A segment the kernel returns early for ([`FlowPacket::quiet`]) is counted nowhere and
    /// changes no flow.
    #[test]
    fn quiet_segments_are_neither_counted_nor_tracked() {
        fn head8(text: &[u8]) -> [u8; 8] {
            let mut h = [0u8; 8];
            let n = text.len().min(8);
            h[..n].copy_from_slice(&text[..n]);
            h
        }
        let rests: [&[u8]; 5] =
            [b"TARTTLS\r\n", b"HLO mx.example.net\r\n", b"ELO a\r\n", b"\x03\x03\x00\x20", b""];
        let mut quiet = 0;
        for flags in 0..=u8::MAX {
            for (window, from_client, first, rest) in [0, 1].into_iter().flat_map(|w| {
                [false, true].into_iter().flat_map(move |c| {
                    (0..=u8::MAX).flat_map(move |b| rests.into_iter().map(move |r| (w, c, b, r)))
                })
            }) {
                let mut buf = [0u8; 32];
                buf[0] = first;
                buf[1..=rest.len()].copy_from_slice(rest);
                for text in [&buf[..=rest.len()], &[]] {
                    let len = text.len() as u32;
                    if !FlowPacket::quiet(flags, window, from_client, len, &head8(text)) {
                        continue;
                    }
                    quiet += 1;
                    assert_eq!(crate::classify(flags, window), None, "{flags:#x} {window}");
                    let mut p = data(from_client, 7, text);
                    p.flags = flags;
                    p.first_byte = if from_client { text.first().copied().unwrap_or(0) } else { 0 };
                    assert!(!p.may_change_flow(), "{p:?} {text:?}");
                }
            }
        }
        assert!(quiet > 10_000, "{quiet}");
        // Never quiet: a client's ACK with no payload, anything on a zero window, a server's
        // payload, what the flow reads of a client.
        assert!(!FlowPacket::quiet(ACK, 1, true, 0, &head8(b"")));
        assert!(!FlowPacket::quiet(ACK, 0, false, 0, &head8(b"")));
        assert!(!FlowPacket::quiet(ACK, 1, false, 8, &head8(b"250 ok\r\n")));
        for text in
            [&b"STARTTLS\r\n"[..], b"ehlo a.example\r\n", b"HELO a.example\r\n", b"\x17\x03\x03"]
        {
            assert!(!FlowPacket::quiet(ACK | PSH, 1, true, text.len() as u32, &head8(text)));
        }
        // A body line that starts like a command is quiet.
        assert!(FlowPacket::quiet(ACK | PSH, 1, true, 20, &head8(b"Subject: benchmark\r\n")));
    }

    /// Drives a flow through packets, returning every non-empty action.
    struct Flow {
        st: FlowState,
        exists: bool,
    }

    impl Flow {
        fn new() -> Self {
            Self { st: FlowState::default(), exists: false }
        }
        fn feed(&mut self, p: FlowPacket, now: u64) -> Actions {
            let mut st = if self.exists { self.st } else { FlowState::default() };
            let a = step(&mut st, self.exists, &p, now, TIMEOUT);
            if a.delete {
                self.exists = false;
            } else if a.store {
                self.st = st;
                self.exists = true;
            }
            a
        }
        fn established(now: u64) -> Self {
            let mut f = Self::new();
            f.feed(pkt(SYN, true), 1_000);
            let mut sa = pkt(SYN | ACK, false);
            sa.seq = 99;
            f.feed(sa, now);
            f
        }
        /// Server data, the next segment after the last.
        fn server(&mut self, text: &[u8], now: u64) -> Actions {
            let seq = self.st.server_next_seq;
            self.feed(data(false, seq, text), now)
        }
    }

    #[test]
    fn handshake_established_with_duration_and_retransmits() {
        let mut f = Flow::new();
        assert!(f.feed(pkt(SYN, true), 1_000).store);
        let again = f.feed(pkt(SYN, true), 2_000);
        assert!(again.syn_retransmit && again.outcome.is_none());
        let sa = f.feed(pkt(SYN | ACK, false), 5_000);
        assert_eq!(sa.outcome, Some(Outcome::Established));
        assert_eq!(sa.handshake_ns, Some(4_000), "from the first SYN");
        let dup = f.feed(pkt(SYN | ACK, false), 6_000);
        assert_eq!(dup, Actions::default(), "a duplicate SYN-ACK counts nothing");
        assert_eq!(f.feed(pkt(ACK, true), 7_000), Actions::default());
    }

    /// Answers after the timeout decide no outcome, the flow is still followed and marked late,
    /// and the kernel never deletes it (the sweep must see it to count the timeout).
    #[test]
    fn late_answers_take_no_outcome() {
        let late = 1 + TIMEOUT + 1;
        let mut syn = pkt(SYN, true);
        syn.seq = 1000;
        // A late SYN-ACK.
        let mut f = Flow::new();
        f.feed(syn, 1);
        assert!(f.feed(syn, late - 1).syn_retransmit, "same ISN: a retransmission");
        let sa = f.feed(pkt(SYN | ACK, false), late);
        assert_eq!((sa.outcome, sa.handshake_ns, sa.store), (None, None, true));
        assert_eq!((f.st.state, f.st.flags & flag::LATE), (state::ESTABLISHED, flag::LATE));
        assert_eq!(f.st.syn_ns, 1, "the sweep still sees when the attempt started");
        assert_eq!(f.server(b"220 hi\r\n", late + 1).reply.map(|r| r.code), Some(220));
        let mut bye = data(false, f.st.server_next_seq, b"221 bye\r\n");
        bye.flags |= FIN;
        let a = f.feed(bye, late + 2);
        assert_eq!((a.reply.map(|r| r.code), a.delete), (Some(221), false), "kept");
        assert!(!f.feed(pkt(RST, true), late + 3).delete, "kept");
        // An answer exactly at the timeout is in time.
        let mut f = Flow::new();
        f.feed(syn, 1);
        assert_eq!(f.feed(pkt(SYN | ACK, false), 1 + TIMEOUT).outcome, Some(Outcome::Established));
        // A late RST: no refusal, the flow kept for the sweep.
        let mut f = Flow::new();
        f.feed(syn, 1);
        let r = f.feed(pkt(RST | ACK, false), late);
        assert_eq!((r.outcome, r.reset, r.delete), (None, Some(Phase::Handshake), false));
        assert!(f.exists && f.st.state == state::SYN_SENT && f.st.flags & flag::LATE != 0);
        // The client giving up late: kept too.
        let mut f = Flow::new();
        f.feed(syn, 1);
        assert!(!f.feed(pkt(RST, true), late).delete && f.exists);
        // XDP: the client's late ACK.
        let mut f = Flow::new();
        f.feed(syn, 1);
        let a = f.feed(pkt(ACK, true), late);
        assert_eq!((a.outcome, f.st.state), (None, state::ESTABLISHED));
        assert_ne!(f.st.flags & flag::LATE, 0);
        // A new attempt on the same ports has a new ISN.
        let mut again = syn;
        again.seq = 5000;
        let a = f.feed(again, late + 10);
        assert!(!a.syn_retransmit && a.store);
        assert_eq!((f.st.state, f.st.flags, f.st.syn_ns), (state::SYN_SENT, 0, late + 10));
        // No timeout configured: nothing is late.
        let mut st = FlowState::default();
        step(&mut st, false, &syn, 1, 0);
        let a = step(&mut st, true, &pkt(SYN | ACK, false), u64::MAX, 0);
        assert_eq!(a.outcome, Some(Outcome::Established));
    }

    /// An ICMP unreachable quoting the SYN decides the outcome once; later answers decide
    /// nothing, and the sweep never counts the attempt as a timeout.
    #[test]
    fn unreachable_decides_once() {
        let t = 5_000_000_000;
        let mut syn = pkt(SYN, true);
        syn.seq = 7000;
        let icmp = |f: &mut Flow, seq, now| {
            let mut st = f.st;
            let a = unreachable(&mut st, seq, now, TIMEOUT);
            if a.store {
                f.st = st;
            } else {
                assert_eq!(st, f.st, "nothing decided, nothing written");
            }
            a
        };
        let mut f = Flow::new();
        f.feed(syn, 10);
        assert_eq!(icmp(&mut f, 7001, 20), Actions::default(), "another sequence number");
        let a = icmp(&mut f, 7000, 20);
        assert_eq!((a.outcome, a.store), (Some(Outcome::Unreachable), true));
        assert_eq!(f.st.flags & flag::UNREACHABLE, flag::UNREACHABLE);
        assert_eq!(f.st.syn_ns, 10, "the attempt keeps its start");
        assert_eq!(icmp(&mut f, 7000, 30), Actions::default(), "once per handshake");
        assert!(f.feed(syn, 40).syn_retransmit, "the same SYN again");
        assert_eq!(icmp(&mut f, 7000, 50).outcome, None, "still once");
        // The sweep never counts it, however old.
        assert_eq!(sweep(&f.st, u64::MAX, t), Swept { timeout: false, idle: true });
        assert!(!sweep(&f.st, 10 + t + SWEEP_GRACE_NS + 1, t).timeout);
        // A SYN-ACK after it, in time or late, counts nothing; the connection is followed.
        for at in [60, 10 + TIMEOUT + 1] {
            let mut g = Flow { st: f.st, exists: true };
            let sa = g.feed(pkt(SYN | ACK, false), at);
            assert_eq!((sa.outcome, sa.handshake_ns, sa.store), (None, None, true));
            assert_eq!(g.st.state, state::ESTABLISHED);
            assert_eq!(g.st.flags & flag::LATE, 0, "not late: decided");
            assert!(!sweep(&g.st, u64::MAX, t).timeout);
            assert_eq!(g.server(b"220 hi\r\n", at + 1).reply.map(|r| r.code), Some(220));
        }
        // XDP: the client's ACK after it counts nothing either.
        let mut g = Flow { st: f.st, exists: true };
        assert_eq!(g.feed(pkt(ACK, true), 60).outcome, None);
        // A RST after it is no refusal.
        let mut g = Flow { st: f.st, exists: true };
        let r = g.feed(pkt(RST | ACK, false), 10 + TIMEOUT + 1);
        assert_eq!((r.outcome, r.reset, r.delete), (None, Some(Phase::Handshake), true));
        // A new attempt on the same ports (a new ISN) starts afresh.
        let mut again = syn;
        again.seq = 9000;
        assert!(f.feed(again, 100).store);
        assert_eq!((f.st.state, f.st.flags), (state::SYN_SENT, 0));
        assert_eq!(icmp(&mut f, 9000, 110).outcome, Some(Outcome::Unreachable));
    }

    /// An ICMP unreachable after the timeout, or after the attempt was answered, decides
    /// nothing: the sweep counts the timeout, or the answer stands.
    #[test]
    fn unreachable_too_late_or_after_an_answer_counts_nothing() {
        let t = 5_000_000_000;
        let mut syn = pkt(SYN, true);
        syn.seq = 42;
        let mut f = Flow::new();
        f.feed(syn, 1);
        let before = f.st;
        let mut st = f.st;
        assert_eq!(unreachable(&mut st, 42, 1 + TIMEOUT + 1, TIMEOUT), Actions::default());
        assert_eq!(st, before);
        // At the timeout exactly it is in time, as a SYN-ACK is.
        assert_eq!(
            unreachable(&mut st, 42, 1 + TIMEOUT, TIMEOUT).outcome,
            Some(Outcome::Unreachable)
        );
        // The sweep counts the late one's attempt as a timeout, once.
        let swept = FlowState { syn_ns: 1, ..before };
        assert!(sweep(&swept, 1 + t + SWEEP_GRACE_NS + 1, t).timeout);
        // Late-marked (a late RST): nothing.
        let mut f = Flow::new();
        f.feed(syn, 1);
        f.feed(pkt(RST | ACK, false), 1 + TIMEOUT + 1);
        let mut st = f.st;
        assert_eq!(unreachable(&mut st, 42, 1 + TIMEOUT + 2, TIMEOUT).outcome, None);
        // Established: nothing.
        let mut f = Flow::new();
        f.feed(syn, 1);
        assert_eq!(f.feed(pkt(SYN | ACK, false), 2).outcome, Some(Outcome::Established));
        let mut st = f.st;
        assert_eq!(unreachable(&mut st, 42, 3, TIMEOUT), Actions::default());
        // A flow never seen starting (all zero): nothing.
        let mut st = FlowState::default();
        assert_eq!(unreachable(&mut st, 0, 3, TIMEOUT), Actions::default());
        // No timeout configured: never late.
        let mut st = FlowState { syn_ns: 1, client_isn: 42, state: state::SYN_SENT, ..before };
        assert_eq!(unreachable(&mut st, 42, u64::MAX, 0).outcome, Some(Outcome::Unreachable));
    }

    #[test]
    fn refused_and_reset_phases() {
        let mut f = Flow::new();
        f.feed(pkt(SYN, true), 1);
        let r = f.feed(pkt(RST | ACK, false), 2);
        assert_eq!(
            (r.outcome, r.reset, r.delete),
            (Some(Outcome::Refused), Some(Phase::Handshake), true)
        );
        // The client giving up during the handshake: a handshake reset, not a refusal.
        let mut f = Flow::new();
        f.feed(pkt(SYN, true), 1);
        let r = f.feed(pkt(RST, true), 2);
        assert_eq!((r.outcome, r.reset), (None, Some(Phase::Handshake)));

        let mut f = Flow::established(10);
        let r = f.feed(pkt(RST, false), 20);
        assert_eq!((r.outcome, r.reset), (None, Some(Phase::PreGreeting)));

        let mut f = Flow::established(10);
        f.feed(data(false, 100, b"220 mx ESMTP\r\n"), 30);
        assert_eq!(f.feed(pkt(RST, true), 40).reset, Some(Phase::Session));

        let mut unknown = Flow::new();
        assert_eq!(unknown.feed(pkt(RST, false), 1).reset, Some(Phase::Session));
    }

    #[test]
    fn greeting_duration_and_reply_codes() {
        let code = |a: Actions| a.reply.map(|r| r.code);
        let mut f = Flow::established(1_000);
        let g = f.feed(data(false, 100, b"220 mx.example ESMTP\r\n"), 51_000);
        assert_eq!((g.greeting_ns, code(g), g.greeting), (Some(50_000), Some(220), true));
        assert_eq!(f.feed(data(true, 1, b"EHLO x\r\n"), 52_000).reply, None);
        let r = f.feed(data(false, 122, b"250-mx\r\n250 OK\r\n"), 53_000);
        assert_eq!((code(r), r.greeting, r.greeting_ns), (Some(250), false, None));
        // A retransmission of the same bytes counts nothing.
        assert_eq!(f.feed(data(false, 122, b"250-mx\r\n250 OK\r\n"), 54_000).reply, None);
        // A reply split mid-line: the second segment's digits are not a reply.
        let part = f.feed(data(false, 138, b"451 4.3.0 temporarily"), 55_000);
        assert_eq!(
            part.reply,
            Some(Reply { code: 451, status: ReplyStatus::new(4, 3, 0) }),
            "with its enhanced status"
        );
        let rest = f.feed(data(false, 159, b"250 looks like a code\r\n"), 56_000);
        assert_eq!(rest.reply, None, "mid-line payload must not count");
        assert_eq!(code(f.feed(data(false, 182, b"554 no\r\n"), 57_000)), Some(554));
        // Segments under 16 bytes are read to their first 8: the code counts, not the status.
        let short = f.feed(data(false, 190, b"452 4.5.3\r\n"), 58_000);
        assert_eq!(short.reply, Some(Reply { code: 452, status: ReplyStatus::NONE }));
        let sixteen = f.feed(data(false, 201, b"452 4.5.3 many\r\n"), 58_500);
        assert_eq!(sixteen.reply.map(|r| r.status), Some(ReplyStatus::new(4, 5, 3)));
        let shortest = f.feed(data(false, 217, b"421 4\r\n"), 59_000);
        assert_eq!(shortest.reply, Some(Reply { code: 421, status: ReplyStatus::NONE }));
    }

    #[test]
    fn throttled_once_per_session() {
        let mut f = Flow::established(1_000);
        assert!(!f.server(b"220 mx ESMTP\r\n", 2_000).throttled);
        for r in
            [&b"451 4.7.1 greylisted\r\n"[..], b"450 4.3.0 try later\r\n", b"452 4.2.2 full\r\n"]
        {
            assert!(!f.server(r, 3_000).throttled, "{:?}", core::str::from_utf8(r));
        }
        let t = f.server(b"452 4.5.3 Too many recipients\r\n", 4_000);
        assert!(t.throttled && t.reply.unwrap().is_throttling());
        assert!(!f.server(b"421 4.7.0 closing\r\n", 5_000).throttled, "once per session");
        // A 421 greeting.
        let mut f = Flow::established(1_000);
        assert!(f.server(b"421 mx busy\r\n", 2_000).throttled);
        // Not on a TLS port.
        let mut f = Flow::established(1_000);
        let mut hello = data(false, 100, b"421 busy\r\n");
        hello.plaintext = false;
        assert!(!f.feed(hello, 2_000).throttled);
    }

    #[test]
    fn starttls_stops_reading() {
        let mut f = Flow::established(0);
        f.feed(data(false, 100, b"220 hi\r\n"), 1);
        assert_eq!(
            f.feed(data(true, 1, b"STARTTLS\r\n"), 2).starttls,
            Some(StarttlsStage::Requested)
        );
        assert_eq!(f.feed(data(true, 1, b"STARTTLS\r\n"), 2).starttls, None, "once until answered");
        let go = f.feed(data(false, 108, b"220 go ahead\r\n"), 3);
        assert_eq!(
            (go.reply.map(|r| r.code), go.starttls),
            (Some(220), Some(StarttlsStage::Accepted))
        );
        assert_eq!(f.feed(data(false, 122, b"250 encrypted?\r\n"), 4).reply, None, "TLS now");
        assert_eq!(f.feed(data(true, 11, b"STARTTLS\r\n"), 5).starttls, None, "encrypted");

        // A refused STARTTLS keeps reading.
        let mut f = Flow::established(0);
        f.feed(data(false, 100, b"220 hi\r\n"), 1);
        f.feed(data(true, 1, b"starttls\r\n"), 2);
        let no = f.feed(data(false, 108, b"454 4.7.0 no TLS\r\n"), 3);
        assert_eq!(
            (no.reply.map(|r| r.code), no.starttls),
            (Some(454), Some(StarttlsStage::Refused))
        );
        assert_eq!(f.feed(data(false, 126, b"250 ok\r\n"), 4).reply.map(|r| r.code), Some(250));
    }

    #[test]
    fn tls_ports_time_the_greeting_but_read_nothing() {
        let mut f = Flow::established(1_000);
        let mut hello = data(false, 100, b"220 not read");
        hello.plaintext = false;
        let a = f.feed(hello, 3_000);
        assert_eq!((a.greeting_ns, a.reply), (Some(2_000), None));
    }

    #[test]
    fn xdp_sees_the_client_ack_instead_of_the_syn_ack() {
        let mut f = Flow::new();
        f.feed(pkt(SYN, true), 1);
        let a = f.feed(pkt(ACK, true), 9);
        assert_eq!((a.outcome, a.handshake_ns), (Some(Outcome::Established), None));
        assert_eq!(f.feed(pkt(ACK, true), 10).outcome, None);
        // Outbound in XDP: only the SYN-ACK is seen.
        let mut f = Flow::new();
        let a = f.feed(pkt(SYN | ACK, false), 5);
        assert_eq!((a.outcome, a.handshake_ns), (Some(Outcome::Established), None));
    }

    /// XDP never sees the server's FIN of an inbound connection: the client's ends the flow. With
    /// both directions in view (TC), the server may still answer after the client's FIN.
    #[test]
    fn client_fin_ends_the_flow_where_only_ingress_is_seen() {
        let mut fin = pkt(FIN | ACK, true);
        fin.ingress_only = true;
        let mut f = Flow::new();
        let mut syn = pkt(SYN, true);
        syn.ingress_only = true;
        f.feed(syn, 1);
        let mut ack = pkt(ACK, true);
        ack.ingress_only = true;
        f.feed(ack, 2);
        assert!(f.feed(fin, 3).delete);
        let mut f = Flow::established(10);
        assert!(!f.feed(pkt(FIN | ACK, true), 20).delete, "TC: the server's FIN ends it");
        assert!(f.feed(pkt(FIN | ACK, false), 21).delete);
    }

    #[test]
    fn server_fin_ends_the_flow_after_its_payload() {
        let mut f = Flow::established(0);
        f.feed(data(false, 100, b"220 hi\r\n"), 1);
        let mut bye = data(false, 108, b"221 bye\r\n");
        bye.flags |= FIN;
        let a = f.feed(bye, 2);
        assert_eq!((a.reply.map(|r| r.code), a.delete), (Some(221), true));
    }

    #[test]
    fn writes_stamp_the_activity() {
        let mut f = Flow::new();
        f.feed(pkt(SYN, true), 5 << ACTIVE_SHIFT);
        assert_eq!(f.st.active, 5);
        f.feed(pkt(SYN, true), 9 << ACTIVE_SHIFT);
        assert_eq!(f.st.active, 5, "a retransmission writes nothing");
        f.feed(pkt(SYN | ACK, false), 6 << ACTIVE_SHIFT);
        assert_eq!(f.st.active, 6);
    }

    #[test]
    fn the_sweep_counts_unanswered_attempts_after_the_grace() {
        let t = 5_000_000_000;
        let syn = FlowState { syn_ns: 10, state: state::SYN_SENT, ..FlowState::default() };
        let edge = 10 + t + SWEEP_GRACE_NS;
        assert_eq!(sweep(&syn, edge, t), Swept::default());
        assert!(sweep(&syn, edge + 1, t).timeout);
        let late = FlowState { state: state::GREETED, flags: flag::LATE, ..syn };
        assert!(sweep(&late, edge + 1, t).timeout);
        let answered = FlowState { state: state::ESTABLISHED, ..syn };
        assert!(!sweep(&answered, u64::MAX, t).timeout);
        let unseen_syn = FlowState { syn_ns: 0, ..syn };
        assert!(!sweep(&unseen_syn, u64::MAX, t).timeout);
        // Idle: not written for IDLE_NS.
        let at = 100 << ACTIVE_SHIFT;
        let written = FlowState { active: 100, ..answered };
        assert!(!sweep(&written, at + IDLE_NS, t).idle);
        assert!(sweep(&written, at + IDLE_NS + (2 << ACTIVE_SHIFT), t).idle);
    }

    /// Client data with its first byte read, as the kernel reads it.
    fn client(seq: u32, bytes: &[u8]) -> FlowPacket {
        let mut p = data(true, seq, bytes);
        p.first_byte = bytes.first().copied().unwrap_or(0);
        p
    }

    fn tls_port(mut p: FlowPacket) -> FlowPacket {
        p.plaintext = false;
        p
    }

    /// An implicit-TLS flow (port 465): its TCP handshake completed.
    fn implicit_tls() -> Flow {
        let mut f = Flow::new();
        f.feed(tls_port(pkt(SYN, true)), 1_000);
        let mut sa = tls_port(pkt(SYN | ACK, false));
        sa.seq = 99;
        f.feed(sa, 2_000);
        assert_eq!(f.st.tls, tls::HANDSHAKE, "TLS starts with the TCP handshake");
        f
    }

    #[test]
    fn payload_events_once_per_session_through_starttls() {
        let kind = |a: Actions| a.payload;
        let mut f = Flow::established(1_000);
        let greeting = data(false, 100, b"220 mx.example ESMTP\r\n");
        assert_eq!(kind(f.feed(greeting, 2_000)), Some(PayloadKind::Greeting));
        assert_eq!(kind(f.feed(greeting, 2_100)), None, "a retransmission");
        assert_eq!(
            kind(f.feed(client(1, b"EHLO client.example\r\n"), 3_000)),
            Some(PayloadKind::Ehlo)
        );
        assert_eq!(f.feed(client(1, b"EHLO client.example\r\n"), 3_100), Actions::default());
        let reply = data(false, 122, b"250-mx.example\r\n250 STARTTLS\r\n");
        let r = f.feed(reply, 4_000);
        assert_eq!(
            (kind(r), r.reply.map(|r| r.code), r.greeting),
            (Some(PayloadKind::EhloReply), Some(250), false)
        );
        assert_eq!(kind(f.feed(reply, 4_100)), None, "a retransmission");
        assert_eq!(kind(f.feed(client(21, b"HELO again\r\n"), 4_200)), None, "once");
        let st = f.feed(client(21, b"STARTTLS\r\n"), 5_000);
        assert_eq!((st.starttls, st.payload), (Some(StarttlsStage::Requested), None));
        let go = f.server(b"220 2.0.0 go ahead\r\n", 6_000);
        assert_eq!((go.starttls, go.payload, go.tls), (Some(StarttlsStage::Accepted), None, None));
        assert_eq!(f.st.tls, tls::HANDSHAKE);
        // The ClientHello: no stage.
        let hello = f.feed(client(31, &[0x16, 3, 1, 0, 200, 1]), 7_000);
        assert_eq!((hello.tls, hello.payload), (None, None));
        let seq = f.st.server_next_seq;
        let sh = data(false, seq, &[0x16, 3, 3, 0, 90, 2, 0, 0, 86, 3, 3]);
        assert_eq!(kind(f.feed(sh, 8_000)), Some(PayloadKind::ServerHello));
        assert_eq!(kind(f.feed(sh, 8_100)), None, "a retransmission");
        assert_eq!(kind(f.server(&[0x17, 3, 3, 0, 40], 8_200)), None, "once");
        // The client's first application-data record: completed, once.
        let done = f.feed(client(300, &[0x17, 3, 3, 0, 53]), 9_000);
        assert_eq!((done.tls, done.store), (Some(StarttlsStage::Completed), true));
        assert_eq!(f.st.tls, tls::COMPLETED);
        assert_eq!(f.feed(client(400, &[0x17, 3, 3, 0, 53]), 9_100).tls, None);
        // Its end is no failure.
        assert_eq!(f.feed(pkt(RST, false), 10_000).tls, None);
    }

    #[test]
    fn ehlo_and_helo_in_any_case_only_at_the_start() {
        for (text, want) in [
            (&b"EHLO a.example\r\n"[..], true),
            (b"helo a.example\r\n", true),
            (b"eHlO x\r\n", true),
            (b"EHLOx\r\n\r\n", false),
            (b"EHLO\r\n", false),
            (b"MAIL FROM:<a@b>\r\n", false),
            (b" EHLO a.example\r\n", false),
        ] {
            let mut f = Flow::established(0);
            f.server(b"220 hi\r\n", 1);
            let a = f.feed(client(1, text), 2);
            assert_eq!(
                a.payload == Some(PayloadKind::Ehlo),
                want,
                "{:?}",
                core::str::from_utf8(text)
            );
        }
        // Not on a TLS port, and not once TLS started.
        let mut f = implicit_tls();
        assert_eq!(f.feed(tls_port(client(1, b"EHLO a.example\r\n")), 3_000).payload, None);
    }

    /// A client that sends EHLO before the greeting: the greeting is the greeting, the next
    /// segment the EHLO reply.
    #[test]
    fn an_early_ehlo_gets_the_segment_after_the_greeting() {
        let mut f = Flow::established(0);
        assert_eq!(f.feed(client(1, b"EHLO early\r\n"), 1).payload, Some(PayloadKind::Ehlo));
        assert_eq!(f.server(b"220 hi\r\n", 2).payload, Some(PayloadKind::Greeting));
        assert_eq!(f.server(b"250 mx\r\n", 3).payload, Some(PayloadKind::EhloReply));
        assert_eq!(f.server(b"250 ok\r\n", 4).payload, None);
    }

    #[test]
    fn implicit_tls_server_hello_and_completion() {
        let mut f = implicit_tls();
        assert_eq!(f.feed(tls_port(client(1, &[0x16, 3, 1, 1, 0])), 3_000), Actions::default());
        let sh = tls_port(data(false, 100, &[0x16, 3, 3, 0, 90, 2]));
        let a = f.feed(sh, 4_000);
        assert_eq!(
            (a.payload, a.greeting_ns, a.reply),
            (Some(PayloadKind::ServerHello), Some(2_000), None)
        );
        assert_eq!(f.feed(sh, 4_100).payload, None, "a retransmission");
        let done = f.feed(tls_port(client(300, &[0x17, 3, 3])), 5_000);
        assert_eq!(done.tls, Some(StarttlsStage::Completed));
        // A reply-looking payload on a TLS port is nothing.
        assert_eq!(f.feed(tls_port(data(false, 106, b"220 hi\r\n")), 6_000).payload, None);
    }

    #[test]
    fn tls_fails_once_on_a_reset_or_fin_before_completion() {
        // A RST from either side mid-handshake.
        for from_client in [false, true] {
            let mut f = implicit_tls();
            let r = f.feed(tls_port(pkt(RST, from_client)), 3_000);
            assert_eq!(
                (r.tls, r.reset, r.delete),
                (Some(StarttlsStage::Failed), Some(Phase::PreGreeting), true)
            );
        }
        // The client's FIN (TC: the flow lives on until the server's), then the server's.
        let mut f = implicit_tls();
        let fin = f.feed(tls_port(pkt(FIN | ACK, true)), 3_000);
        assert_eq!((fin.tls, fin.store, fin.delete), (Some(StarttlsStage::Failed), true, false));
        assert_eq!(f.st.tls, tls::FAILED);
        let last = f.feed(tls_port(pkt(FIN | ACK, false)), 3_100);
        assert_eq!((last.tls, last.delete), (None, true), "once");
        // After STARTTLS: the server's FIN with the ServerHello fails it too.
        let mut f = Flow::established(0);
        f.server(b"220 hi\r\n", 1);
        f.feed(client(1, b"STARTTLS\r\n"), 2);
        f.server(b"220 go\r\n", 3);
        let mut sh = data(false, f.st.server_next_seq, &[0x16, 3, 3, 0, 90]);
        sh.flags |= FIN;
        let a = f.feed(sh, 4);
        assert_eq!(
            (a.payload, a.tls, a.delete),
            (Some(PayloadKind::ServerHello), Some(StarttlsStage::Failed), true)
        );
        // Before TLS started: nothing.
        let mut f = Flow::established(0);
        assert_eq!(f.feed(pkt(RST, false), 1).tls, None);
        // XDP, an outbound implicit-TLS connection: the client is never seen, nor its
        // completion, so the server's FIN or RST decides nothing.
        for flags in [FIN | ACK, RST] {
            let mut f = implicit_tls();
            let mut end = tls_port(pkt(flags, false));
            end.ingress_only = true;
            assert_eq!(f.feed(end, 3_000).tls, None);
        }
    }

    /// A late flow is kept for the sweep when its connection ends, as `CLOSED` (no longer
    /// open); the sweep still counts its timeout, and its way is free to take once idle.
    #[test]
    fn late_flows_close_instead_of_being_deleted() {
        let late = 1 + TIMEOUT + 1;
        let mut f = Flow::new();
        f.feed(pkt(SYN, true), 1);
        f.feed(pkt(SYN | ACK, false), late);
        assert!(state::is_open(f.st.state));
        f.server(b"220 hi\r\n", late + 1);
        assert!(state::is_open(f.st.state));
        let mut bye = data(false, f.st.server_next_seq, b"221 bye\r\n");
        bye.flags |= FIN;
        let a = f.feed(bye, late + 2);
        assert_eq!((a.reply.map(|r| r.code), a.delete, a.store), (Some(221), false, true));
        assert_eq!(f.st.state, state::CLOSED);
        assert!(!state::is_open(f.st.state));
        let t = 5_000_000_000;
        assert!(sweep(&f.st, 1 + t + SWEEP_GRACE_NS + 1, t).timeout);
        assert!(sweep(&f.st, (late + 2) + IDLE_NS + (2 << ACTIVE_SHIFT), t).idle);
        // A RST after it writes nothing.
        let r = f.feed(pkt(RST, true), late + 3);
        assert_eq!((r.reset, r.store, r.delete), (Some(Phase::Session), false, false));
        // A RST ends a late established flow the same way.
        let mut f = Flow::new();
        f.feed(pkt(SYN, true), 1);
        f.feed(pkt(SYN | ACK, false), late);
        let r = f.feed(pkt(RST, false), late + 1);
        assert_eq!((r.reset, r.store, r.delete), (Some(Phase::PreGreeting), true, false));
        assert_eq!(f.st.state, state::CLOSED);
        // XDP: the client's FIN.
        let mut f = Flow::new();
        f.feed(pkt(SYN, true), 1);
        f.feed(pkt(ACK, true), late);
        let mut fin = pkt(FIN | ACK, true);
        fin.ingress_only = true;
        assert!(!f.feed(fin, late + 1).delete);
        assert_eq!(f.st.state, state::CLOSED);
        // A late RST to a pending attempt: not open before, kept as it was.
        let mut f = Flow::new();
        f.feed(pkt(SYN, true), 1);
        f.feed(pkt(RST | ACK, false), late);
        assert_eq!(f.st.state, state::SYN_SENT);
    }

    #[test]
    fn histogram_buckets() {
        assert_eq!(Histogram::bucket(0), 0);
        assert_eq!(Histogram::bucket(50_000), 0);
        assert_eq!(Histogram::bucket(50_001), 1);
        assert_eq!(Histogram::bucket(1_000_000_000), 13);
        assert_eq!(Histogram::bucket(10_000_000_000), 16);
        assert_eq!(Histogram::bucket(u64::MAX), 17);
    }
}
