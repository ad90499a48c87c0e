//! Paged KV cache: block accounting under random operations, copy on write, sliding-window
//! release, and paged attention against a plain attention over contiguous K/V.

use xsam::kv::attention::paged_attention;
use xsam::kv::{KvConfig, PagedKvCache, SeqId};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // SplitMix64.
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn normal_vec(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0)
            .collect()
    }
}

fn cfg(blocks: usize) -> KvConfig {
    KvConfig {
        num_layers: 2,
        kv_dim: 8,
        block_size: 4,
        num_blocks: blocks,
    }
}

/// Reference: causal (windowed) attention of query positions over contiguous K/V, in f64.
fn reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    q_pos0: usize,
    heads: usize,
    hd: usize,
    window: usize,
) -> Vec<f32> {
    let width = heads * hd;
    let tq = q.len() / width;
    let mut out = vec![0f32; q.len()];
    for i in 0..tq {
        let p = q_pos0 + i;
        for h in 0..heads {
            let keys: Vec<usize> = (0..=p).filter(|&j| p - j < window).collect();
            let s: Vec<f64> = keys
                .iter()
                .map(|&j| {
                    (0..hd)
                        .map(|c| {
                            q[i * width + h * hd + c] as f64 * k[j * width + h * hd + c] as f64
                        })
                        .sum::<f64>()
                        / (hd as f64).sqrt()
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for c in 0..hd {
                let a: f64 = keys
                    .iter()
                    .zip(&e)
                    .map(|(&j, w)| w * v[j * width + h * hd + c] as f64)
                    .sum();
                out[i * width + h * hd + c] = (a / z) as f32;
            }
        }
    }
    out
}

fn assert_close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!(x.is_finite() && (x - y).abs() <= tol, "{x} vs {y}");
    }
}

#[test]
fn random_operations_never_leak_blocks() {
    let mut rng = Rng(7);
    let mut cache = PagedKvCache::new(cfg(64)).unwrap();
    let mut live: Vec<SeqId> = vec![];
    let mut exhausted = 0;
    for _ in 0..5000 {
        match rng.below(5) {
            0 => live.push(cache.new_sequence()),
            1 if !live.is_empty() => {
                let s = live[rng.below(live.len())];
                live.push(cache.fork(s).unwrap());
            }
            2 if !live.is_empty() => {
                let s = live[rng.below(live.len())];
                let before = cache.blocks_in_use();
                match cache.append(s, 1 + rng.below(9)) {
                    Ok(()) => {}
                    Err(e) => {
                        // Exhaustion is a clean error that changes nothing.
                        assert!(e.to_string().contains("exhausted"), "{e}");
                        assert_eq!(cache.blocks_in_use(), before);
                        exhausted += 1;
                    }
                }
            }
            3 if !live.is_empty() => {
                let s = live.swap_remove(rng.below(live.len()));
                cache.free(s).unwrap();
            }
            4 if !live.is_empty() => {
                let s = live[rng.below(live.len())];
                let len = cache.len(s).unwrap();
                cache.release_before(s, rng.below(len + 1)).unwrap();
            }
            _ => {}
        }
        cache.check_consistency().unwrap();
    }
    assert!(
        exhausted > 0,
        "the test should drive the pool to exhaustion at least once"
    );
    for s in live.drain(..) {
        cache.free(s).unwrap();
    }
    cache.check_consistency().unwrap();
    assert_eq!(cache.blocks_in_use(), 0, "blocks leaked");
    assert!(cache.free(SeqId(999_999)).is_err());
}

/// Fills `n` new positions of `s` (all layers) and returns the rows written for layer 0.
fn fill(cache: &mut PagedKvCache, s: SeqId, n: usize, rng: &mut Rng) -> (Vec<f32>, Vec<f32>) {
    let d = cache.config().kv_dim;
    let start = cache.len(s).unwrap();
    cache.append(s, n).unwrap();
    let (mut k0, mut v0) = (vec![], vec![]);
    for layer in 0..cache.config().num_layers {
        let k = rng.normal_vec(n * d);
        let v = rng.normal_vec(n * d);
        cache.write_rows(s, layer, start, &k, &v).unwrap();
        if layer == 0 {
            k0 = k;
            v0 = v;
        }
    }
    (k0, v0)
}

#[test]
fn forked_prefix_shares_blocks_and_matches_independent_sequences() {
    let mut rng = Rng(11);
    let (heads, hd) = (2, 4);
    let mut shared = PagedKvCache::new(cfg(64)).unwrap();
    let prefix = shared.new_sequence();
    let (pk, pv) = fill(&mut shared, prefix, 10, &mut rng); // 10 tokens: 2.5 blocks, last partial
    let a = shared.fork(prefix).unwrap();
    let b = shared.fork(prefix).unwrap();
    shared.free(prefix).unwrap();
    let (ak, av) = fill(&mut shared, a, 5, &mut rng);
    let (bk, bv) = fill(&mut shared, b, 7, &mut rng);
    shared.check_consistency().unwrap();

    // The same two sequences built independently.
    let mut indep = PagedKvCache::new(cfg(64)).unwrap();
    for (sk, sv, seq) in [(&ak, &av, a), (&bk, &bv, b)] {
        let s = indep.new_sequence();
        let k: Vec<f32> = pk.iter().chain(sk.iter()).copied().collect();
        let v: Vec<f32> = pv.iter().chain(sv.iter()).copied().collect();
        indep.append(s, k.len() / 8).unwrap();
        for layer in 0..2 {
            indep.write_rows(s, layer, 0, &k, &v).unwrap();
        }
        let len = k.len() / 8;
        let q = rng.normal_vec(len * heads * hd);
        for window in [usize::MAX, 3, 6] {
            let w = (window != usize::MAX).then_some(window);
            let mut o1 = vec![f32::NAN; q.len()];
            let mut o2 = vec![f32::NAN; q.len()];
            paged_attention(&shared, seq, 0, &q, 0, heads, hd, 0.5, w, &mut o1).unwrap();
            paged_attention(&indep, s, 0, &q, 0, heads, hd, 0.5, w, &mut o2).unwrap();
            assert_eq!(o1, o2);
            assert_close(&o1, &reference(&q, &k, &v, 0, heads, hd, window), 1e-5);
        }
    }
    // Prefix = 10 tokens in blocks of 4: two full blocks stay shared. `a` (15 tokens) writes
    // into the shared partial block first, so it copies it (CoW) and adds one more: 2 own.
    // `b` (17 tokens) is then the partial block's only owner, keeps it and adds two: 3 own.
    // Independent sequences need 4 + 5 blocks.
    assert_eq!(shared.blocks_in_use(), 2 + 2 + 3);
    assert_eq!(indep.blocks_in_use(), 4 + 5);
}

#[test]
fn decode_through_cache_equals_full_recompute_and_window_releases() {
    let mut rng = Rng(3);
    let (heads, hd, window) = (2, 4, 6);
    let mut cache = PagedKvCache::new(cfg(8)).unwrap();
    let s = cache.new_sequence();
    let (mut k, mut v) = fill(&mut cache, s, 9, &mut rng);
    for step in 0..40 {
        let (nk, nv) = fill(&mut cache, s, 1, &mut rng);
        k.extend(&nk);
        v.extend(&nv);
        let p = cache.len(s).unwrap() - 1;
        let q = rng.normal_vec(heads * hd);
        let mut o = vec![f32::NAN; q.len()];
        paged_attention(&cache, s, 0, &q, p, heads, hd, 0.5, Some(window), &mut o).unwrap();
        assert_close(&o, &reference(&q, &k, &v, p, heads, hd, window), 1e-5);
        // The next query is at p + 1 and sees keys from p + 2 - window on.
        cache
            .release_before(s, (p + 2).saturating_sub(window))
            .unwrap();
        // 49 tokens of 4-token blocks would need 13 blocks; the window keeps it within 8.
        assert!(
            cache.blocks_in_use() <= 3,
            "step {step}: {} blocks",
            cache.blocks_in_use()
        );
    }
    // Asking for released keys is an error, not garbage.
    let q = rng.normal_vec(heads * hd);
    let mut o = vec![0f32; q.len()];
    assert!(paged_attention(&cache, s, 0, &q, 10, heads, hd, 0.5, Some(window), &mut o).is_err());
}

#[test]
fn metadata_only_cache_records_copy_on_write_instead_of_copying() {
    use xsam::kv::{KvConfig, PagedKvCache};
    let cfg = KvConfig {
        num_layers: 2,
        kv_dim: 8,
        block_size: 4,
        num_blocks: 8,
    };
    let mut host = PagedKvCache::new(cfg).unwrap();
    let mut meta = PagedKvCache::metadata_only(cfg);
    assert!(meta.is_metadata_only() && !host.is_metadata_only());
    assert_ne!(host.instance_id(), meta.instance_id());
    let (a_h, a_m) = (host.new_sequence(), meta.new_sequence());
    host.append(a_h, 6).unwrap();
    meta.append(a_m, 6).unwrap();
    // No host K/V: writes are errors, not panics.
    assert!(meta.write_rows(a_m, 0, 0, &[0.0; 8], &[0.0; 8]).is_err());
    let (b_h, b_m) = (host.fork(a_h).unwrap(), meta.fork(a_m).unwrap());
    assert!(meta.take_block_copies().is_empty());
    // Appending to the fork's shared partial block copies it: recorded as (old, new).
    host.append(b_h, 1).unwrap();
    meta.append(b_m, 1).unwrap();
    let (ta, tb) = (
        meta.block_table(a_m).unwrap(),
        meta.block_table(b_m).unwrap(),
    );
    let (old, new) = (ta[1].unwrap(), tb[1].unwrap());
    assert_ne!(old, new);
    assert_eq!(meta.take_block_copies(), vec![(old, new)]);
    assert!(meta.take_block_copies().is_empty(), "drained");
    // Same bookkeeping as the data-holding cache; a full block is never copied.
    assert_eq!(
        host.block_table(b_h).unwrap(),
        meta.block_table(b_m).unwrap()
    );
    assert_eq!(host.take_block_copies(), vec![]);
    meta.append(b_m, 1).unwrap();
    assert!(meta.take_block_copies().is_empty());
    meta.check_consistency().unwrap();
}
