//! `tp_btf/kfree_skb`: counts SMTP-port SYNs the kernel dropped, by drop reason. Rust eBPF has no
//! CO-RE, so the loader reads the field offsets it needs from the running kernel's BTF and passes
//! them in `DROP_CONFIG`; the reason's name is resolved in userspace, from BTF too.
use aya_ebpf::{
    helpers::bpf_probe_read_kernel, macros::btf_tracepoint, programs::BtfTracePointContext,
};
use smtpflow_common::{
    CounterKey, Direction, DropConfig, Metric,
    rules::tcp_flags::{ACK, RST, SYN},
    smtp_port,
};

use crate::count::{config, count};

/// Set by the loader before load; `enabled` stays 0 when BTF lacks what the program needs.
#[unsafe(no_mangle)]
static DROP_CONFIG: DropConfig = DropConfig::DISABLED;

/// `sk_buff::network_header` when unset.
const NO_HEADER: u16 = 0xffff;
const IPPROTO_TCP: u8 = 6;

#[btf_tracepoint(function = "kfree_skb")]
pub fn smtpflow_drop(ctx: BtfTracePointContext) -> i32 {
    let _ = try_drop(&ctx);
    0
}

#[inline(always)]
fn read<T>(addr: u64) -> Result<T, ()> {
    // SAFETY: bpf_probe_read_kernel checks the address and fails cleanly.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.map_err(|_| ())
}

/// The inode number of the network namespace an skb belongs to (its device's, else its
/// socket's).
#[inline(always)]
fn netns_inum(skb: u64, c: &DropConfig) -> Result<u32, ()> {
    let dev: u64 = read(skb + u64::from(c.skb_dev))?;
    let net: u64 = if dev != 0 {
        read(dev + u64::from(c.dev_nd_net))?
    } else {
        let sk: u64 = read(skb + u64::from(c.skb_sk))?;
        if sk == 0 {
            return Err(());
        }
        read(sk + u64::from(c.sk_net))?
    };
    read(net + u64::from(c.net_ns_inum))
}

#[inline(always)]
fn try_drop(ctx: &BtfTracePointContext) -> Result<(), ()> {
    // SAFETY: the loader writes DROP_CONFIG before load; volatile keeps the placeholder from
    // being folded.
    let c = unsafe { core::ptr::read_volatile(&DROP_CONFIG) };
    if c.enabled == 0 {
        return Ok(());
    }
    let skb: u64 = ctx.arg(0);
    // kfree_skb(skb, location, reason, ...): the same position on every kernel that has reasons.
    let reason = ctx.arg::<u64>(2) as u32;
    if c.netns_inum != 0 && netns_inum(skb, &c)? != c.netns_inum {
        return Ok(());
    }
    let head: u64 = read(skb + u64::from(c.skb_head))?;
    let nh: u16 = read(skb + u64::from(c.skb_network_header))?;
    if head == 0 || nh == NO_HEADER {
        return Err(());
    }
    let ip = head + u64::from(nh);
    let ver_ihl: u8 = read(ip)?;
    let tcp = match ver_ihl >> 4 {
        4 => {
            let [proto, frag_hi, frag_lo]: [u8; 3] = [read(ip + 9)?, read(ip + 6)?, read(ip + 7)?];
            if proto != IPPROTO_TCP || u16::from_be_bytes([frag_hi, frag_lo]) & 0x1fff != 0 {
                return Ok(());
            }
            ip + u64::from(ver_ihl & 0x0f) * 4
        }
        6 => {
            if read::<u8>(ip + 6)? != IPPROTO_TCP {
                return Ok(());
            }
            ip + 40
        }
        _ => return Ok(()),
    };
    let th: [u8; 14] = read(tcp)?;
    if th[13] & (SYN | ACK | RST) != SYN {
        return Ok(());
    }
    let src_port = u16::from_be_bytes([th[0], th[1]]);
    let dst_port = u16::from_be_bytes([th[2], th[3]]);
    let Some(m) = smtp_port(src_port, dst_port, config().ports()) else {
        return Ok(());
    };
    if !m.sender_is_client {
        return Ok(());
    }
    // A received SYN remembers its input interface; one we sent has none.
    let iif: u32 = read(skb + u64::from(c.skb_iif))?;
    let direction = if iif != 0 { Direction::Inbound } else { Direction::Outbound };
    let mut key = CounterKey::new(0, m.port, Metric::SynDrop, direction);
    key.code = reason as u16;
    count(&key);
    Ok(())
}
