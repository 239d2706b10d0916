//! The flow table's layout and hashing, shared by the kernel, which claims and writes its ways,
//! and userspace, which reads it in place (the sweep) and finds flows in it (the tests).
//!
//! The table is an array of sets ([`FlowTags`] and [`FlowSet`]), in two halves. A flow has a candidate set in each
//! half, picked by a seeded hash of its key ([`flow_hash`], [`candidate_sets`]), and lives in
//! one of their [`FLOW_WAYS`] ways. A way's tag says whether it holds a flow: 0 free, [`BUSY`] while a
//! program writes a new flow into it, else the flow's [`tag`] (odd). A lookup reads the two
//! sets' tags and compares a key only where the tag matches; it takes no lock, and the sweep
//! reads the table as it is ([`read_way`]).
//!
//! A new flow takes a free way of the candidate set with more free ways, the left one on a tie
//! (d-left hashing), so that while the flows fit in `--max-flows` they fit in the table:
//! [`sets_for`] gives it twice the ways, and then the fullest set of a full default table
//! holds 6 or 7 of its 8 flows (the test `max_flows_fit_with_two_choices` fills it; with 4
//! ways a set, or one choice, sets overflow). Past that, a flow
//! takes the way of the two sets that was written longest ago, and the kernel counts the flow
//! it overwrote ([`crate::Stat::FlowEvictions`]), unless that one had been idle for
//! [`crate::flow::IDLE_NS`] (then it was no longer followed anyway, and the sweep did not show
//! it).
use crate::{FlowKey, FlowState};

/// Ways a set has.
pub const FLOW_WAYS: usize = 8;

/// A way's tag while a program writes a new flow into it: even, so no flow's [`tag`].
pub const BUSY: u64 = 2;

/// One set's tags, in a map of their own (`FLOW_TAGS`), a cache line each: what a lookup reads
/// first, and all the sweep reads of a set with no flow (the sweep reads the tags of every set,
/// 64 bytes of memory a set mapped into smtpflow, not the whole table's).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowTags {
    /// 0: free; [`BUSY`]: being written; else the [`tag`] of the way's flow.
    pub tags: [u64; FLOW_WAYS],
}

/// One set's flows (`FLOWS`): its ways' keys and states, a whole number of cache lines.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowSet {
    pub keys: [FlowKey; FLOW_WAYS],
    pub states: [FlowState; FLOW_WAYS],
    pub _pad: [u64; 4],
}

const _: () = assert!(size_of::<FlowTags>() == 64 && size_of::<FlowSet>() == 10 * 64);

/// Kernel memory a set takes, tags and flows.
pub const SET_BYTES: usize = size_of::<FlowTags>() + size_of::<FlowSet>();

/// The multiplier of the hash's rounds: 2^64 / φ, odd.
const ROUND: u64 = 0x9e37_79b9_7f4a_7c15;
/// The finisher's multiplier (splitmix64's).
const FINISH: u64 = 0xbf58_476d_1ce4_e5b9;

/// The key's 44 bytes as the eleven 32-bit words the hash takes.
#[inline(always)]
fn words(key: &FlowKey) -> &[u32; 11] {
    // SAFETY: `FlowKey` is `#[repr(C)]`, 44 bytes with no padding (asserted in flow.rs) and
    // 4-byte aligned (its first field is a u32), so it reads as eleven u32 words.
    unsafe { &*(key as *const FlowKey).cast::<[u32; 11]>() }
}

/// Whether two keys are the same, word by word with no branch (no `memcmp`, which a BPF
/// program cannot call).
#[inline(always)]
pub fn same_key(a: &FlowKey, b: &FlowKey) -> bool {
    let (a, b) = (words(a), words(b));
    let mut differ = 0;
    for i in 0..a.len() {
        differ |= a[i] ^ b[i];
    }
    differ == 0
}

/// The flow's hash under the table's `seed` (random per load: an attacker who cannot read it
/// cannot aim flows at one set). The key's words go in pairs, as 64-bit words, each through an
/// xor and a multiplication by an odd constant, a bijection, so keys differing in one word
/// never collide (six multiplications in a chain, not eleven: the chain is the hash's
/// latency); the finisher spreads the high bits into the low ones.
#[inline(always)]
pub fn flow_hash(key: &FlowKey, seed: u64) -> u64 {
    let w = words(key);
    let mut h = seed;
    for i in 0..w.len() / 2 {
        let pair = u64::from(w[2 * i]) | (u64::from(w[2 * i + 1]) << 32);
        h = (h ^ pair).wrapping_mul(ROUND);
    }
    h = (h ^ u64::from(w[w.len() - 1])).wrapping_mul(ROUND);
    h ^= h >> 31;
    h = h.wrapping_mul(FINISH);
    h ^ (h >> 29)
}

/// The tag a flow with hash `h` has in its way: odd, so never free (0) nor [`BUSY`].
#[inline(always)]
pub const fn tag(h: u64) -> u64 {
    h | 1
}

/// The flow's two candidate sets among `sets` (even): one in each half, each half of the hash
/// scaled to the half's size (a multiplication and a shift; no power of two needed).
#[inline(always)]
pub const fn candidate_sets(h: u64, sets: u32) -> [u32; 2] {
    let half = (sets / 2) as u64;
    [(((h & 0xffff_ffff) * half) >> 32) as u32, (half + (((h >> 32) * half) >> 32)) as u32]
}

/// The sets a table for `max_flows` flows has: twice the ways, an even number, at least two.
pub const fn sets_for(max_flows: u32) -> u32 {
    let sets = (max_flows as u64 * 2).div_ceil(FLOW_WAYS as u64).div_ceil(2) * 2;
    if sets < 2 {
        2
    } else if sets > (u32::MAX - 1) as u64 {
        u32::MAX - 1
    } else {
        sets as u32
    }
}

/// Whether a tag is a flow's (not free, not being written).
#[inline(always)]
pub const fn holds_flow(tag: u64) -> bool {
    tag & 1 != 0
}

/// Reads way `way` of a set as it is in memory another CPU may be writing (`tags`, its tags,
/// and `set`, its flows): the flow it holds (key and state), or `None` when it holds none or
/// changed while read. The tag is read before and after the key and state; a way the kernel
/// gave to another flow meanwhile went through [`BUSY`], so its tag differs. Each read is
/// volatile: the table is shared memory.
///
/// # Safety
/// `tags` and `set` must point to a readable [`FlowTags`] and [`FlowSet`] (in the table's
/// mappings), and `way` be below [`FLOW_WAYS`].
#[cfg(feature = "user")]
pub unsafe fn read_way(
    tags: *const FlowTags,
    set: *const FlowSet,
    way: usize,
) -> Option<(FlowKey, FlowState)> {
    use core::ptr::{addr_of, read_volatile};
    use core::sync::atomic::{Ordering, fence};
    // SAFETY: per the contract.
    unsafe {
        let tag_at = addr_of!((*tags).tags[way]);
        let before = read_volatile(tag_at);
        if !holds_flow(before) {
            return None;
        }
        fence(Ordering::Acquire);
        let key = read_volatile(addr_of!((*set).keys[way]));
        let st = read_volatile(addr_of!((*set).states[way]));
        fence(Ordering::Acquire);
        (read_volatile(tag_at) == before).then_some((key, st))
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{collections::BTreeSet, vec, vec::Vec};

    use super::*;

    fn key(i: u32) -> FlowKey {
        let mut client = [0; 16];
        client[..4].copy_from_slice(&(0x0a80_0000 + i).to_be_bytes());
        FlowKey {
            ifindex: 2,
            client,
            server: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            client_port: (40_000 + i % 20_000) as u16,
            server_port: 25,
            family: 4,
            direction: 0,
            _pad: [0; 2],
        }
    }

    /// The default `--max-flows` (262,144) flows from spoofed sources, inserted as the kernel
    /// does (into the candidate set with more free ways, the left one on a tie), all find a
    /// way, under several seeds, with a way of the fullest set to spare: while the flows fit
    /// in `--max-flows`, none is overwritten.
    #[test]
    fn max_flows_fit_with_two_choices() {
        let max = crate::DEFAULT_MAX_FLOWS;
        let sets = sets_for(max);
        for seed in [1, 0x5eed, 0xdead_beef_cafe_f00d, 7, 8, 9, 10, 11] {
            let mut used = vec![0u8; sets as usize];
            let mut fullest = 0;
            for i in 0..max {
                let [a, b] = candidate_sets(flow_hash(&key(i), seed), sets);
                let at = if used[b as usize] < used[a as usize] { b } else { a };
                used[at as usize] += 1;
                fullest = fullest.max(used[at as usize]);
            }
            assert!((fullest as usize) < FLOW_WAYS, "seed {seed:#x}: a set took {fullest}");
        }
    }

    /// With one choice the same flows would overflow sets: the second choice is what keeps
    /// them exact.
    #[test]
    fn one_choice_would_overflow() {
        let max = crate::DEFAULT_MAX_FLOWS;
        let sets = sets_for(max);
        let mut used = vec![0u32; sets as usize];
        for i in 0..max {
            used[candidate_sets(flow_hash(&key(i), 1), sets)[0] as usize] += 1;
        }
        assert!(used.iter().any(|&n| n as usize > FLOW_WAYS));
    }

    /// Every byte of a key moves its hash, and the sets spread: no two keys of a run share a
    /// hash, and the first choice uses nearly every set.
    #[test]
    fn hash_spreads_keys() {
        let base = key(7);
        let h = flow_hash(&base, 3);
        for byte in 0..size_of::<FlowKey>() {
            let mut k = base;
            // SAFETY: a FlowKey is plain bytes.
            let bytes = unsafe {
                core::slice::from_raw_parts_mut((&raw mut k).cast::<u8>(), size_of::<FlowKey>())
            };
            bytes[byte] ^= 0x40;
            assert_ne!(flow_hash(&k, 3), h, "byte {byte}");
        }
        let hashes: BTreeSet<u64> = (0..100_000).map(|i| flow_hash(&key(i), 3)).collect();
        assert_eq!(hashes.len(), 100_000);
        let sets: Vec<u32> =
            (0..100_000).map(|i| candidate_sets(flow_hash(&key(i), 3), 2048)[1]).collect();
        assert!(sets.iter().collect::<BTreeSet<_>>().len() == 1024);
        assert_ne!(flow_hash(&base, 3), flow_hash(&base, 4), "the seed moves the hash");
    }

    #[test]
    fn same_key_is_equality() {
        assert!(same_key(&key(1), &key(1)));
        assert!(!same_key(&key(1), &key(2)));
        let mut k = key(1);
        k.direction = 1;
        assert!(!same_key(&key(1), &k));
    }

    #[test]
    fn tags_are_flows_and_sizes_round_up() {
        for h in [0, 1, 2, BUSY, u64::MAX] {
            assert!(holds_flow(tag(h)) && tag(h) != BUSY && tag(h) != 0);
        }
        assert!(!holds_flow(0) && !holds_flow(BUSY));
        assert_eq!(sets_for(0), 2);
        assert_eq!(sets_for(1), 2);
        assert_eq!(sets_for(8), 2);
        assert_eq!(sets_for(24), 6);
        assert_eq!(sets_for(262_144), 65_536);
        assert_eq!(sets_for(u32::MAX), 1 << 30);
        assert_eq!(candidate_sets(u64::MAX, 6), [2, 5]);
        assert_eq!(candidate_sets(0, 6), [0, 3]);
    }
}
