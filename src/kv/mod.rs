//! Paged KV cache: K and V for every layer live in one pool of fixed-size blocks (16 tokens by
//! default) sized from a memory budget. Each sequence has a block table; blocks are
//! ref-counted so a session's image prefix is shared by all its prompts (fork), the last
//! partial block is copied on write, and blocks that fall wholly outside the sliding window are
//! released. Attention reads K/V through the block table (see [`attention`]).

pub mod attention;
mod pool;

pub use pool::{BlockId, BlockPool};

use crate::{Error, Result};
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvConfig {
    pub num_layers: usize,
    /// Width of one token's K (or V) in one layer: kv_heads * head_dim.
    pub kv_dim: usize,
    pub block_size: usize,
    pub num_blocks: usize,
}

impl KvConfig {
    /// As many blocks as fit in `budget_bytes` with elements of `elem_bytes` (4 on the CPU).
    pub fn from_budget(
        num_layers: usize,
        kv_dim: usize,
        block_size: usize,
        elem_bytes: usize,
        budget_bytes: usize,
    ) -> Result<Self> {
        let per_block = 2 * num_layers * block_size * kv_dim * elem_bytes;
        if per_block == 0 {
            return Err(Error::Input(
                "KV cache geometry has a zero dimension".into(),
            ));
        }
        let num_blocks = budget_bytes / per_block;
        if num_blocks == 0 {
            return Err(Error::OutOfMemory(format!(
                "KV budget of {budget_bytes} bytes holds no block ({per_block} bytes each)"
            )));
        }
        Ok(KvConfig {
            num_layers,
            kv_dim,
            block_size,
            num_blocks,
        })
    }

    pub fn bytes_per_block(&self, elem_bytes: usize) -> usize {
        2 * self.num_layers * self.block_size * self.kv_dim * elem_bytes
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u32);

#[derive(Debug, Clone, Default)]
struct Sequence {
    /// Block per logical block index; `None` once released by the sliding window.
    blocks: Vec<Option<BlockId>>,
    len: usize,
}

/// The paged cache: block tables, ref-counts and (on the CPU) the f32 K/V data.
///
/// A metadata-only cache ([`PagedKvCache::metadata_only`]) keeps the bookkeeping for K/V that
/// live elsewhere (the CUDA executor's device pool, same block ids): it holds no K/V storage and
/// records every copy-on-write block copy instead of performing it, for the owner of the data to
/// replay ([`take_block_copies`](PagedKvCache::take_block_copies)).
pub struct PagedKvCache {
    cfg: KvConfig,
    pool: BlockPool,
    k: Vec<f32>,
    v: Vec<f32>,
    seqs: HashMap<SeqId, Sequence>,
    next_id: u32,
    /// `Some` for a metadata-only cache: `(src, dst)` block copies not yet replayed.
    copies: Option<Vec<(BlockId, BlockId)>>,
    /// Process-unique, so a device pool can tell which cache it mirrors.
    instance: u64,
}

fn next_instance() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl PagedKvCache {
    pub fn new(cfg: KvConfig) -> Result<Self> {
        let elems = cfg
            .num_blocks
            .checked_mul(cfg.num_layers * cfg.block_size * cfg.kv_dim)
            .ok_or_else(|| Error::OutOfMemory("KV cache size overflows".into()))?;
        Ok(PagedKvCache {
            cfg,
            pool: BlockPool::new(cfg.num_blocks),
            k: vec![0.0; elems],
            v: vec![0.0; elems],
            seqs: HashMap::new(),
            next_id: 0,
            copies: None,
            instance: next_instance(),
        })
    }

    /// Bookkeeping only, for K/V stored on a device: no host K/V memory; `write`, `write_rows`
    /// and CPU paged attention are errors; copy-on-write copies are recorded, not performed.
    pub fn metadata_only(cfg: KvConfig) -> Self {
        PagedKvCache {
            cfg,
            pool: BlockPool::new(cfg.num_blocks),
            k: Vec::new(),
            v: Vec::new(),
            seqs: HashMap::new(),
            next_id: 0,
            copies: Some(Vec::new()),
            instance: next_instance(),
        }
    }

    /// True for a [`metadata_only`](Self::metadata_only) cache.
    pub fn is_metadata_only(&self) -> bool {
        self.copies.is_some()
    }

    /// Identifies this cache (unique in the process).
    pub fn instance_id(&self) -> u64 {
        self.instance
    }

    /// The copy-on-write block copies `(src, dst)` recorded since the last call, in order: the
    /// owner of the K/V data must copy every layer of block src into dst before writing to dst.
    /// Always empty for a cache that holds its own data.
    pub fn take_block_copies(&mut self) -> Vec<(BlockId, BlockId)> {
        self.copies.as_mut().map(std::mem::take).unwrap_or_default()
    }

    pub fn config(&self) -> &KvConfig {
        &self.cfg
    }

    pub fn blocks_in_use(&self) -> usize {
        self.pool.in_use()
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    pub fn new_sequence(&mut self) -> SeqId {
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.seqs.insert(id, Sequence::default());
        id
    }

    fn seq(&self, s: SeqId) -> Result<&Sequence> {
        self.seqs
            .get(&s)
            .ok_or_else(|| Error::Input(format!("unknown KV sequence {}", s.0)))
    }

    pub fn len(&self, s: SeqId) -> Result<usize> {
        Ok(self.seq(s)?.len)
    }

    pub fn block_table(&self, s: SeqId) -> Result<&[Option<BlockId>]> {
        Ok(&self.seq(s)?.blocks)
    }

    /// A new sequence sharing every block of `s` (the shared prefix costs no memory).
    pub fn fork(&mut self, s: SeqId) -> Result<SeqId> {
        let parent = self.seq(s)?.clone();
        for b in parent.blocks.iter().flatten() {
            self.pool.retain(*b);
        }
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.seqs.insert(id, parent);
        Ok(id)
    }

    pub fn free(&mut self, s: SeqId) -> Result<()> {
        let seq = self
            .seqs
            .remove(&s)
            .ok_or_else(|| Error::Input(format!("unknown KV sequence {}", s.0)))?;
        for b in seq.blocks.into_iter().flatten() {
            self.pool.release(b);
        }
        Ok(())
    }

    fn block_elems(&self) -> usize {
        self.cfg.block_size * self.cfg.kv_dim
    }

    /// Start of (block, layer) in the K/V arrays.
    fn base(&self, b: BlockId, layer: usize) -> usize {
        (b as usize * self.cfg.num_layers + layer) * self.block_elems()
    }

    /// Makes room for `n` more tokens: allocates blocks, and copies a shared last partial block
    /// before it is written (copy on write). On pool exhaustion nothing is changed.
    pub fn append(&mut self, s: SeqId, n: usize) -> Result<()> {
        let bs = self.cfg.block_size;
        let seq = self.seq(s)?.clone();
        let new_len = seq.len + n;
        let need_blocks = new_len.div_ceil(bs);
        let cow = seq.len % bs != 0
            && n > 0
            && seq
                .blocks
                .last()
                .copied()
                .flatten()
                .map(|b| self.pool.refcount(b) > 1)
                == Some(true);
        let fresh = need_blocks - seq.blocks.len() + usize::from(cow);
        if fresh > self.pool.capacity() - self.pool.in_use() {
            return Err(Error::OutOfMemory(format!(
                "KV cache pool exhausted: {} more blocks needed for {n} tokens, {} of {} free \
                 (raise the KV memory budget or shorten the prompt)",
                fresh,
                self.pool.capacity() - self.pool.in_use(),
                self.pool.capacity()
            )));
        }
        let mut blocks = seq.blocks;
        if cow {
            if let Some(Some(old)) = blocks.last().copied() {
                let new = self.pool.alloc()?;
                if let Some(copies) = &mut self.copies {
                    copies.push((old, new));
                } else {
                    for layer in 0..self.cfg.num_layers {
                        let (src, dst) = (self.base(old, layer), self.base(new, layer));
                        let len = (seq.len % bs) * self.cfg.kv_dim;
                        self.k.copy_within(src..src + len, dst);
                        self.v.copy_within(src..src + len, dst);
                    }
                }
                self.pool.release(old);
                if let Some(last) = blocks.last_mut() {
                    *last = Some(new);
                }
            }
        }
        while blocks.len() < need_blocks {
            blocks.push(Some(self.pool.alloc()?));
        }
        let entry = self
            .seqs
            .get_mut(&s)
            .ok_or_else(|| Error::Input("sequence vanished".into()))?;
        entry.blocks = blocks;
        entry.len = new_len;
        Ok(())
    }

    fn slot(&self, s: SeqId, pos: usize) -> Result<(BlockId, usize)> {
        let seq = self.seq(s)?;
        if pos >= seq.len {
            return Err(Error::Input(format!(
                "KV position {pos} beyond sequence length {}",
                seq.len
            )));
        }
        let bs = self.cfg.block_size;
        let b = seq.blocks[pos / bs].ok_or_else(|| {
            Error::Input(format!(
                "KV position {pos} was released by the sliding window"
            ))
        })?;
        Ok((b, pos % bs))
    }

    /// Writes one token's K and V for `layer`. The block must not be shared (append ensures
    /// that for newly appended positions).
    pub fn write(
        &mut self,
        s: SeqId,
        layer: usize,
        pos: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<()> {
        let d = self.cfg.kv_dim;
        if k.len() != d || v.len() != d || layer >= self.cfg.num_layers {
            return Err(Error::shape(
                "kv write",
                format!(
                    "k/v of {}/{} for kv_dim {d}, layer {layer}",
                    k.len(),
                    v.len()
                ),
            ));
        }
        if self.is_metadata_only() {
            return Err(Error::Graph(
                "this KV cache is metadata-only (its K/V live on a device)".into(),
            ));
        }
        let (b, slot) = self.slot(s, pos)?;
        if self.pool.refcount(b) > 1 {
            return Err(Error::Graph(format!(
                "KV block {b} is shared; write needs copy on write first"
            )));
        }
        let at = self.base(b, layer) + slot * d;
        self.k[at..at + d].copy_from_slice(k);
        self.v[at..at + d].copy_from_slice(v);
        Ok(())
    }

    /// Writes K/V rows for `count` consecutive positions starting at `pos` (rows of kv_dim).
    pub fn write_rows(
        &mut self,
        s: SeqId,
        layer: usize,
        pos: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<()> {
        let d = self.cfg.kv_dim;
        if k.len() != v.len() || !k.len().is_multiple_of(d) {
            return Err(Error::shape(
                "kv write_rows",
                format!("k {} / v {} not rows of {d}", k.len(), v.len()),
            ));
        }
        for (i, (kr, vr)) in k.chunks(d).zip(v.chunks(d)).enumerate() {
            self.write(s, layer, pos + i, kr, vr)?;
        }
        Ok(())
    }

    /// K and V of one (block, layer): `[block_size, kv_dim]` each (empty for a block outside
    /// the pool or a metadata-only cache).
    pub fn block(&self, b: BlockId, layer: usize) -> (&[f32], &[f32]) {
        let at = self.base(b, layer);
        let n = self.block_elems();
        match (self.k.get(at..at + n), self.v.get(at..at + n)) {
            (Some(k), Some(v)) => (k, v),
            _ => (&[], &[]),
        }
    }

    /// Releases blocks holding only positions `< first_needed` (no later query can see them
    /// under the sliding window). Returns how many blocks this sequence let go.
    pub fn release_before(&mut self, s: SeqId, first_needed: usize) -> Result<usize> {
        let bs = self.cfg.block_size;
        let seq = self
            .seqs
            .get_mut(&s)
            .ok_or_else(|| Error::Input(format!("unknown KV sequence {}", s.0)))?;
        let whole = (first_needed / bs).min(seq.blocks.len());
        let mut released = 0;
        for slot in &mut seq.blocks[..whole] {
            if let Some(b) = slot.take() {
                self.pool.release(b);
                released += 1;
            }
        }
        Ok(released)
    }

    /// Every block's count equals the number of table entries naming it, and the free list
    /// agrees. Used by tests after random operation sequences.
    pub fn check_consistency(&self) -> std::result::Result<(), String> {
        self.pool.check()?;
        let mut refs = vec![0u32; self.pool.capacity()];
        for seq in self.seqs.values() {
            if seq.blocks.len() != seq.len.div_ceil(self.cfg.block_size) {
                return Err(format!(
                    "table of {} blocks for {} tokens",
                    seq.blocks.len(),
                    seq.len
                ));
            }
            for b in seq.blocks.iter().flatten() {
                refs[*b as usize] += 1;
            }
        }
        for (b, &r) in refs.iter().enumerate() {
            if self.pool.refcount(b as BlockId) != r {
                return Err(format!(
                    "block {b}: refcount {} but {r} references",
                    self.pool.refcount(b as BlockId)
                ));
            }
        }
        Ok(())
    }
}
