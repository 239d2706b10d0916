//! Just enough of the kernel's BTF (`/sys/kernel/btf/vmlinux`) for smtpflow: the names of
//! `enum skb_drop_reason` and the offsets of a few struct members (the kernel programs have no
//! CO-RE, so the loader tells them where fields are on this kernel).
use std::collections::HashMap;

use anyhow::{Context as _, bail};

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;

/// A struct or union member: name, type id, bit offset.
#[derive(Debug, Clone)]
struct Member {
    name: String,
    type_id: u32,
    bit_offset: u32,
}

#[derive(Debug, Clone)]
enum Type {
    Composite { name: String, members: Vec<Member> },
    Enum { name: String, values: Vec<(String, i64)> },
    Typedef { name: String, target: u32 },
    Other,
}

/// The parsed types, by id (id 0 is `void`).
pub struct Btf {
    types: Vec<Type>,
}

fn u16_at(b: &[u8], off: usize) -> anyhow::Result<u16> {
    let s = b.get(off..off + 2).context("BTF truncated")?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], off: usize) -> anyhow::Result<u32> {
    let s = b.get(off..off + 4).context("BTF truncated")?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn string_at(strings: &[u8], off: u32) -> String {
    let tail = strings.get(off as usize..).unwrap_or_default();
    let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
    String::from_utf8_lossy(&tail[..end]).into_owned()
}

impl Btf {
    pub fn from_sys_fs() -> anyhow::Result<Self> {
        let data = std::fs::read("/sys/kernel/btf/vmlinux").context(
            "reading /sys/kernel/btf/vmlinux (a kernel built with CONFIG_DEBUG_INFO_BTF)",
        )?;
        Self::parse(&data)
    }

    /// Parses little-endian BTF; errors (never panics) on truncated or unknown data.
    pub fn parse(data: &[u8]) -> anyhow::Result<Self> {
        if u16_at(data, 0)? != MAGIC {
            bail!("not little-endian BTF (bad magic)");
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let types_bytes = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .context("BTF type section out of bounds")?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .context("BTF strings out of bounds")?;

        let mut types = vec![Type::Other];
        let mut off = 0;
        while off < types_bytes.len() {
            let name = string_at(strings, u32_at(types_bytes, off)?);
            let info = u32_at(types_bytes, off + 4)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            off += 12;
            let ty = match kind {
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let m = off + i * 12;
                        let raw = u32_at(types_bytes, m + 8)?;
                        members.push(Member {
                            name: string_at(strings, u32_at(types_bytes, m)?),
                            type_id: u32_at(types_bytes, m + 4)?,
                            // With kind_flag the top 8 bits are a bitfield size.
                            bit_offset: if kind_flag { raw & 0x00ff_ffff } else { raw },
                        });
                    }
                    off += vlen * 12;
                    Type::Composite { name, members }
                }
                KIND_ENUM => {
                    let mut values = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let v = off + i * 8;
                        let val = u32_at(types_bytes, v + 4)?;
                        let val = if kind_flag { i64::from(val as i32) } else { i64::from(val) };
                        values.push((string_at(strings, u32_at(types_bytes, v)?), val));
                    }
                    off += vlen * 8;
                    Type::Enum { name, values }
                }
                KIND_ENUM64 => {
                    let mut values = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let v = off + i * 12;
                        let lo = u64::from(u32_at(types_bytes, v + 4)?);
                        let hi = u64::from(u32_at(types_bytes, v + 8)?);
                        values.push((
                            string_at(strings, u32_at(types_bytes, v)?),
                            ((hi << 32) | lo) as i64,
                        ));
                    }
                    off += vlen * 12;
                    Type::Enum { name, values }
                }
                KIND_INT | KIND_VAR | KIND_DECL_TAG => {
                    off += 4;
                    Type::Other
                }
                KIND_ARRAY => {
                    off += 12;
                    Type::Other
                }
                KIND_FUNC_PROTO => {
                    off += vlen * 8;
                    Type::Other
                }
                KIND_DATASEC => {
                    off += vlen * 12;
                    Type::Other
                }
                KIND_TYPEDEF => Type::Typedef { name, target: u32_at(types_bytes, off - 4)? },
                0 | 2 | 7 | 9..=12 | 16 | 18 => Type::Other,
                k => bail!("unknown BTF kind {k}"),
            };
            types.push(ty);
        }
        Ok(Self { types })
    }

    /// The values of an enum, by value.
    pub fn enum_values(&self, enum_name: &str) -> Option<HashMap<i64, String>> {
        self.types.iter().find_map(|t| match t {
            Type::Enum { name, values } if name == enum_name => {
                Some(values.iter().map(|(n, v)| (*v, n.clone())).collect())
            }
            _ => None,
        })
    }

    /// Byte offset of `member` in the struct (or typedef of a struct) `struct_name`, looking
    /// through anonymous structs and unions.
    pub fn member_offset(&self, struct_name: &str, member: &str) -> Option<u32> {
        let id = self.types.iter().enumerate().find_map(|(id, t)| match t {
            Type::Composite { name, members } if name == struct_name && !members.is_empty() => {
                Some(id as u32)
            }
            Type::Typedef { name, target } if name == struct_name => Some(*target),
            _ => None,
        })?;
        self.find_member(id, member, 0, &mut Vec::new()).map(|bits| bits / 8)
    }

    /// Bit offset of `member` within type `id`, from `base_bits`. `path` holds the types being
    /// searched: a type met again on its own path is a cycle (impossible in C, possible in
    /// hostile BTF) and is not searched again, so a lookup stays linear; offsets that would
    /// overflow are no answer.
    fn find_member(
        &self,
        id: u32,
        member: &str,
        base_bits: u32,
        path: &mut Vec<u32>,
    ) -> Option<u32> {
        if path.len() > 8 || path.contains(&id) {
            return None;
        }
        let Type::Composite { members, .. } = self.types.get(id as usize)? else {
            return None;
        };
        if let Some(m) = members.iter().find(|m| m.name == member) {
            return base_bits.checked_add(m.bit_offset);
        }
        path.push(id);
        // Anonymous members: search inside them (their type is the struct or union itself).
        let found = members.iter().filter(|m| m.name.is_empty()).find_map(|m| {
            self.find_member(m.type_id, member, base_bits.checked_add(m.bit_offset)?, path)
        });
        path.pop();
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a tiny BTF blob: `struct outer { int a; union { long b; int c; }; }` and
    /// `enum r { X = 2, Y = 77 }`.
    fn blob() -> Vec<u8> {
        let strings = b"\0outer\0a\0b\0c\0r\0X\0Y\0int\0alias_t\0".to_vec();
        let s = |name: &str| -> u32 {
            let needle = [name.as_bytes(), b"\0"].concat();
            strings.windows(needle.len()).position(|w| w == needle.as_slice()).unwrap() as u32
        };
        let mut t = Vec::new();
        let mut push =
            |words: &[u32]| words.iter().for_each(|w| t.extend_from_slice(&w.to_le_bytes()));
        // 1: int
        push(&[s("int"), KIND_INT << 24, 4, 32]);
        // 2: anonymous union { b @0, c @0 }
        push(&[0, (KIND_UNION << 24) | 2, 8, s("b"), 1, 0, s("c"), 1, 0]);
        // 3: struct outer { a @0, <anon> @64 bits }
        push(&[s("outer"), (KIND_STRUCT << 24) | 2, 16, s("a"), 1, 0, 0, 2, 64]);
        // 4: enum r
        push(&[s("r"), (KIND_ENUM << 24) | 2, 4, s("X"), 2, s("Y"), 77]);
        // 5: typedef struct { int a @0; int b @32 } alias_t, the way possible_net_t is made.
        push(&[0, (KIND_STRUCT << 24) | 2, 8, s("a"), 1, 0, s("b"), 1, 32]);
        push(&[s("alias_t"), KIND_TYPEDEF << 24, 5]);
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for w in [24u32, 0, t.len() as u32, t.len() as u32, strings.len() as u32] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&t);
        out.extend_from_slice(&strings);
        out
    }

    #[test]
    fn parses_members_and_enums() {
        let btf = Btf::parse(&blob()).unwrap();
        assert_eq!(btf.member_offset("outer", "a"), Some(0));
        assert_eq!(btf.member_offset("outer", "c"), Some(8), "inside the anonymous union");
        assert_eq!(btf.member_offset("outer", "nope"), None);
        assert_eq!(btf.member_offset("alias_t", "b"), Some(4), "through a typedef");
        let e = btf.enum_values("r").unwrap();
        assert_eq!(e.get(&77).map(String::as_str), Some("Y"));
    }

    #[test]
    fn hostile_input_errors_without_panicking() {
        let good = blob();
        for cut in 0..good.len() {
            let _ = Btf::parse(&good[..cut]);
        }
        let mut bad = good.clone();
        bad[0] = 0;
        assert!(Btf::parse(&bad).is_err());
        assert!(Btf::parse(&[]).is_err());
    }

    #[test]
    fn reads_this_kernel() {
        let Ok(btf) = Btf::from_sys_fs() else {
            eprintln!("SKIPPED: no /sys/kernel/btf/vmlinux here");
            return;
        };
        let reasons = btf.enum_values("skb_drop_reason").expect("enum skb_drop_reason");
        assert!(reasons.values().any(|n| n == "SKB_DROP_REASON_NETFILTER_DROP"));
        assert!(btf.member_offset("sk_buff", "head").is_some());
        assert!(btf.member_offset("sk_buff", "dev").is_some());
        assert!(btf.member_offset("net", "ns").is_some());
    }
}
