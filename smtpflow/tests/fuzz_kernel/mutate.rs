//! Mutations of the corpus: header fields rewritten, shapes changed, bytes scribbled; and the
//! truncation sweep.

use smtpflow_common::rules::tcp_flags::{ACK, FIN, PSH, RST, SYN};
use smtpflow_tests::frames::{
    ETH_P_8021AD, ETH_P_8021Q, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP, IPPROTO_UDP,
    NEXTHDR_DEST, NEXTHDR_FRAGMENT, NEXTHDR_HOP, NEXTHDR_NONE, NEXTHDR_ROUTING,
};

use super::{
    MAX_FRAME, MIN_FRAME,
    corpus::{L3, Rng, Shaped},
};

/// Byte values that mean something in some header field.
pub(crate) const INTERESTING: &[u8] = &[
    0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x08, 0x0f, 0x10, 0x11, 0x12, 0x14, 0x19, 0x2b, 0x2c, 0x3b,
    0x3c, 0x40, 0x44, 0x45, 0x46, 0x4f, 0x50, 0x5f, 0x60, 0x65, 0x7f, 0x80, 0x81, 0x86, 0x88, 0xa8,
    0xdd, 0xf0, 0xfe, 0xff,
];

pub(crate) const NEXT_HEADERS: &[u8] = &[
    IPPROTO_TCP,
    IPPROTO_UDP,
    NEXTHDR_HOP,
    NEXTHDR_ROUTING,
    NEXTHDR_FRAGMENT,
    NEXTHDR_DEST,
    NEXTHDR_NONE,
    58,
    255,
];

pub(crate) const ETHERTYPES: &[u16] =
    &[ETH_P_IP, ETH_P_IPV6, ETH_P_8021Q, ETH_P_8021AD, ETH_P_ARP, 0x9100, 0x05dc, 0x0000, 0xffff];

/// Rewrites one header field to a value a parser may trip on.
pub(crate) fn rewrite_field(s: &mut Shaped, r: &mut Rng) {
    let l3 = s.l3;
    let l4 = s.l4;
    match r.below(10) {
        // Ethertype (or the innermost encapsulated one).
        0 => {
            let at = l3.map_or(12, |l3| l3.saturating_sub(2));
            s.set16(at, r.pick(ETHERTYPES));
        }
        // The IP version / IHL byte.
        1 => {
            if let Some(l3) = l3 {
                let v = if r.percent(50) {
                    (s.get(l3) & 0xf0) | r.below(16) as u8
                } else {
                    (r.pick(&[4u8, 6, 0, 5, 15]) << 4) | (s.get(l3) & 0x0f)
                };
                s.set(l3, v);
            }
        }
        // Lengths: IPv4 total length, IPv6 payload length.
        2 => {
            if let Some(l3) = l3 {
                let at = if s.l3_kind == L3::V6 { l3 + 4 } else { l3 + 2 };
                let v = r.pick16(&[0u16, 1, 19, 20, 39, 40, 41, 0xffff]);
                s.set16(at, v);
            }
        }
        // IPv4 fragment field / protocol, or IPv6 next header.
        3 => {
            if let Some(l3) = l3 {
                match s.l3_kind {
                    L3::V6 => s.set(l3 + 6, r.pick(NEXT_HEADERS)),
                    _ if r.percent(50) => {
                        let v = r.pick16(&[0u16, 0x2000, 0x4000, 0x0001, 0x1fff, 0x20b9]);
                        s.set16(l3 + 6, v);
                    }
                    _ => s.set(l3 + 9, r.pick(NEXT_HEADERS)),
                }
            }
        }
        // An extension header's next-header, length, or fragment offset.
        4 => {
            if !s.ext.is_empty() {
                let at = s.ext[r.below(s.ext.len())];
                match r.below(3) {
                    0 => s.set(at, r.pick(NEXT_HEADERS)),
                    1 => s.set(at + 1, r.pick8(&[0, 1, 2, 120, 121, 122, 127, 255])),
                    _ => s.set16(at + 2, r.pick16(&[0u16, 1, 8, 9, 0xfff8])),
                }
            }
        }
        // TCP data offset.
        5 => {
            if let Some(l4) = l4 {
                s.set(l4 + 12, (r.below(16) as u8) << 4 | (s.get(l4 + 12) & 0x0f));
            }
        }
        // TCP flags.
        6 => {
            if let Some(l4) = l4 {
                let f = r.pick8(&[SYN, SYN | ACK, RST, RST | ACK, ACK, FIN | ACK, PSH | ACK, 0]);
                s.set(l4 + 13, f);
            }
        }
        // TCP window.
        7 => {
            if let Some(l4) = l4 {
                s.set16(l4 + 14, r.pick16(&[0u16, 1, 0xffff]));
            }
        }
        // Ports.
        8 => {
            if let Some(l4) = l4 {
                let port = r.pick16(&[25u16, 465, 587, 0, 24, 26, 2525, 40000]);
                s.set16(l4 + 2 * r.below(2), port);
            }
        }
        // The last byte of an address: a handful of peers.
        _ => {
            if let Some(l3) = l3 {
                let at = match s.l3_kind {
                    L3::V6 => l3 + 8 + 15 + 16 * r.below(2),
                    _ => l3 + 12 + 3 + 4 * r.below(2),
                };
                s.set(at, r.below(8) as u8);
            }
        }
    }
}

/// Changes the shape of the frame: tags, options, extension headers, splices.
pub(crate) fn reshape(s: &mut Shaped, r: &mut Rng, corpus: &[Shaped]) {
    match r.below(8) {
        // Push a VLAN tag in front.
        0 => {
            let tpid = r.pick(&[ETH_P_8021Q, ETH_P_8021AD, ETH_P_8021Q, 0x9100]);
            let [a, b] = tpid.to_be_bytes();
            // TPID and TCI at 12: the old ethertype (or TPID) becomes the tag's inner type.
            s.insert(12, &[a, b, r.byte() & 0x0f, r.byte()]);
        }
        // Pop the outer tag.
        1 => {
            let ty = u16::from_be_bytes([s.get(12), s.get(13)]);
            if ty == ETH_P_8021Q || ty == ETH_P_8021AD {
                s.remove(12, 4);
            }
        }
        // IPv4 options: grow the header by whole words, IHL to match (or not).
        2 => {
            if let (L3::V4, Some(l3)) = (s.l3_kind, s.l3) {
                let words = 1 + r.below(10);
                let opts: Vec<u8> = (0..words * 4).map(|_| r.pick8(&[0, 1, 7, 0x44])).collect();
                s.insert(l3 + 20, &opts);
                let ihl = ((s.get(l3) & 0x0f) as usize + words).min(15) as u8;
                let ihl = if r.percent(80) { ihl } else { r.below(16) as u8 };
                s.set(l3, (s.get(l3) & 0xf0) | ihl);
            }
        }
        // An IPv6 extension header at the front of the chain.
        3 => {
            if let (L3::V6, Some(l3)) = (s.l3_kind, s.l3) {
                let kind = r.pick(&[NEXTHDR_HOP, NEXTHDR_DEST, NEXTHDR_ROUTING, NEXTHDR_FRAGMENT]);
                let len = if kind == NEXTHDR_FRAGMENT { 0 } else { r.pick(&[0, 0, 1, 3, 15]) };
                let mut h = vec![0u8; (len + 1) * 8];
                h[0] = s.get(l3 + 6);
                if kind == NEXTHDR_FRAGMENT {
                    let off: u16 = r.pick(&[0, 0, 1, 185]);
                    h[2..4].copy_from_slice(&(off << 3 | r.below(2) as u16).to_be_bytes());
                } else {
                    h[1] = len as u8;
                    h[2] = 1; // PadN over the rest
                    h[3] = (h.len() - 4) as u8;
                }
                s.set(l3 + 6, kind);
                s.insert(l3 + 40, &h);
                s.ext.insert(0, l3 + 40);
            }
        }
        // Duplicate a chunk of headers in place (a repeated tag, option, extension header...).
        4 => {
            let limit = s.frame.len().min(s.l4.map_or(64, |l4| l4 + 20));
            if limit > 0 {
                let at = r.below(limit);
                let n = r.pick(&[2, 4, 8, 16, 20, 40]).min(s.frame.len() - at);
                let chunk = s.frame[at..at + n].to_vec();
                s.insert(at, &chunk);
            }
        }
        // Cut a chunk out of the headers.
        5 => {
            let limit = s.frame.len().min(s.l4.map_or(64, |l4| l4 + 20));
            if limit > 0 {
                s.remove(r.below(limit), r.pick(&[1, 2, 4, 8, 20]));
            }
        }
        // Splice: this frame's head, another frame's tail.
        6 => {
            let other = &corpus[r.below(corpus.len())].frame;
            let cut = r.below(s.frame.len() + 1);
            let from = r.below(other.len() + 1);
            s.frame.truncate(cut);
            s.frame.extend_from_slice(&other[from..]);
            // Offsets past the cut now point into foreign bytes: fine, they only aim mutations.
        }
        // Random bytes inserted in the headers.
        _ => {
            let limit = s.frame.len().min(s.l4.map_or(64, |l4| l4 + 20));
            let n = 1 + r.below(8);
            let bytes: Vec<u8> = (0..n).map(|_| r.byte()).collect();
            s.insert(r.below(limit + 1), &bytes);
        }
    }
}

/// Flips, sets or overwrites single bytes, mostly in the headers.
pub(crate) fn scribble(s: &mut Shaped, r: &mut Rng) {
    if s.frame.is_empty() {
        return;
    }
    let headers = s.frame.len().min(s.l4.map_or(80, |l4| l4 + 20));
    let at = if r.percent(80) { r.below(headers) } else { r.below(s.frame.len()) };
    match r.below(3) {
        0 => s.frame[at] ^= 1 << r.below(8),
        1 => s.frame[at] = r.pick(INTERESTING),
        _ => s.frame[at] = r.byte(),
    }
}

/// Frame `index` of the run: one corpus frame, mutated by the frame's own generator.
pub(crate) fn mutant(corpus: &[Shaped], seed: u64, index: u64) -> Vec<u8> {
    let mut r = Rng::for_frame(seed, index);
    let mut s = corpus[r.below(corpus.len())].clone();
    // A few structure-aware changes, then byte noise, then perhaps a cut.
    for _ in 0..r.below(3) {
        rewrite_field(&mut s, &mut r);
    }
    if r.percent(40) {
        reshape(&mut s, &mut r, corpus);
    }
    if r.percent(15) {
        reshape(&mut s, &mut r, corpus);
    }
    for _ in 0..r.pick(&[0, 0, 1, 1, 2, 4]) {
        scribble(&mut s, &mut r);
    }
    if r.percent(30) {
        // Mostly inside the headers, where a cut changes the verdict.
        let headers = s.frame.len().min(s.l4.map_or(80, |l4| l4 + 24));
        let len = if r.percent(80) { r.below(headers + 1) } else { r.below(s.frame.len() + 1) };
        s.frame.truncate(len);
    }
    let mut f = s.frame;
    if f.len() < MIN_FRAME {
        // Keep it testable: pad the runt with random bytes up to an Ethernet header.
        while f.len() < MIN_FRAME {
            f.push(r.byte());
        }
    }
    f.truncate(MAX_FRAME);
    f
}

/// The deterministic part of every run: each corpus frame cut at every offset.
pub(crate) fn truncations(corpus: &[Shaped]) -> Vec<Vec<u8>> {
    corpus
        .iter()
        .flat_map(|s| (MIN_FRAME..=s.frame.len()).map(move |len| s.frame[..len].to_vec()))
        .collect()
}
