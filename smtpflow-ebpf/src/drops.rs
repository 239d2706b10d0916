//! `tp_btf/kfree_skb`: counts SMTP-port SYNs the kernel dropped, by drop reason. Rust eBPF has no
//! CO-RE, so the loader reads the field offsets it needs from the running kernel's BTF and passes
//! them in `DROP_CONFIG`; the reason's name is resolved in userspace, from BTF too.
use aya_ebpf::{
    helpers::bpf_probe_read_kernel,
    programs::{BtfTracePointContext, FExitContext},
};
use smtpflow_common::{
    Counter, CounterKey, Direction, DropConfig, Scope,
    rules::tcp_flags::{ACK, RST, SYN},
    smtp_port,
};

use crate::maps::{NO_SCOPE, config, count, drop_config};

/// `sk_buff::network_header` when unset.
const NO_HEADER: u16 = 0xffff;
const IPPROTO_TCP: u8 = 6;

#[inline(always)]
fn read<T>(addr: u64) -> Result<T, ()> {
    // SAFETY: bpf_probe_read_kernel checks the address and fails cleanly.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.map_err(|_| ())
}

/// The field at `off` of a kernel object the program was handed typed (the tracepoint's `skb`,
/// or a struct pointer read from one), with one plain load: no helper call. `off` comes from
/// `DROP_CONFIG`, read-only data whose values the verifier knows, so it checks the load against
/// the kernel's BTF, types the pointers it reads, and has the JIT turn a fault into 0. The
/// packet bytes behind `skb->head` are not typed that way and stay with [`read`].
#[inline(always)]
fn field<T: Copy>(base: u64, off: u32) -> T {
    // SAFETY: `base` is a BTF-typed kernel pointer and `off` a field's offset in its type
    // (from the kernel's BTF); the verifier checks both, and the load cannot fault the kernel.
    unsafe { core::ptr::read_volatile((base + u64::from(off)) as *const T) }
}

/// The inode number of the network namespace an skb belongs to (its device's, else its
/// socket's); 0 when it has neither. Direct loads only: this program runs for every skb the
/// host frees with a drop reason, in every namespace, and this is the whole of its cost for
/// another namespace's packets (three helper calls here took a flood's SYN-ACK rate down by
/// about five points).
#[inline(always)]
fn netns_inum(skb: u64, c: &DropConfig) -> u32 {
    let dev: u64 = field(skb, c.skb_dev);
    if dev != 0 {
        net_inum(field(dev, c.dev_nd_net), c)
    } else {
        sock_netns_inum(field(skb, c.skb_sk), c)
    }
}

/// The inode number of socket `sk`'s network namespace; 0 for no socket.
#[inline(always)]
fn sock_netns_inum(sk: u64, c: &DropConfig) -> u32 {
    if sk == 0 {
        return 0;
    }
    net_inum(field(sk, c.sk_net), c)
}

/// The inode number of the namespace `net`; 0 for none.
#[inline(always)]
fn net_inum(net: u64, c: &DropConfig) -> u32 {
    if net == 0 {
        return 0;
    }
    field(net, c.net_ns_inum)
}

/// Where a dropped packet was going: an SMTP port, sent by the client.
struct ClientSegment {
    port: u16,
    flags: u8,
}

/// Reads the IP and TCP headers of an skb; `None` when it is not TCP to an SMTP port. Two
/// helper calls (the skb's own fields are loaded directly): the IP header's first 20 bytes,
/// which hold all that either family needs, then the TCP header's first 14.
#[inline(always)]
fn client_segment(skb: u64, c: &DropConfig) -> Result<Option<ClientSegment>, ()> {
    let head: u64 = field(skb, c.skb_head);
    let nh: u16 = field(skb, c.skb_network_header);
    if head == 0 || nh == NO_HEADER {
        return Err(());
    }
    let ip = head + u64::from(nh);
    // Byte 0: the version (and IPv4's header length). IPv4: the fragment offset in bytes 6-7,
    // the protocol in byte 9. IPv6: the next header in byte 6.
    let h: [u8; 20] = read(ip)?;
    let tcp = match h[0] >> 4 {
        4 => {
            if h[9] != IPPROTO_TCP || u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0 {
                return Ok(None);
            }
            ip + u64::from(h[0] & 0x0f) * 4
        }
        6 => {
            if h[6] != IPPROTO_TCP {
                return Ok(None);
            }
            ip + 40
        }
        _ => return Ok(None),
    };
    let th: [u8; 14] = read(tcp)?;
    let src_port = u16::from_be_bytes([th[0], th[1]]);
    let dst_port = u16::from_be_bytes([th[2], th[3]]);
    match smtp_port(src_port, dst_port, config().ports()) {
        Some(m) if m.sender_is_client => Ok(Some(ClientSegment { port: m.port, flags: th[13] })),
        _ => Ok(None),
    }
}

#[inline(always)]
fn count_drop(port: u16, direction: Direction, reason: u32) {
    // A drop has no watched interface: its scope's ifindex is 0.
    let drop = Counter::SynDrop(reason as u16);
    count(&CounterKey::new(Scope { ifindex: 0, port, direction }, drop), NO_SCOPE);
}

/// `tp_btf/kfree_skb`: counts an SMTP-port SYN the kernel dropped, by its drop reason.
#[inline(always)]
pub fn on_kfree_skb(ctx: &BtfTracePointContext) -> Result<(), ()> {
    let c = drop_config();
    if c.enabled == 0 {
        return Ok(());
    }
    let skb: u64 = ctx.arg(0);
    // kfree_skb(skb, location, reason, ...): the same position on every kernel that has reasons.
    let reason = ctx.arg::<u64>(2) as u32;
    if c.netns_inum != 0 && netns_inum(skb, c) != c.netns_inum {
        return Ok(());
    }
    let Some(seg) = client_segment(skb, c)? else {
        return Ok(());
    };
    // SYNs, and the ACK completing a handshake dropped because the accept queue is full: that
    // handshake is lost as surely as a dropped SYN, and the kernel counts it in ListenOverflows.
    let syn = seg.flags & (SYN | ACK | RST) == SYN;
    if !syn && reason != c.listen_overflow_reason {
        return Ok(());
    }
    // A received SYN remembers its input interface; one we sent has none.
    let iif: u32 = field(skb, c.skb_iif);
    let direction = if iif != 0 { Direction::Inbound } else { Direction::Outbound };
    count_drop(seg.port, direction, reason);
    Ok(())
}

/// `fexit/tcp_conn_request`: a SYN refused because the listener's accept queue is full is
/// consumed, not dropped with a reason (`tcp_conn_request` counts it in ListenOverflows and frees
/// it quietly), so [`on_kfree_skb`] never sees it. At the function's exit the queue is still full
/// for such a SYN: the kernel's own test (`sk_acceptq_is_full`) tells it apart.
#[inline(always)]
pub fn on_conn_request_exit(ctx: &FExitContext) -> Result<(), ()> {
    let c = drop_config();
    if c.enabled == 0 || c.listen_overflow_reason == 0 {
        return Ok(());
    }
    // tcp_conn_request(rsk_ops, af_ops, sk, skb)
    let sk: u64 = ctx.arg(2);
    let skb: u64 = ctx.arg(3);
    // Every SYN to a listener comes here: its way out costs two direct loads.
    let backlog: u32 = field(sk, c.sk_ack_backlog);
    let max_backlog: u32 = field(sk, c.sk_max_ack_backlog);
    if backlog <= max_backlog {
        return Ok(());
    }
    if c.netns_inum != 0 && sock_netns_inum(sk, c) != c.netns_inum {
        return Ok(());
    }
    match client_segment(skb, c)? {
        Some(seg) if seg.flags & (SYN | ACK | RST) == SYN => {
            count_drop(seg.port, Direction::Inbound, c.listen_overflow_reason)
        }
        _ => {}
    }
    Ok(())
}
