//! Which form of the attention kernels' inner loops runs ([`Isa`]): the portable loops, AVX2 or AVX-512, chosen
//! once per process from the CPU's features and [`ISA_VAR`]. The loops themselves are in `kernel.rs`, `avx2.rs` and
//! `avx512.rs`.

#[cfg(target_arch = "x86_64")]
use super::{avx2, avx512};
use std::sync::atomic::{AtomicU8, Ordering};

/// The forms of [`super::kernel::attend`]'s inner loops, from the portable one up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain Rust loops (whatever the compiler vectorizes for the build's target).
    Portable,
    /// AVX2 + FMA + F16C, 8 lanes (`avx2.rs`).
    Avx2,
    /// AVX-512 F/BW/VL + FMA + F16C, 16 lanes (`avx512.rs`).
    Avx512,
}

/// The environment variable that forces a form of the loops: `avx512`, `avx2` or `portable` (to compare them);
/// one this CPU lacks falls back to the best form below it that it has.
pub const ISA_VAR: &str = "R1_ATTENTION_ISA";

impl Isa {
    /// Every form, from the portable one up.
    pub const ALL: [Isa; 3] = [Isa::Portable, Isa::Avx2, Isa::Avx512];

    /// Whether this CPU runs this form.
    pub fn available(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => avx2::available(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => avx512::available(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// This form if the CPU runs it, else the best one below it that it does.
    pub fn or_below(self) -> Isa {
        Isa::ALL.into_iter().rev().find(|i| *i <= self && i.available()).unwrap_or(Isa::Portable)
    }

    /// `avx512`, `avx2` or `portable` (any case).
    pub fn parse(s: &str) -> Option<Isa> {
        match s.trim().to_ascii_lowercase().as_str() {
            "avx512" | "avx-512" => Some(Isa::Avx512),
            "avx2" => Some(Isa::Avx2),
            "portable" | "scalar" | "none" => Some(Isa::Portable),
            _ => None,
        }
    }

    /// The form [`super::kernel::attend`] runs: the one [`Isa::force`]d, else [`ISA_VAR`]'s when set (read once per process; an
    /// unknown value is ignored with a warning), else the best this CPU has.
    pub fn selected() -> Isa {
        match CHOICE.load(Ordering::Relaxed) {
            UNSET => {
                let wanted = match std::env::var(ISA_VAR) {
                    Ok(v) if !v.trim().is_empty() => Isa::parse(&v).unwrap_or_else(|| {
                        tracing::warn!("{ISA_VAR}={v:?} is not avx512, avx2 or portable; using the best this CPU has");
                        Isa::Avx512
                    }),
                    _ => Isa::Avx512,
                };
                let isa = wanted.or_below();
                tracing::debug!("r1.GroupQueryAttention loops: {isa:?}");
                // A concurrent first call computes the same value; a concurrent `force` wins or is overwritten
                // with the environment's choice, as if it came first.
                let _ = CHOICE.compare_exchange(UNSET, isa as u8, Ordering::Relaxed, Ordering::Relaxed);
                Isa::ALL[CHOICE.load(Ordering::Relaxed) as usize]
            }
            i => Isa::ALL[i as usize],
        }
    }

    /// Makes [`super::kernel::attend`] run `isa` (or the best form below it that this CPU has) from now on, in every session of
    /// the process; `None` returns to [`ISA_VAR`]'s or the CPU's choice. For comparisons (`decode_step`'s `ISA`).
    pub fn force(isa: Option<Isa>) -> Isa {
        CHOICE.store(isa.map_or(UNSET, |i| i.or_below() as u8), Ordering::Relaxed);
        Isa::selected()
    }
}

/// [`Isa::selected`]'s value (an index of [`Isa::ALL`]), or [`UNSET`] before the first call.
static CHOICE: AtomicU8 = AtomicU8::new(UNSET);
const UNSET: u8 = u8::MAX;
