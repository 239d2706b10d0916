//! smtpflow's kernel programs: TC ingress/egress classifiers and an XDP ingress program that
//! count SYN, SYN-ACK, RST and zero-window events on the SMTP ports, and two drop counters.
//!
//! This file holds the entry points only. A packet goes [`observe`] -> [`parse`] (locate the
//! TCP segment) -> [`flow`] (advance its connection) -> [`maps`] (count), and [`payload`] (copy
//! the few payloads the flow asks for into a ring buffer); the drop programs go
//! [`drops`] -> [`maps`]. Imports run that way only.
//!
//! Every program only observes: TC returns `TC_ACT_UNSPEC` (programs after ours still run) and
//! XDP returns `XDP_PASS`, on every path.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![feature(asm_experimental_arch)]
#![expect(
    internal_features,
    reason = "atomic_xadd: the bpf target has no CAS, so AtomicU64 has no fetch_add"
)]

mod drops;
mod flow;
mod maps;
mod observe;
mod packet;
mod parse;
mod payload;

use aya_ebpf::{
    bindings::{TC_ACT_UNSPEC, xdp_action::XDP_PASS},
    macros::{btf_tracepoint, classifier, fexit, xdp},
    programs::{BtfTracePointContext, FExitContext, TcContext, XdpContext},
};
use smtpflow_common::Side;

#[classifier]
pub fn smtpflow_tc_in(ctx: TcContext) -> i32 {
    observe::observe(&ctx, Side::Peer);
    TC_ACT_UNSPEC
}

#[classifier]
pub fn smtpflow_tc_out(ctx: TcContext) -> i32 {
    observe::observe(&ctx, Side::Local);
    TC_ACT_UNSPEC
}

#[xdp]
pub fn smtpflow_xdp(ctx: XdpContext) -> u32 {
    observe::observe(&ctx, Side::Peer);
    XDP_PASS
}

#[btf_tracepoint(function = "kfree_skb")]
pub fn smtpflow_drop(ctx: BtfTracePointContext) -> i32 {
    let _ = drops::on_kfree_skb(&ctx);
    0
}

#[fexit(function = "tcp_conn_request")]
pub fn smtpflow_lovf(ctx: FExitContext) -> i32 {
    let _ = drops::on_conn_request_exit(&ctx);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
