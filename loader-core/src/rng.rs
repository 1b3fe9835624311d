//! Randomness that is a pure function of its inputs (seed, epoch, step or sample), so
//! that resume and any worker count reproduce it exactly.

/// Sebastiano Vigna's splitmix64 finaliser: a bijective mix of 64 bits.
pub(crate) fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A stream of uniform numbers keyed by a few words.
pub(crate) struct Stream(u64);

impl Stream {
    /// The stream of `(domain, a, b, c)`: different keys give unrelated streams.
    pub(crate) fn new(domain: u64, a: u64, b: u64, c: u64) -> Self {
        Self(splitmix64(splitmix64(splitmix64(domain ^ a) ^ b) ^ c))
    }

    /// The next 64 bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        splitmix64(self.0)
    }

    /// Uniform in [0, 1).
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi).
    pub(crate) fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// Uniform integer in 0..=n.
    pub(crate) fn upto(&mut self, n: u64) -> u64 {
        ((self.unit() * (n as f64 + 1.0)) as u64).min(n)
    }
}
