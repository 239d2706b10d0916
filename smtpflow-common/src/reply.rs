//! SMTP replies as the kernel reads them from the start of a server segment: the reply code
//! (`NNN ` or `NNN-`), the enhanced status code that may follow it (RFC 3463 `X.Y.Z`, as in
//! `451 4.7.1 greylisted` or `421-4.3.2 busy`), and whether the reply says "slow down".
//!
//! Pure and `no_std`: [`crate::flow::step`] calls [`parse_reply`] per server segment, and the
//! unit tests below pin which replies are throttling. The parser reads the bytes as two words
//! shifted along, never indexing the head by a variable, so that the BPF verifier sees only
//! constant offsets.

/// Bytes of the payload head the kernel reads: `NNN-` and the longest `X.YYY.ZZZ` with the byte
/// after it.
pub const HEAD_LEN: usize = 16;

/// An enhanced status code `class.subject.detail`, packed into 16 bits as
/// `class * 1000 + subject * 100 + detail`. A detail of 100 or more (Microsoft's `4.7.650`) is
/// kept as 99, "other", once the reply has been classified from the exact value; bit 15
/// ([`ReplyStatus::is_limit`]) keeps that classification. [`ReplyStatus::NONE`]: the reply has no
/// enhanced status code (or one this parser does not accept: a class that is not the reply
/// code's first digit, a subject above 9, more than three digits).
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ReplyStatus(u16);

/// The detail kept for details of 100 and more.
const OTHER_DETAIL: u16 = 99;
/// Bit of [`ReplyStatus`]: the status marks a rate or policy limit.
const LIMIT_BIT: u16 = 1 << 15;
/// The packed `X.Y.Z` bits of [`ReplyStatus`].
const CODE_MASK: u16 = LIMIT_BIT - 1;

impl ReplyStatus {
    /// No enhanced status code.
    pub const NONE: Self = Self(0);

    /// The status `class.subject.detail`; `NONE` unless the class is 2, 4 or 5 and the subject
    /// at most 9 (RFC 3463 defines subjects 0 to 7).
    #[inline(always)]
    pub const fn new(class: u8, subject: u16, detail: u16) -> Self {
        if !matches!(class, 2 | 4 | 5) || subject > 9 || detail > 999 {
            return Self::NONE;
        }
        let kept = if detail > OTHER_DETAIL { OTHER_DETAIL } else { detail };
        let packed = class as u16 * 1000 + subject * 100 + kept;
        let limit = if is_limit(class, subject, detail) { LIMIT_BIT } else { 0 };
        Self(packed | limit)
    }

    /// Whether the reply carried an enhanced status code.
    pub const fn is_some(self) -> bool {
        self.0 & CODE_MASK != 0
    }

    /// The `X` of `X.Y.Z` (0 for `NONE`).
    pub const fn class(self) -> u8 {
        ((self.0 & CODE_MASK) / 1000) as u8
    }

    /// The `Y` of `X.Y.Z`.
    pub const fn subject(self) -> u8 {
        ((self.0 & CODE_MASK) % 1000 / 100) as u8
    }

    /// The `Z` of `X.Y.Z`; `None` for a detail of 99 or more ("other").
    pub const fn detail(self) -> Option<u8> {
        let d = (self.0 & CODE_MASK) % 100;
        if d == OTHER_DETAIL { None } else { Some(d as u8) }
    }

    /// The status marks a rate or policy limit (see [`is_throttling`]), decided from the exact
    /// detail before it was packed.
    pub const fn is_limit(self) -> bool {
        self.0 & LIMIT_BIT != 0
    }

    /// The 16 bits stored in a map key.
    pub const fn to_bits(self) -> u16 {
        self.0
    }

    /// The status stored as `bits` by [`ReplyStatus::to_bits`]; `None` for bits no
    /// [`ReplyStatus::new`] makes.
    pub const fn from_bits(bits: u16) -> Option<Self> {
        if bits == 0 {
            return Some(Self::NONE);
        }
        let s = Self(bits);
        let (class, subject, detail) = (s.class(), s.subject() as u16, (bits & CODE_MASK) % 100);
        if !matches!(class, 2 | 4 | 5) || bits & CODE_MASK >= 6000 {
            return None;
        }
        // The limit bit: required where the kept detail decides it; allowed on `4.7.other`,
        // whose exact detail decided it.
        let required = is_limit(class, subject, detail);
        let allowed = required || (class == 4 && subject == 7 && detail == OTHER_DETAIL);
        if s.is_limit() == required || (s.is_limit() && allowed) { Some(s) } else { None }
    }

    /// The label value: `"4.7.1"`, `"4.7.other"` for a detail of 99 or more, `"none"`.
    pub fn label(self) -> StatusLabel {
        let mut l = StatusLabel { bytes: [0; 9], len: 0 };
        if !self.is_some() {
            l.push(b"none");
            return l;
        }
        l.push(&[b'0' + self.class(), b'.', b'0' + self.subject(), b'.']);
        match self.detail() {
            None => l.push(b"other"),
            Some(d) if d >= 10 => l.push(&[b'0' + d / 10, b'0' + d % 10]),
            Some(d) => l.push(&[b'0' + d]),
        }
        l
    }
}

/// [`ReplyStatus::label`]'s text, with no allocation (this crate is `no_std`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusLabel {
    bytes: [u8; 9],
    len: u8,
}

impl StatusLabel {
    fn push(&mut self, b: &[u8]) {
        let at = self.len as usize;
        self.bytes[at..at + b.len()].copy_from_slice(b);
        self.len += b.len() as u8;
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII digits, dots and letters are pushed.
        core::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or("none")
    }
}

impl core::fmt::Display for StatusLabel {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether an enhanced status marks a rate or policy limit: on a 4xx reply (class 4), `X.4.5`
/// (mail system congestion), `X.5.3` (too many recipients), `X.7.28` (mail flood), `X.2.1`
/// (Gmail's "receiving mail at a rate that prevents additional messages"), and `X.7.500` to
/// `X.7.699` (Microsoft's rate limiting and "server busy" codes).
#[inline(always)]
const fn is_limit(class: u8, subject: u16, detail: u16) -> bool {
    class == 4 && matches!((subject, detail), (4, 5) | (5, 3) | (7, 28) | (2, 1) | (7, 500..=699))
}

/// Whether a reply says "slow down": a 421 in any phase (the server closes the session), or a
/// 4xx whose enhanced status is a rate or policy limit (see [`ReplyStatus::is_limit`]). Not:
/// `450`/`451 4.3.0` and `452 4.2.2` (transient mailbox or system trouble), greylisting
/// (`4.2.0`, `4.7.0`, `4.7.1`), nor any other 4xx. `class`, `subject`, `detail` are the
/// reply's `X.Y.Z` (0, 0, 0 for none); a class other than the code's first digit is ignored.
pub const fn is_throttling(code: u16, class: u8, subject: u16, detail: u16) -> bool {
    code == 421 || (code / 100 == 4 && is_limit(class, subject, detail))
}

crate::labelled_enum! {
    /// How a 4xx or 5xx reply is exported (`class` label).
    pub enum ReplyClass: u8 {
        /// The remote asks us to slow down ([`is_throttling`]).
        Throttling = 0 => "throttling",
        /// Any other 4xx: try again later.
        Transient = 1 => "transient",
        /// 5xx: do not try again.
        Permanent = 2 => "permanent",
    }
}

impl ReplyClass {
    /// The class of a reply with this code and status; `None` below 400.
    pub const fn of(code: u16, status: ReplyStatus) -> Option<Self> {
        match code / 100 {
            4 if code == 421 || status.is_limit() => Some(Self::Throttling),
            4 => Some(Self::Transient),
            5 => Some(Self::Permanent),
            _ => None,
        }
    }
}

crate::labelled_enum! {
    /// Where a session got with STARTTLS (`stage` label). The kernel counts `requested` (the
    /// client sent STARTTLS), `accepted` (the server answered 220: from then on the session is
    /// encrypted and its replies are not read), `refused` (any other answer), and how the TLS
    /// handshake ended, after STARTTLS or on an implicit-TLS port: `completed`, `failed`.
    /// Userspace counts `offered` from the EHLO replies' payload events.
    pub enum StarttlsStage: u8 {
        /// The server listed STARTTLS in its EHLO reply.
        Offered = 0 => "offered",
        Requested = 1 => "requested",
        Accepted = 2 => "accepted",
        Refused = 3 => "refused",
        /// The TLS handshake completed: the client's first TLS application-data record (in
        /// TLS 1.3 its Finished, in 1.2 its first application data).
        Completed = 4 => "completed",
        /// The TLS handshake failed: a RST or FIN after TLS started, before `completed`.
        Failed = 5 => "failed",
    }
}

/// The stages the kernel counts, created up front for every scope.
pub const KERNEL_STARTTLS_STAGES: [StarttlsStage; 5] = [
    StarttlsStage::Requested,
    StarttlsStage::Accepted,
    StarttlsStage::Refused,
    StarttlsStage::Completed,
    StarttlsStage::Failed,
];

/// A reply line's start: its code and enhanced status. Code 0: no reply line
/// ([`Reply::NONE`]). A plain struct rather than an `Option`: the kernel stores it whole, and
/// an `Option`'s payload is undefined when empty, which LLVM may then compute with from an
/// unset register (the verifier refuses that).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Reply {
    pub code: u16,
    pub status: ReplyStatus,
}

impl Reply {
    /// No reply line.
    pub const NONE: Self = Self { code: 0, status: ReplyStatus::NONE };

    /// Whether this is a reply line.
    pub const fn is_some(self) -> bool {
        self.code != 0
    }

    /// [`is_throttling`] for this reply.
    pub const fn is_throttling(self) -> bool {
        self.code == 421 || (self.code / 100 == 4 && self.status.is_limit())
    }
}

/// The code of an SMTP reply line (`NNN ` or `NNN-`, 2xx to 5xx) at the start of `head`.
#[inline(always)]
pub fn reply_code(head: &[u8; HEAD_LEN], len: u8) -> Option<u16> {
    let code = code_or_zero(head, len);
    if code != 0 { Some(code) } else { None }
}

/// [`reply_code`], 0 for none: defined on every path.
#[inline(always)]
fn code_or_zero(head: &[u8; HEAD_LEN], len: u8) -> u16 {
    if len < 4 {
        return 0;
    }
    let [a, b, c, sep, ..] = *head;
    if !(b'2'..=b'5').contains(&a) || !b.is_ascii_digit() || !c.is_ascii_digit() {
        return 0;
    }
    if sep != b' ' && sep != b'-' {
        return 0;
    }
    u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0')
}

/// The reply line at the start of `head` (of which `len` bytes were read): its code, and the
/// enhanced status code right after it, if any; [`Reply::NONE`] when `head` starts no reply.
#[inline(always)]
pub fn read_reply(head: &[u8; HEAD_LEN], len: u8) -> Reply {
    let code = code_or_zero(head, len);
    if code == 0 {
        return Reply::NONE;
    }
    Reply { code, status: parse_status((code / 100) as u8, head, len) }
}

/// [`read_reply`] as an `Option`.
pub fn parse_reply(head: &[u8; HEAD_LEN], len: u8) -> Option<Reply> {
    let r = read_reply(head, len);
    if r.is_some() { Some(r) } else { None }
}

/// The enhanced status code `X.Y.Z` after the 4 bytes of the reply code and separator: `X` must
/// be `class` (the code's first digit), `Y` and `Z` one to three digits, and the code must be
/// followed by a space, CR or LF, or end the bytes read when the payload ended there.
///
/// The head is read as two words shifted along a byte at a time, so no byte is read at a
/// variable offset (which the verifier of older kernels refuses on the stack).
#[inline(always)]
fn parse_status(class: u8, head: &[u8; HEAD_LEN], len: u8) -> ReplyStatus {
    let [h0, h1, h2, h3, h4, h5, h6, h7, h8, h9, h10, h11, h12, h13, h14, h15] = *head;
    let lo = u64::from_le_bytes([h0, h1, h2, h3, h4, h5, h6, h7]);
    let hi = u64::from_le_bytes([h8, h9, h10, h11, h12, h13, h14, h15]);
    // Past "NNN ".
    let (mut lo, mut hi) = ((lo >> 32) | (hi << 32), hi >> 32);
    let avail = len.saturating_sub(4);
    // 0: the class digit, 1: the subject, 2: the detail.
    let mut field = 0u8;
    let mut digits = 0u8;
    let mut value = 0u16;
    let mut subject = 0u16;
    let mut i = 0u8;
    while i < (HEAD_LEN - 4) as u8 {
        if i >= avail {
            break;
        }
        let ch = lo as u8;
        (lo, hi) = ((lo >> 8) | (hi << 56), hi >> 8);
        i += 1;
        if ch.is_ascii_digit() {
            let most = if field == 0 { 1 } else { 3 };
            if digits == most {
                return ReplyStatus::NONE;
            }
            value = value * 10 + u16::from(ch - b'0');
            digits += 1;
        } else if ch == b'.' && field < 2 && digits > 0 {
            if field == 0 && value != u16::from(class) {
                return ReplyStatus::NONE;
            }
            if field == 1 {
                subject = value;
            }
            field += 1;
            value = 0;
            digits = 0;
        } else if field == 2 && digits > 0 && matches!(ch, b' ' | b'\r' | b'\n') {
            return ReplyStatus::new(class, subject, value);
        } else {
            return ReplyStatus::NONE;
        }
    }
    // The bytes read ended inside the code: complete only if the payload itself ended there
    // (fewer bytes than the head holds) after a digit of the detail.
    if field == 2 && digits > 0 && i == avail && usize::from(len) < HEAD_LEN {
        ReplyStatus::new(class, subject, value)
    } else {
        ReplyStatus::NONE
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{format, string::ToString, vec::Vec};

    use super::*;

    /// What the kernel reads of `text`: at most [`HEAD_LEN`] bytes.
    fn head(text: &[u8]) -> ([u8; HEAD_LEN], u8) {
        let mut h = [0u8; HEAD_LEN];
        let n = text.len().min(HEAD_LEN);
        h[..n].copy_from_slice(&text[..n]);
        (h, n as u8)
    }

    fn reply(text: &str) -> Option<Reply> {
        let (h, n) = head(text.as_bytes());
        parse_reply(&h, n)
    }

    fn status(text: &str) -> std::string::String {
        reply(text).expect("a reply").status.label().to_string()
    }

    #[test]
    fn enhanced_codes_are_read() {
        assert_eq!(status("421 4.3.2 Service shutting down\r\n"), "4.3.2");
        assert_eq!(status("451-4.7.1 greylisted\r\n"), "4.7.1");
        assert_eq!(status("250 2.1.5 Ok\r\n"), "2.1.5");
        assert_eq!(status("550 5.7.28 flood\r\n"), "5.7.28");
        assert_eq!(status("450 4.7.650 The mail server is busy\r\n"), "4.7.other");
        assert_eq!(status("452 4.5.3\r\n"), "4.5.3");
        assert_eq!(status("451 4.7.1"), "4.7.1", "the payload ended after the code");
        assert_eq!(status("554 5.123.456 x"), "none", "a subject above 9");
        assert_eq!(status("421 mx busy\r\n"), "none");
        assert_eq!(status("421 4.3.2"), "4.3.2");
        assert_eq!(reply("421\r\n"), None, "no separator: not a reply line");
        assert_eq!(status("550 4.7.1 x\r\n"), "none", "the class must be the code's digit");
        assert_eq!(status("451 4.7.1x\r\n"), "none");
        assert_eq!(status("451 4.7.\r\n"), "none");
        assert_eq!(status("451 4..1 \r\n"), "none");
        assert_eq!(status("451 44.7.1 \r\n"), "none");
        assert_eq!(status("451 4.7.1000 \r\n"), "none");
        assert_eq!(status("451 4.7777.1 \r\n"), "none");
        assert_eq!(status("451 .4.7.1\r\n"), "none");
        assert_eq!(status("220 mx.example ESMTP\r\n"), "none");
        // Cut by the head: the code's end is not known.
        let (h, _) = head(b"451 4.7.1 greylisted");
        assert_eq!(parse_reply(&h, 9).unwrap().status, ReplyStatus::new(4, 7, 1));
        let (h, _) = head(b"451 4.123.456789");
        assert_eq!(parse_reply(&h, 16).unwrap().status, ReplyStatus::NONE);
    }

    #[test]
    fn throttling_is_a_rate_or_policy_limit() {
        let not = [
            "450 4.2.0 greylisted\r\n",
            "451 4.7.1 greylisted, try again\r\n",
            "450 4.7.1 Recipient address rejected: greylisted\r\n",
            "450 4.3.0 temporary\r\n",
            "451 4.3.0 Internal error\r\n",
            "452 4.2.2 Mailbox full\r\n",
            "451 4.7.0 Try again later\r\n",
            "450 mailbox unavailable\r\n",
            "452 4.5.3x\r\n",
            "550 5.7.1 rejected\r\n",
            "554 5.4.5 no\r\n",
            "250 2.0.0 ok\r\n",
        ];
        for r in not {
            assert!(!reply(r).unwrap().is_throttling(), "{r:?}");
        }
        let are = [
            "421 mx.example closing\r\n",
            "421 4.7.0 Try again later, closing connection\r\n",
            "421-4.3.2 System not accepting network messages\r\n",
            "451 4.7.500 Server busy. Please try again later\r\n",
            "450 4.7.650 The mail server [1.2.3.4] is temporarily rate limited\r\n",
            "452 4.5.3 Too many recipients\r\n",
            "451 4.4.5 Insufficient system storage\r\n",
            "421 4.7.28 flood\r\n",
            "450 4.7.28 flood\r\n",
            "450-4.2.1 The user you are trying to contact is receiving mail at a rate\r\n",
            "451 4.7.699 x\r\n",
        ];
        for r in are {
            assert!(reply(r).unwrap().is_throttling(), "{r:?}");
        }
        assert!(!reply("451 4.7.499 x\r\n").unwrap().is_throttling());
        assert!(!reply("451 4.7.700 x\r\n").unwrap().is_throttling());
        // The free function agrees with the parsed replies.
        assert!(is_throttling(421, 0, 0, 0));
        assert!(is_throttling(451, 4, 7, 650));
        assert!(!is_throttling(451, 4, 7, 1));
        assert!(!is_throttling(551, 4, 4, 5), "a 5xx is never throttling but 421");
    }

    #[test]
    fn classes() {
        let class = |r: &str| {
            let r = reply(r).unwrap();
            ReplyClass::of(r.code, r.status).map(ReplyClass::label)
        };
        assert_eq!(class("421 bye\r\n"), Some("throttling"));
        assert_eq!(class("450 4.7.650 x\r\n"), Some("throttling"));
        assert_eq!(class("450 4.7.150 x\r\n"), Some("transient"));
        assert_eq!(class("451 4.7.1 x\r\n"), Some("transient"));
        assert_eq!(class("554 5.7.1 x\r\n"), Some("permanent"));
        assert_eq!(class("250 ok\r\n"), None);
    }

    #[test]
    fn statuses_pack_and_unpack() {
        let s = ReplyStatus::new(4, 7, 650);
        assert_eq!((s.class(), s.subject(), s.detail(), s.is_limit()), (4, 7, None, true));
        assert_eq!(s.label().as_str(), "4.7.other");
        let t = ReplyStatus::new(4, 7, 150);
        assert_ne!(s, t, "the same label, told apart by the limit bit");
        assert_eq!(t.label().as_str(), "4.7.other");
        assert_eq!(ReplyStatus::new(5, 1, 10).label().as_str(), "5.1.10");
        assert_eq!(ReplyStatus::new(3, 1, 1), ReplyStatus::NONE);
        assert_eq!(ReplyStatus::NONE.label().as_str(), "none");
        let mut all: Vec<ReplyStatus> = Vec::new();
        for class in [2, 4, 5] {
            for subject in 0..=9 {
                for detail in [0, 1, 5, 28, 98, 99, 100, 500, 650, 999] {
                    all.push(ReplyStatus::new(class, subject, detail));
                }
            }
        }
        for s in all.iter().copied().chain([ReplyStatus::NONE]) {
            assert_eq!(ReplyStatus::from_bits(s.to_bits()), Some(s), "{}", s.label());
        }
        for bad in [1, 999, 3000, 6000, 7999, LIMIT_BIT | 4001, LIMIT_BIT | 2405] {
            assert_eq!(ReplyStatus::from_bits(bad), None, "{bad}");
        }
        assert_eq!(format!("{}", ReplyStatus::new(2, 0, 0).label()), "2.0.0");
    }

    #[test]
    fn reply_codes() {
        for bad in [&b"199 x\r\n"[..], b"600 x\r\n", b"25 x\r\n", b"2500 x\r\n", b"22a x\r\n"] {
            let (h, n) = head(bad);
            assert_eq!(reply_code(&h, n), None, "{:?}", core::str::from_utf8(bad));
        }
        for bad in [&b"220x\r\n"[..], b"220"] {
            let (h, n) = head(bad);
            assert_eq!(reply_code(&h, n), None);
        }
        let (h, _) = head(b"421-busy");
        assert_eq!(reply_code(&h, 8), Some(421));
        assert_eq!(reply_code(&h, 4), Some(421));
    }
}
