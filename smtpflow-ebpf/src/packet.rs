//! The one bounds-checked way to read packet bytes. Everything else reads through [`Packet`].
use core::mem::size_of;

use core::ffi::c_void;

use aya_ebpf::{
    helpers::generated::bpf_skb_load_bytes,
    programs::{TcContext, XdpContext},
};

/// Furthest offset we read at. Bounds every variable offset for the verifier (the last payload
/// byte of a full-size segment is the deepest read).
pub const MAX_OFFSET: usize = 0x7fff;

/// A frame the parser can read from.
pub trait Packet {
    /// Reads a `T` at `off` bytes from the start of the frame, or `Err` when any byte of it is
    /// past the end of the frame.
    fn read_at<T: Copy>(&self, off: usize) -> Result<T, ()>;

    /// Length of the whole frame.
    fn len(&self) -> usize;

    /// VLAN tags the kernel already took out of the frame into metadata (TC sees frames after
    /// the outer tag is stripped; XDP sees them as they arrived).
    fn stripped_vlan_tags(&self) -> usize;
}

/// Returns `v` unchanged, hiding from LLVM what it knows about it, so that a bounds check the
/// verifier needs is neither dropped as redundant nor done on a re-derived register.
#[inline(always)]
pub fn opaque(mut v: usize) -> usize {
    // SAFETY: a register move to itself (an empty asm would leave BTF line info the kernel
    // rejects).
    unsafe { core::arch::asm!("{0} = {0}", inout(reg) v) };
    v
}

/// Bounds-checked pointer to a `T` at `off` in `[start, end)`.
///
/// The pointer goes through an opaque `asm!` so that LLVM cannot re-derive it: the check and the
/// access must use one register, or the verifier (which tracks the range per register lineage)
/// rejects the access. Left to itself LLVM recomputes `start + off` for the access, or turns
/// `p + 1 > end` into `p >= end`, and both give the verifier no range.
#[inline(always)]
fn ptr_at<T>(start: usize, end: usize, off: usize) -> Result<*const T, ()> {
    if off > MAX_OFFSET {
        return Err(());
    }
    let p = opaque(start + off);
    if p + size_of::<T>() > end {
        return Err(());
    }
    Ok(p as *const T)
}

impl Packet for XdpContext {
    #[inline(always)]
    fn read_at<T: Copy>(&self, off: usize) -> Result<T, ()> {
        let p = ptr_at::<T>(self.data(), self.data_end(), off)?;
        // SAFETY: `ptr_at` checked that the bytes lie inside the packet.
        Ok(unsafe { core::ptr::read_unaligned(p) })
    }

    #[inline(always)]
    fn len(&self) -> usize {
        self.data_end() - self.data()
    }

    #[inline(always)]
    fn stripped_vlan_tags(&self) -> usize {
        0
    }
}

impl Packet for TcContext {
    #[inline(always)]
    fn read_at<T: Copy>(&self, off: usize) -> Result<T, ()> {
        match ptr_at::<T>(self.data(), self.data_end(), off) {
            // SAFETY: `ptr_at` checked that the bytes lie inside the linear packet data.
            Ok(p) => Ok(unsafe { core::ptr::read_unaligned(p) }),
            // Past the linear data: the skb may still hold the bytes in its fragments.
            Err(()) if off <= MAX_OFFSET => {
                // Zeroed, not uninitialised: on the error path LLVM may still compute with the
                // value, and the verifier rejects reading an uninitialised register.
                // SAFETY: every `T` read here is plain bytes (headers, byte arrays), for which
                // all-zero is valid; the helper writes at most `size_of::<T>()` bytes into `v`.
                let mut v: T = unsafe { core::mem::zeroed() };
                let ret = unsafe {
                    bpf_skb_load_bytes(
                        self.skb.skb as *const c_void,
                        off as u32,
                        (&raw mut v).cast(),
                        size_of::<T>() as u32,
                    )
                };
                if ret == 0 { Ok(v) } else { Err(()) }
            }
            Err(()) => Err(()),
        }
    }

    #[inline(always)]
    fn len(&self) -> usize {
        TcContext::len(self) as usize
    }

    #[inline(always)]
    fn stripped_vlan_tags(&self) -> usize {
        // SAFETY: the context pointer is valid for the duration of the program.
        usize::from(unsafe { (*self.skb.skb).vlan_present } != 0)
    }
}

#[inline(always)]
pub fn tc_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the context pointer is valid for the duration of the program.
    unsafe { (*ctx.skb.skb).ifindex }
}
