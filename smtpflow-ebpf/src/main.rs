//! smtpflow's kernel programs: TC ingress/egress classifiers and an XDP ingress program that
//! count SYN, SYN-ACK, RST and zero-window events on the SMTP ports.
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

mod count;
mod drops;
mod flow;
mod packet;
mod parse;

use aya_ebpf::{
    bindings::{TC_ACT_UNSPEC, xdp_action::XDP_PASS},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use smtpflow_common::Side;

#[classifier]
pub fn smtpflow_tc_in(ctx: TcContext) -> i32 {
    count::observe(&ctx, Side::Peer);
    TC_ACT_UNSPEC
}

#[classifier]
pub fn smtpflow_tc_out(ctx: TcContext) -> i32 {
    count::observe(&ctx, Side::Local);
    TC_ACT_UNSPEC
}

#[xdp]
pub fn smtpflow_xdp(ctx: XdpContext) -> u32 {
    count::observe(&ctx, Side::Peer);
    XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
