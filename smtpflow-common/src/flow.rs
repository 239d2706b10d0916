//! Per-connection tracking: handshake outcomes, reset phases, time to greeting and SMTP reply
//! codes. [`step`] is the whole state machine, a pure function the kernel calls per packet (with
//! the flow's stored state) and the unit tests below drive directly.
use crate::rules::tcp_flags::{ACK, FIN, RST, SYN};

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
pub mod state {
    /// SYN seen, no answer yet.
    pub const SYN_SENT: u8 = 1;
    /// Handshake completed (SYN-ACK seen, or the client's ACK when the SYN-ACK is not visible).
    pub const ESTABLISHED: u8 = 2;
    /// The server has sent payload (its greeting).
    pub const GREETED: u8 = 3;
    /// No answer within the handshake timeout: counted as `timeout` by userspace, which marks
    /// the flow so that late retransmits and answers add no second outcome.
    pub const TIMED_OUT: u8 = 4;
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
    pub _pad: [u8; 6],
}

labelled_enum! {
    /// Handshake outcome.
    pub enum Outcome: u8 {
        /// The SYN was answered by a SYN-ACK.
        Established = 0 => "established",
        /// The SYN was answered by a RST.
        Refused = 1 => "refused",
        /// No answer within `--handshake-timeout` (decided by userspace's sweep).
        Timeout = 2 => "timeout",
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
    /// The first payload bytes (zero-filled past what was read).
    pub head: [u8; 8],
    /// How many bytes of `head` were read.
    pub head_len: u8,
    /// Whether the payload's last byte is `\n` (`true` also when it could not be read).
    pub ends_line: bool,
    /// Replies on this port are read (plaintext SMTP).
    pub plaintext: bool,
}

/// What to count and store after a packet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Actions {
    pub outcome: Option<Outcome>,
    pub handshake_ns: Option<u64>,
    pub syn_retransmit: bool,
    pub reset: Option<Phase>,
    pub greeting_ns: Option<u64>,
    /// SMTP reply code at the start of a server segment.
    pub reply: Option<u16>,
    /// The reply is the connection's first: its greeting.
    pub greeting: bool,
    /// Write the new state back.
    pub store: bool,
    /// Remove the flow (reset, or the server closed).
    pub delete: bool,
}

/// The code of an SMTP reply line (`NNN ` or `NNN-`, 2xx to 5xx) at the start of `head`.
#[inline(always)]
pub fn reply_code(head: &[u8; 8], len: u8) -> Option<u16> {
    if len < 4 {
        return None;
    }
    let [a, b, c, sep, ..] = *head;
    if !(b'2'..=b'5').contains(&a) || !b.is_ascii_digit() || !c.is_ascii_digit() {
        return None;
    }
    if sep != b' ' && sep != b'-' {
        return None;
    }
    Some(u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0'))
}

#[inline(always)]
fn is_starttls(head: &[u8; 8], len: u8) -> bool {
    len >= 8 && head.eq_ignore_ascii_case(b"STARTTLS")
}

/// `a` comes before `b` in sequence space.
#[inline(always)]
const fn seq_before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// Advances a flow by one packet. `exists`: `st` holds the flow's stored state (otherwise it is
/// zeroed and the flow is not tracked yet). `now` is in the same clock as the stored times.
#[inline(always)]
pub fn step(st: &mut FlowState, exists: bool, p: &FlowPacket, now: u64) -> Actions {
    let mut a = Actions::default();
    let (syn, ack, rst, fin) =
        (p.flags & SYN != 0, p.flags & ACK != 0, p.flags & RST != 0, p.flags & FIN != 0);

    if rst {
        a.reset = Some(if !exists {
            Phase::Session
        } else {
            match st.state {
                state::SYN_SENT | state::TIMED_OUT => Phase::Handshake,
                state::ESTABLISHED => Phase::PreGreeting,
                _ => Phase::Session,
            }
        });
        if exists && st.state == state::SYN_SENT && !p.from_client {
            a.outcome = Some(Outcome::Refused);
        }
        a.delete = exists;
        return a;
    }
    if syn && !ack {
        if !p.from_client {
            return a; // a SYN from the SMTP port: simultaneous open, not tracked
        }
        if exists && p.seq == st.client_isn {
            a.syn_retransmit = true;
            return a;
        }
        // A new attempt (possibly reusing the ports of an old connection).
        *st = FlowState {
            syn_ns: now,
            client_isn: p.seq,
            state: state::SYN_SENT,
            ..FlowState::default()
        };
        a.store = true;
        return a;
    }
    if syn {
        // SYN-ACK.
        let late = exists && st.state == state::TIMED_OUT;
        if p.from_client || (exists && st.state != state::SYN_SENT && !late) {
            return a; // not a server's answer, or a duplicate
        }
        // An answer after the timeout was decided adds no second outcome; the connection is
        // still followed.
        if !late {
            a.outcome = Some(Outcome::Established);
            if exists && st.syn_ns != 0 {
                a.handshake_ns = Some(now.saturating_sub(st.syn_ns));
            }
        }
        if !exists {
            *st = FlowState::default();
        }
        st.state = state::ESTABLISHED;
        st.established_ns = now;
        st.server_next_seq = p.seq.wrapping_add(1);
        st.flags |= flag::SEQ_KNOWN;
        a.store = true;
        return a;
    }
    if !exists {
        return a; // a connection we did not see start
    }
    if st.state == state::TIMED_OUT {
        return a;
    }
    if st.state == state::SYN_SENT {
        if !(p.from_client && ack) {
            return a;
        }
        // The client completed the handshake and we never saw the SYN-ACK (XDP sees no egress).
        a.outcome = Some(Outcome::Established);
        st.state = state::ESTABLISHED;
        st.established_ns = now;
        a.store = true;
    }
    let reading = p.plaintext && st.flags & flag::TLS == 0;
    if p.from_client {
        if reading && is_starttls(&p.head, p.head_len) {
            st.flags |= flag::STARTTLS_PENDING;
            a.store = true;
        }
        return a;
    }
    if fin {
        a.delete = true;
    }
    if p.payload_len == 0 {
        return a;
    }
    if st.flags & flag::SEQ_KNOWN != 0 && seq_before(p.seq, st.server_next_seq) {
        return a; // a retransmission: already counted
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
    if reading
        && st.flags & flag::MID_LINE == 0
        && let Some(code) = reply_code(&p.head, p.head_len)
    {
        a.reply = Some(code);
        if st.flags & flag::REPLIED == 0 {
            a.greeting = true;
            st.flags |= flag::REPLIED;
        }
        if st.flags & flag::STARTTLS_PENDING != 0 {
            st.flags &= !flag::STARTTLS_PENDING;
            if code == 220 {
                st.flags |= flag::TLS;
            }
        }
    }
    if p.ends_line {
        st.flags &= !flag::MID_LINE;
    } else {
        st.flags |= flag::MID_LINE;
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::tcp_flags::PSH;

    fn pkt(flags: u8, from_client: bool) -> FlowPacket {
        FlowPacket { flags, from_client, plaintext: true, ends_line: true, ..Default::default() }
    }

    fn data(from_client: bool, seq: u32, text: &[u8]) -> FlowPacket {
        let mut p = pkt(ACK | PSH, from_client);
        p.seq = seq;
        p.payload_len = text.len() as u32;
        let n = text.len().min(8);
        p.head[..n].copy_from_slice(&text[..n]);
        p.head_len = n as u8;
        p.ends_line = text.last() == Some(&b'\n');
        p
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
            let a = step(&mut st, self.exists, &p, now);
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

    #[test]
    fn timed_out_flows_take_no_second_outcome() {
        let mut f = Flow::new();
        let mut syn = pkt(SYN, true);
        syn.seq = 1000;
        f.feed(syn, 1);
        // Userspace's sweep marks it.
        f.st.state = state::TIMED_OUT;
        assert!(f.feed(syn, 2).syn_retransmit, "same ISN after the timeout: a retransmission");
        let late = f.feed(pkt(SYN | ACK, false), 3);
        assert_eq!((late.outcome, late.handshake_ns, late.store), (None, None, true));
        assert_eq!(f.st.state, state::ESTABLISHED, "still followed");
        // A new attempt on the same ports has a new ISN.
        let mut f = Flow::new();
        f.feed(syn, 1);
        f.st.state = state::TIMED_OUT;
        assert_eq!(f.feed(pkt(RST, false), 2).reset, Some(Phase::Handshake));
        let mut again = syn;
        again.seq = 5000;
        let a = f.feed(again, 3);
        assert!(!a.syn_retransmit && a.store);
        assert_eq!(f.st.state, state::SYN_SENT);
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
        let mut f = Flow::established(1_000);
        let g = f.feed(data(false, 100, b"220 mx.example ESMTP\r\n"), 51_000);
        assert_eq!((g.greeting_ns, g.reply, g.greeting), (Some(50_000), Some(220), true));
        assert_eq!(f.feed(data(true, 1, b"EHLO x\r\n"), 52_000).reply, None);
        let r = f.feed(data(false, 122, b"250-mx\r\n250 OK\r\n"), 53_000);
        assert_eq!((r.reply, r.greeting, r.greeting_ns), (Some(250), false, None));
        // A retransmission of the same bytes counts nothing.
        assert_eq!(f.feed(data(false, 122, b"250-mx\r\n250 OK\r\n"), 54_000).reply, None);
        // A reply split mid-line: the second segment's digits are not a reply.
        let part = f.feed(data(false, 138, b"451 4.3.0 temporarily"), 55_000);
        assert_eq!(part.reply, Some(451));
        let rest = f.feed(data(false, 159, b"250 looks like a code\r\n"), 56_000);
        assert_eq!(rest.reply, None, "mid-line payload must not count");
        assert_eq!(f.feed(data(false, 182, b"554 no\r\n"), 57_000).reply, Some(554));
    }

    #[test]
    fn invalid_codes_do_not_count() {
        for bad in [
            &b"199 x\r\n"[..],
            b"600 x\r\n",
            b"25 x\r\n",
            b"2500 x\r\n",
            b"22a x\r\n",
            b"220x\r\n",
            b"220",
        ] {
            let mut head = [0u8; 8];
            let n = bad.len().min(8);
            head[..n].copy_from_slice(&bad[..n]);
            assert_eq!(reply_code(&head, n as u8), None, "{:?}", core::str::from_utf8(bad));
        }
        assert_eq!(reply_code(b"421-busy", 8), Some(421));
        assert_eq!(reply_code(b"220 \0\0\0\0", 4), Some(220));
    }

    #[test]
    fn starttls_stops_reading() {
        let mut f = Flow::established(0);
        f.feed(data(false, 100, b"220 hi\r\n"), 1);
        f.feed(data(true, 1, b"STARTTLS\r\n"), 2);
        assert_eq!(f.feed(data(false, 108, b"220 go ahead\r\n"), 3).reply, Some(220));
        assert_eq!(f.feed(data(false, 122, b"250 encrypted?\r\n"), 4).reply, None, "TLS now");

        // A refused STARTTLS keeps reading.
        let mut f = Flow::established(0);
        f.feed(data(false, 100, b"220 hi\r\n"), 1);
        f.feed(data(true, 1, b"starttls\r\n"), 2);
        assert_eq!(f.feed(data(false, 108, b"454 no TLS\r\n"), 3).reply, Some(454));
        assert_eq!(f.feed(data(false, 120, b"250 ok\r\n"), 4).reply, Some(250));
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

    #[test]
    fn server_fin_ends_the_flow_after_its_payload() {
        let mut f = Flow::established(0);
        f.feed(data(false, 100, b"220 hi\r\n"), 1);
        let mut bye = data(false, 108, b"221 bye\r\n");
        bye.flags |= FIN;
        let a = f.feed(bye, 2);
        assert_eq!((a.reply, a.delete), (Some(221), true));
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
