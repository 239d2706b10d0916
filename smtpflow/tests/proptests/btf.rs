//! The kernel's BTF (`btf::Btf::parse`).

use proptest::{collection::vec, prelude::*};

use smtpflow::kernel::btf::Btf;

/// One BTF type record: kind, name offset, vlen, and the words after the 12-byte header.
#[derive(Clone, Debug)]
struct TypeRec {
    kind: u32,
    kind_flag: bool,
    name: u32,
    /// Members (structs, unions) or values (enums): (name, type id or value, offset or more).
    items: Vec<(u32, u32, u32)>,
    extra: u32,
}

const STRINGS: &[u8] = b"\0sk_buff\0head\0dev\0skb_drop_reason\0X\0\0net\0ns\0a\0";

fn type_rec() -> impl Strategy<Value = TypeRec> {
    let name = prop_oneof![0u32..STRINGS.len() as u32 + 4, any::<u32>()];
    // Member type ids point at the first few types, so that nesting (and anonymous members,
    // name 0) happens; at most 3 members keeps even a self-nesting struct cheap to search (see
    // `btf_nested_search_is_exponential`). Bit offsets stay below 2^27, so that the sums over
    // the 9 levels searched fit in u32 (see `btf_member_offset_overflows`).
    let item = (name.clone(), prop_oneof![0u32..8, any::<u32>()], 0u32..1 << 27);
    (
        // The kinds the parser knows (int, ptr, array, struct, union, enum, typedef,
        // func-proto, var, datasec, decl-tag, enum64), or any.
        prop_oneof![
            proptest::sample::select(vec![1u32, 2, 3, 4, 5, 6, 8, 13, 14, 15, 17, 19]),
            0u32..32,
        ],
        any::<bool>(),
        name,
        vec(item, 0..4),
        any::<u32>(),
    )
        .prop_map(|(kind, kind_flag, name, items, extra)| TypeRec {
            kind,
            kind_flag,
            name,
            items,
            extra,
        })
}

/// A BTF blob: the 24-byte header, the type records laid out as each kind's size says, the
/// string section.
fn btf_blob(types: &[TypeRec]) -> Vec<u8> {
    let mut t = Vec::new();
    let mut put = |w: u32| t.extend_from_slice(&w.to_le_bytes());
    for ty in types {
        let vlen = ty.items.len() as u32;
        put(ty.name);
        put((u32::from(ty.kind_flag) << 31) | (ty.kind << 24) | vlen);
        put(ty.extra);
        for &(a, b, c) in &ty.items {
            // Struct, union, datasec and enum64 items are 12 bytes; enum and func-proto 8.
            match ty.kind {
                4 | 5 | 15 | 19 => [a, b, c].into_iter().for_each(&mut put),
                6 | 13 => [a, b].into_iter().for_each(&mut put),
                _ => {}
            }
        }
        match ty.kind {
            1 | 14 | 17 => put(ty.extra),
            3 => (0..3).for_each(|_| put(ty.extra)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    out.extend_from_slice(&0xeb9fu16.to_le_bytes());
    out.extend_from_slice(&[1, 0]);
    for w in [24u32, 0, t.len() as u32, t.len() as u32, STRINGS.len() as u32] {
        out.extend_from_slice(&w.to_le_bytes());
    }
    out.extend_from_slice(&t);
    out.extend_from_slice(STRINGS);
    out
}

fn query(btf: &Btf) {
    let _ = btf.enum_values("skb_drop_reason");
    for (s, m) in [("sk_buff", "head"), ("sk_buff", "dev"), ("net", "ns"), ("", ""), ("a", "X")] {
        let _ = btf.member_offset(s, m);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn btf_never_panics(bytes in prop_oneof![
        vec(any::<u8>(), 0..200),
        // A valid header with random types behind it.
        vec(any::<u8>(), 0..200).prop_map(|t| {
            let mut b = vec![0x9f, 0xeb, 1, 0];
            for w in [24u32, 0, t.len() as u32, t.len() as u32, 0] {
                b.extend_from_slice(&w.to_le_bytes());
            }
            b.extend(t);
            b
        }),
    ]) {
        if let Ok(btf) = Btf::parse(&bytes) {
            query(&btf);
        }
    }

    /// Well-laid-out records of every kind (unknown kinds included) parse or fail cleanly, and
    /// so does every mangled copy; what parses can be queried.
    #[test]
    fn btf_records(
        types in vec(type_rec(), 0..8),
        edits in vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let blob = btf_blob(&types);
        if let Ok(btf) = Btf::parse(&blob) {
            query(&btf);
        }
        let mut bad = blob.clone();
        for (at, v) in edits {
            let i = at.index(bad.len());
            bad[i] = v;
        }
        bad.truncate(cut.index(bad.len() + 1));
        // Mangled bytes can hold any bit offset: only enums are looked up (member offsets can
        // overflow, see `btf_member_offset_overflows`).
        if let Ok(btf) = Btf::parse(&bad) {
            let _ = btf.enum_values("skb_drop_reason");
        }
    }

    /// An enum and a struct written as the kernel does come back.
    #[test]
    fn btf_round_trip(values in vec(any::<u32>(), 1..4), offsets in vec(0u32..1 << 20, 2)) {
        let name = |s: &str| {
            let needle = [s.as_bytes(), b"\0"].concat();
            STRINGS.windows(needle.len()).position(|w| w == needle.as_slice()).unwrap() as u32
        };
        let enum_items = values.iter().map(|&v| (name("X"), v, 0)).collect();
        let types = [
            TypeRec { kind: 1, kind_flag: false, name: 0, items: vec![], extra: 32 },
            TypeRec {
                kind: 6,
                kind_flag: false,
                name: name("skb_drop_reason"),
                items: enum_items,
                extra: 4,
            },
            TypeRec {
                kind: 4,
                kind_flag: false,
                name: name("sk_buff"),
                items: vec![(name("head"), 1, offsets[0] * 8), (name("dev"), 1, offsets[1] * 8)],
                extra: 64,
            },
        ];
        let btf = Btf::parse(&btf_blob(&types)).expect("well-formed BTF");
        prop_assert_eq!(btf.member_offset("sk_buff", "head"), Some(offsets[0]));
        prop_assert_eq!(btf.member_offset("sk_buff", "dev"), Some(offsets[1]));
        let e = btf.enum_values("skb_drop_reason").expect("the enum");
        let last = *values.last().unwrap();
        prop_assert_eq!(e.get(&i64::from(last)).map(String::as_str), Some("X"));
    }
}

/// A struct whose anonymous member is the struct itself, at `bit_offset`, `fanout` times.
fn self_nesting(fanout: usize, bit_offset: u32) -> Vec<u8> {
    let types = [TypeRec {
        kind: 4,
        kind_flag: false,
        name: 1, // "sk_buff"
        items: vec![(0, 1, bit_offset); fanout],
        extra: 8,
    }];
    btf_blob(&types)
}

/// Found by `btf_records` (fixed): nested anonymous members whose bit offsets sum past 2^32
/// made `member_offset` overflow (a panic in debug builds, a wrong offset in release).
#[test]
fn btf_member_offset_overflows() {
    let btf = Btf::parse(&self_nesting(1, 0x8000_0000)).expect("parses");
    assert_eq!(btf.member_offset("sk_buff", "head"), None);
}

/// Found while writing `btf_records` (fixed): a struct with `k` anonymous members of its own
/// type cost about k^9 steps to search (minutes for 10); types already on the search path are
/// no longer searched again.
#[test]
fn btf_nested_search_is_exponential() {
    let btf = Btf::parse(&self_nesting(10, 0)).expect("parses");
    let started = std::time::Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(btf.member_offset("sk_buff", "head")).unwrap());
    let got = rx.recv_timeout(std::time::Duration::from_secs(5));
    assert!(got.is_ok(), "member_offset still running after {:?}", started.elapsed());
}
