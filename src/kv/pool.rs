//! A pool of fixed-size KV blocks with reference counts, so sequences can share a prefix.

use crate::{Error, Result};

pub type BlockId = u32;

#[derive(Debug, Clone)]
pub struct BlockPool {
    refcounts: Vec<u32>,
    free: Vec<BlockId>,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> Self {
        BlockPool {
            refcounts: vec![0; num_blocks],
            // Pop from the end: hand out low ids first, which keeps tests readable.
            free: (0..num_blocks as BlockId).rev().collect(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.refcounts.len()
    }

    pub fn in_use(&self) -> usize {
        self.capacity() - self.free.len()
    }

    pub fn refcount(&self, b: BlockId) -> u32 {
        self.refcounts.get(b as usize).copied().unwrap_or(0)
    }

    pub fn alloc(&mut self) -> Result<BlockId> {
        let b = self.free.pop().ok_or_else(|| {
            Error::OutOfMemory(format!(
                "KV cache pool exhausted: all {} blocks are in use (raise the KV memory budget or shorten the prompt)",
                self.capacity()
            ))
        })?;
        self.refcounts[b as usize] = 1;
        Ok(b)
    }

    pub fn retain(&mut self, b: BlockId) {
        self.refcounts[b as usize] += 1;
    }

    /// Drops one reference; the block returns to the free list at zero.
    pub fn release(&mut self, b: BlockId) {
        let rc = &mut self.refcounts[b as usize];
        debug_assert!(*rc > 0, "release of a free block {b}");
        *rc = rc.saturating_sub(1);
        if *rc == 0 {
            self.free.push(b);
        }
    }

    /// Free list and counts agree: every block is free exactly when its count is zero.
    pub fn check(&self) -> std::result::Result<(), String> {
        let mut is_free = vec![false; self.capacity()];
        for &b in &self.free {
            if std::mem::replace(&mut is_free[b as usize], true) {
                return Err(format!("block {b} is on the free list twice"));
            }
        }
        for (b, (&rc, &f)) in self.refcounts.iter().zip(&is_free).enumerate() {
            if (rc == 0) != f {
                return Err(format!("block {b}: refcount {rc} but free={f}"));
            }
        }
        Ok(())
    }
}
