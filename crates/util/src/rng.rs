//! The one pseudo-random generator of ferry: xorshift64* (Vigna), seeded from the clock for
//! backoff jitter, or from a fixed seed for the model tests, which must repeat. Not for anything
//! an attacker may guess: tokens come from the operating system (`control::token`).
//!
//! The power-cut filesystem and the torture runner (`tests/crashfs`) use it too.

/// A small, fast, deterministic generator.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator that repeats its sequence for the same `seed` (any value, 0 included).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// A generator seeded from the clock and a stack address, so that gateways started together,
    /// and threads started in the same nanosecond, draw different sequences.
    pub fn from_time() -> Rng {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let local = 0u8;
        Rng::new(nanos ^ (&local as *const u8 as u64).rotate_left(32))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform enough in `0..n` for tests and jitter (0 when `n == 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_repeats_its_sequence_and_zero_is_a_seed() {
        let (mut a, mut b) = (Rng::new(0), Rng::new(0));
        let first: Vec<u64> = (0..4).map(|_| a.next_u64()).collect();
        assert_eq!(first, (0..4).map(|_| b.next_u64()).collect::<Vec<_>>());
        assert!(first.iter().all(|&x| x != 0), "{first:?}");
        assert_ne!(Rng::new(1).next_u64(), Rng::new(2).next_u64());
        assert_eq!(Rng::new(7).below(0), 0);
        assert!((0..1000).all(|_| a.below(10) < 10));
    }
}
