//! A seeded random generator (SplitMix64): the seed is printed, and `SMTPFLOW_TEST_SEED` replays
//! it.
use std::time::{SystemTime, UNIX_EPOCH};

pub struct Rng(u64);

impl Rng {
    /// `$SMTPFLOW_TEST_SEED`, else the clock; printed so that a failure can be replayed.
    pub fn from_env(test: &str) -> Self {
        let seed =
            std::env::var("SMTPFLOW_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(
                || SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64),
            );
        eprintln!("{test}: random seed {seed} (replay with SMTPFLOW_TEST_SEED={seed})");
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}
