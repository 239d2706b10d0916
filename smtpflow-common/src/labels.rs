//! One macro for the small enums that cross the kernel boundary as a byte and leave userspace as
//! a label: it numbers the variants, and derives `COUNT`, `ALL`, `label()` and `from_repr()` from
//! the one list, so that no count or name table is kept by hand.

/// Declares a fieldless `#[repr(u8)]` (or `u32`) enum whose variants are numbered 0, 1, 2, ...
/// in order (checked at compile time), each with the label value it is exported as:
///
/// ```
/// smtpflow_common::labelled_enum! {
///     /// Which way a packet went.
///     pub enum Way: u8 {
///         /// Into the host.
///         In = 0 => "in",
///         Out = 1 => "out",
///     }
/// }
/// assert_eq!(Way::COUNT, 2);
/// assert_eq!(Way::ALL, [Way::In, Way::Out]);
/// assert_eq!(Way::Out.label(), "out");
/// assert_eq!(Way::from_repr(1), Some(Way::Out));
/// assert_eq!(Way::from_repr(2), None);
/// ```
#[macro_export]
macro_rules! labelled_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident: $repr:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $value:literal => $label:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[repr($repr)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant = $value, )+
        }

        impl $name {
            /// How many variants there are.
            pub const COUNT: usize = [$($value),+].len();
            /// Every variant, in the order of their values.
            pub const ALL: [Self; Self::COUNT] = [$(Self::$variant),+];

            /// The label value this variant is exported as.
            pub const fn label(self) -> &'static str {
                match self {
                    $(Self::$variant => $label,)+
                }
            }

            /// The variant stored as `v` in a map key or value; `None` for an unknown value.
            #[inline(always)]
            pub const fn from_repr(v: $repr) -> Option<Self> {
                match v {
                    $($value => Some(Self::$variant),)+
                    _ => None,
                }
            }
        }

        // The values are the variants' positions, so `ALL[v]` is `from_repr(v)` and arrays
        // indexed by the value need exactly `COUNT` slots.
        const _: () = {
            let mut i = 0;
            while i < $name::COUNT {
                assert!($name::ALL[i] as usize == i, "variants must be numbered 0, 1, 2, ... in order");
                i += 1;
            }
        };
    };
}
