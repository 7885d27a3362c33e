//! A small seeded generator (splitmix64): the simulator's only source of
//! randomness, so one seed gives one result on every platform.

#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Exponential with the given rate (per second).
    pub fn exp(&mut self, rate: f64) -> f64 {
        -(1.0 - self.uniform()).ln() / rate
    }

    /// A length drawn uniformly from 80-100% of `nominal` (at least 1).
    pub fn length(&mut self, nominal: u32) -> u32 {
        let v = f64::from(nominal) * (0.8 + 0.2 * self.uniform());
        (v.round() as u32).clamp(1, nominal.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_lengths_stay_in_range() {
        let (mut a, mut b) = (Rng::new(3), Rng::new(3));
        let xs: Vec<u64> = (0..5).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..5).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        let mut r = Rng::new(9);
        for _ in 0..1000 {
            let l = r.length(1000);
            assert!((800..=1000).contains(&l), "{l}");
        }
        let mean: f64 = (0..20000).map(|_| r.exp(2.0)).sum::<f64>() / 20000.0;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
    }
}
