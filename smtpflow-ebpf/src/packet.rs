//! The one bounds-checked way to read packet bytes. Everything else reads through [`Frame`].
use core::mem::size_of;

use core::ffi::c_void;

use aya_ebpf::{
    helpers::generated::{bpf_skb_load_bytes, bpf_xdp_load_bytes},
    programs::{TcContext, XdpContext},
};

/// Furthest offset we read at. Bounds every variable offset for the verifier (the last payload
/// byte of a full-size segment is the deepest read).
pub const MAX_OFFSET: usize = 0x7fff;
const _: () = assert!((MAX_OFFSET + 1).is_power_of_two(), "ptr_at masks offsets with it");

/// A frame the parser can read from.
pub trait Frame {
    /// Reads the integer at `off` bytes from the start of the frame with one load, in wire
    /// order (convert with `from_be`), or `Err` when any byte of it is past the end of the frame.
    fn load<T: Int>(&self, off: usize) -> Result<T, ()>;

    /// A header of `N` bytes as this frame holds it.
    type Header<const N: usize>: Fields;

    /// The `N`-byte header at `off`, checked once, or `Err` when any byte of it is past the end
    /// of the frame.
    fn header<const N: usize>(&self, off: usize) -> Result<Self::Header<N>, ()>;

    /// Length of the whole frame.
    fn len(&self) -> usize;

    /// VLAN tags the kernel already took out of the frame into metadata (TC sees frames after
    /// the outer tag is stripped; XDP sees them as they arrived).
    fn stripped_vlan_tags(&self) -> usize;
}

/// A fixed-size header whose bytes were bounds-checked once: its fields are then read with no
/// further check (the verifier follows constant offsets from the checked pointer).
pub trait Fields {
    /// The field of type `T` at `field` bytes into the header, in wire order. Fields lie within
    /// the header (the parser reads them at their `offset_of!` in a header struct).
    fn get<T: Int>(&self, field: usize) -> T;
}

/// A header of `N` bytes in place in the packet.
pub struct InPlace<const N: usize>(usize);

impl<const N: usize> Fields for InPlace<N> {
    #[inline(always)]
    fn get<T: Int>(&self, field: usize) -> T {
        // SAFETY: the header's N bytes are inside the packet ([`ptr_at`] checked them).
        unsafe { T::load(self.0 + field) }
    }
}

/// A header of `N` bytes of an skb: in place, or copied out of its fragments. A struct, not an
/// enum: LLVM would pack an enum's pointer and bytes into one register with shifts, and the
/// verifier forbids shifting a packet pointer.
pub struct SkbHeader<const N: usize> {
    in_place: Option<InPlace<N>>,
    copy: [u8; N],
}

impl<const N: usize> Fields for SkbHeader<N> {
    #[inline(always)]
    fn get<T: Int>(&self, field: usize) -> T {
        match &self.in_place {
            Some(h) => h.get(field),
            None => T::from_bytes(self.copy.get(field..).unwrap_or(&[])),
        }
    }
}

/// A packet as a program receives it.
pub trait Packet: Frame {
    /// Seen where only ingress is visible (XDP): the local host's packets never show.
    const INGRESS_ONLY: bool;

    /// Every byte of the frame is readable in place: an XDP frame. The program is loaded
    /// without `BPF_F_XDP_HAS_FRAGS`, so the kernel gives it single-buffer frames only (a
    /// device set up for multi-buffer frames refuses it). An skb may hold bytes past its
    /// linear data, in fragments.
    const LINEAR: bool;

    /// The interface the packet was seen on.
    fn ifindex(&self) -> u32;

    /// How many TCP segments the packet carries: more than 1 for a burst the stack merged
    /// (GRO) or will split (TSO/GSO), whose payload lies in page fragments; 1 otherwise. XDP
    /// frames are single segments.
    fn segments(&self) -> u32;

    /// The bytes readable in place: all of an XDP frame; an skb's linear data, which holds the
    /// headers of nearly every packet (the rest may sit in its fragments).
    fn linear(&self) -> Linear<'_, Self>
    where
        Self: Sized;

    /// Copies `len` bytes at `off` of the packet (fragments included) to `dst` with the
    /// program type's helper: `bpf_skb_load_bytes` or `bpf_xdp_load_bytes` (Linux 5.18).
    ///
    /// # Safety
    /// `dst` must be writable for `len` bytes, and `len` bounded for the verifier (1 to the
    /// size of `dst`).
    unsafe fn copy_bytes(&self, off: u32, dst: *mut u8, len: u32) -> Result<(), ()>;
}

/// The bytes of a packet readable in place, read only in place: no helper call, so no stack
/// buffer and no registers saved around a call, which keeps the per-packet filter short.
pub struct Linear<'a, P> {
    start: usize,
    end: usize,
    /// Asked for its VLAN metadata only when the frame has a tag (a context read saved).
    packet: &'a P,
}

/// Returns `v` unchanged, hiding from LLVM what it knows about it, so that a bounds check the
/// verifier needs is neither dropped as redundant nor done on a re-derived register.
#[inline(always)]
pub fn opaque(mut v: usize) -> usize {
    // SAFETY: a register move to itself (an empty asm would leave BTF line info the kernel
    // rejects). Pure and memory-free, so that it does not make LLVM reload what it already
    // read (the context's packet pointers) after it.
    unsafe {
        core::arch::asm!("{0} = {0}", inout(reg) v, options(pure, nomem, nostack, preserves_flags))
    };
    v
}

/// An integer the parser reads from a frame.
pub trait Int: Copy {
    /// One load of `Self` at `p`, whatever its alignment.
    ///
    /// # Safety
    /// `p` must be a readable packet address, checked by [`ptr_at`] for `size_of::<Self>()`.
    unsafe fn load(p: usize) -> Self;

    /// The integer in the first bytes of `b`, in memory order (as [`Int::load`] reads it).
    fn from_bytes(b: &[u8]) -> Self;
}

/// A packet field is rarely aligned, so LLVM would read it byte by byte (and juggle the bytes
/// in registers and on the stack); the kernel allows unaligned packet loads, so one load does.
/// (LLVM's `allows-misaligned-mem-access` would say the same for every access, stack included,
/// where the verifier rejects it.) BPF loads zero-extend into the 64-bit register.
macro_rules! int_load {
    ($($t:ty => $width:literal),*) => {$(
        impl Int for $t {
            #[inline(always)]
            unsafe fn load(p: usize) -> Self {
                let v: u64;
                // SAFETY: the caller checked that the bytes are inside the packet.
                unsafe {
                    core::arch::asm!(
                        concat!("{v} = *(", $width, " *)({p} + 0)"),
                        v = lateout(reg) v,
                        p = in(reg) p,
                        options(pure, readonly, nostack, preserves_flags),
                    )
                };
                v as $t
            }

            #[inline(always)]
            fn from_bytes(b: &[u8]) -> Self {
                let mut v = [0; size_of::<$t>()];
                if let Some(src) = b.get(..v.len()) {
                    v.copy_from_slice(src);
                }
                <$t>::from_ne_bytes(v)
            }
        }
    )*};
}
int_load!(u8 => "u8", u16 => "u16", u32 => "u32", u64 => "u64");

/// A packet pointer of the context, read with a volatile load. The verifier turns the context
/// read into a pointer; a plain read LLVM may move into a caller and pass down as an integer
/// argument it re-truncates to 32 bits, an operation the verifier forbids on packet pointers.
///
/// # Safety
/// `field` must be a field of the program's context.
#[inline(always)]
unsafe fn volatile(field: &u32) -> usize {
    // SAFETY: per the contract, a valid reference into the context.
    unsafe { core::ptr::read_volatile(field) as usize }
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
    // Masked as well (a no-op after the check): an offset read from a map value may be checked
    // in one register and added from another, filled from the same stack slot, and Linux 6.1
    // bounds only the register it compared.
    let p = opaque(start + (opaque(off) & MAX_OFFSET));
    // Opaque too, or LLVM turns `p + 1 > end` into `p >= end`, which gives the verifier no range.
    if opaque(p + size_of::<T>()) > end {
        return Err(());
    }
    Ok(p as *const T)
}

impl<P: Frame> Frame for Linear<'_, P> {
    type Header<const N: usize> = InPlace<N>;

    #[inline(always)]
    fn header<const N: usize>(&self, off: usize) -> Result<InPlace<N>, ()> {
        Ok(InPlace(ptr_at::<[u8; N]>(self.start, self.end, off)? as usize))
    }

    #[inline(always)]
    fn load<T: Int>(&self, off: usize) -> Result<T, ()> {
        let p = ptr_at::<T>(self.start, self.end, off)?;
        // SAFETY: `ptr_at` checked that the bytes lie inside the packet.
        Ok(unsafe { T::load(p as usize) })
    }

    #[inline(always)]
    fn len(&self) -> usize {
        self.end - self.start
    }

    #[inline(always)]
    fn stripped_vlan_tags(&self) -> usize {
        self.packet.stripped_vlan_tags()
    }
}

impl Frame for XdpContext {
    type Header<const N: usize> = InPlace<N>;

    #[inline(always)]
    fn header<const N: usize>(&self, off: usize) -> Result<InPlace<N>, ()> {
        self.linear().header(off)
    }

    #[inline(always)]
    fn load<T: Int>(&self, off: usize) -> Result<T, ()> {
        self.linear().load(off)
    }

    #[inline(always)]
    fn len(&self) -> usize {
        self.linear().len()
    }

    #[inline(always)]
    fn stripped_vlan_tags(&self) -> usize {
        0
    }
}

impl Packet for XdpContext {
    const INGRESS_ONLY: bool = true;
    const LINEAR: bool = true;

    #[inline(always)]
    unsafe fn copy_bytes(&self, off: u32, dst: *mut u8, len: u32) -> Result<(), ()> {
        // SAFETY: per the contract; the helper checks `off` and `len` against the frame.
        let ret = unsafe { bpf_xdp_load_bytes(self.ctx, off, dst.cast(), len) };
        if ret == 0 { Ok(()) } else { Err(()) }
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.ingress_ifindex() as u32
    }

    #[inline(always)]
    fn segments(&self) -> u32 {
        1
    }

    #[inline(always)]
    fn linear(&self) -> Linear<'_, Self> {
        // SAFETY: the context pointer is valid for the duration of the program.
        let (start, end) =
            unsafe { (volatile(&(*self.ctx).data), volatile(&(*self.ctx).data_end)) };
        Linear { start, end, packet: self }
    }
}

/// A read past the linear data of an skb, whose fragments may still hold the bytes.
#[inline(always)]
fn skb_load_bytes<T: Copy>(ctx: &TcContext, off: usize) -> Result<T, ()> {
    if off > MAX_OFFSET {
        return Err(());
    }
    // Zeroed, not uninitialised: on the error path LLVM may still compute with the value, and
    // the verifier rejects reading an uninitialised register.
    // SAFETY: every `T` read here is plain bytes (integers, byte arrays), for which all-zero is
    // valid; the helper writes at most `size_of::<T>()` bytes into `v`.
    let mut v: T = unsafe { core::mem::zeroed() };
    let ret = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const c_void,
            off as u32,
            (&raw mut v).cast(),
            size_of::<T>() as u32,
        )
    };
    if ret == 0 { Ok(v) } else { Err(()) }
}

impl Frame for TcContext {
    type Header<const N: usize> = SkbHeader<N>;

    #[inline(always)]
    fn header<const N: usize>(&self, off: usize) -> Result<SkbHeader<N>, ()> {
        match self.linear().header(off) {
            Ok(h) => Ok(SkbHeader { in_place: Some(h), copy: [0; N] }),
            Err(()) => Ok(SkbHeader { in_place: None, copy: skb_load_bytes(self, off)? }),
        }
    }

    #[inline(always)]
    fn load<T: Int>(&self, off: usize) -> Result<T, ()> {
        self.linear().load(off).or_else(|()| skb_load_bytes(self, off))
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

impl Packet for TcContext {
    const INGRESS_ONLY: bool = false;
    const LINEAR: bool = false;

    #[inline(always)]
    unsafe fn copy_bytes(&self, off: u32, dst: *mut u8, len: u32) -> Result<(), ()> {
        // SAFETY: per the contract; the helper checks `off` and `len` against the skb.
        let ret =
            unsafe { bpf_skb_load_bytes(self.skb.skb as *const c_void, off, dst.cast(), len) };
        if ret == 0 { Ok(()) } else { Err(()) }
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: the context pointer is valid for the duration of the program.
        unsafe { (*self.skb.skb).ifindex }
    }

    #[inline(always)]
    fn segments(&self) -> u32 {
        // SAFETY: the context pointer is valid for the duration of the program (the field is
        // the skb's shared info, which the verifier's rewrite of the load reads).
        unsafe { (*self.skb.skb).gso_segs }
    }

    #[inline(always)]
    fn linear(&self) -> Linear<'_, Self> {
        let skb = self.skb.skb;
        // SAFETY: the context pointer is valid for the duration of the program.
        let (start, end) = unsafe { (volatile(&(*skb).data), volatile(&(*skb).data_end)) };
        Linear { start, end, packet: self }
    }
}
