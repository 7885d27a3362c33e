//! Paged KV accounting: a fixed pool of blocks of `block_tokens` tokens.
//!
//! Invariant: `used <= total`; a request holds the blocks for its whole
//! context (prompt + `max_tokens`) from admission until it finishes or is
//! cancelled, so a running request never stalls for memory.

/// The KV-block pool of one worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockPool {
    block_tokens: u32,
    total: u64,
    used: u64,
}

impl BlockPool {
    /// A pool of `total` blocks of `block_tokens` tokens each.
    pub fn new(total: u64, block_tokens: u32) -> Self {
        Self {
            block_tokens: block_tokens.max(1),
            total,
            used: 0,
        }
    }

    /// Blocks a context of `tokens` tokens needs.
    pub fn blocks_for(&self, tokens: u64) -> u64 {
        tokens.div_ceil(u64::from(self.block_tokens))
    }

    /// Takes `n` blocks if that many are free.
    pub fn try_allocate(&mut self, n: u64) -> bool {
        if self.total - self.used >= n {
            self.used += n;
            true
        } else {
            false
        }
    }

    /// Returns `n` blocks to the pool.
    pub fn release(&mut self, n: u64) {
        self.used = self.used.saturating_sub(n);
    }

    /// Blocks in use.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Blocks in the pool.
    pub fn total(&self) -> u64 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_until_full_and_releases() {
        let mut pool = BlockPool::new(10, 64);
        assert_eq!(pool.blocks_for(1), 1);
        assert_eq!(pool.blocks_for(64), 1);
        assert_eq!(pool.blocks_for(65), 2);
        assert!(pool.try_allocate(6));
        assert!(!pool.try_allocate(5));
        assert!(pool.try_allocate(4));
        assert_eq!(pool.used(), 10);
        pool.release(6);
        assert_eq!(pool.used(), 4);
        pool.release(100);
        assert_eq!(pool.used(), 0);
    }
}
