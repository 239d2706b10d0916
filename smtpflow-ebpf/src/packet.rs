//! The one bounds-checked way to read packet bytes. Everything else reads through [`Packet`].
use core::mem::size_of;

use aya_ebpf::programs::{TcContext, XdpContext};

/// Furthest offset we read at. Bounds every variable offset for the verifier; headers that start
/// deeper than this are not inspected (see `parse`).
pub const MAX_OFFSET: usize = 1024;

/// A frame the parser can read from.
pub trait Packet {
    /// Reads a `T` at `off` bytes from the start of the frame, or `Err` when any byte of it is
    /// past the end of the frame.
    fn read_at<T: Copy>(&self, off: usize) -> Result<T, ()>;
}

/// Bounds-checked pointer to a `T` at `off` in `[start, end)`.
#[inline(always)]
fn ptr_at<T>(start: usize, end: usize, off: usize) -> Result<*const T, ()> {
    if off > MAX_OFFSET || start + off + size_of::<T>() > end {
        return Err(());
    }
    Ok((start + off) as *const T)
}

impl Packet for XdpContext {
    #[inline(always)]
    fn read_at<T: Copy>(&self, off: usize) -> Result<T, ()> {
        let p = ptr_at::<T>(self.data(), self.data_end(), off)?;
        // SAFETY: `ptr_at` checked that the bytes lie inside the packet.
        Ok(unsafe { core::ptr::read_unaligned(p) })
    }
}

impl Packet for TcContext {
    #[inline(always)]
    fn read_at<T: Copy>(&self, off: usize) -> Result<T, ()> {
        match ptr_at::<T>(self.data(), self.data_end(), off) {
            // SAFETY: `ptr_at` checked that the bytes lie inside the linear packet data.
            Ok(p) => Ok(unsafe { core::ptr::read_unaligned(p) }),
            // Past the linear data: the skb may still hold the bytes in its fragments.
            Err(()) if off <= MAX_OFFSET => self.load::<T>(off).map_err(|_| ()),
            Err(()) => Err(()),
        }
    }
}

#[inline(always)]
pub fn tc_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the context pointer is valid for the duration of the program.
    unsafe { (*ctx.skb.skb).ifindex }
}
