//! Attention: flash-attention kernels (`kernels/attention.cu`: online softmax over key tiles,
//! the scores never stored) with key multiplicities for the text keys.
//!
//! The backend's [`Precision`] picks the kernel family:
//! - `F32`: `attention_f32_d{32,64,128}`, every product in f32 on the SIMT cores (parity with
//!   the CPU to ~1e-6); tiles of 64 queries × 64 keys, 256 threads.
//! - `Bf16`: `attention_bf16_d{32,64,128}`, Q·Kᵀ and P·V on bf16 tensor cores
//!   (`mma.sync.m16n8k16`, f32 accumulation; Q, K, V and the probabilities rounded to bf16),
//!   softmax in f32; tiles of 128 queries × 64 keys, 256 threads, the next key tile read while
//!   the current one is computed on.
//!
//! Both are instantiated for head widths 32, 64 and 128: a head of width d runs in the smallest
//! bucket D ≥ d, its columns past d zero in shared memory. Heads wider than 128 are refused
//! (Wan's are 128). One block per (query tile, head, batch item), query tile fastest, so that
//! neighbouring blocks read the same keys and values.

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{Cuda, Precision, Tensor, dim};
use crate::backend::shapes;
use crate::error::{Error, Result};

/// The widest head the kernels take (their largest bucket).
const MAX_HEAD_DIM: usize = 128;

/// Shared memory a block may use without opting in per kernel.
const DEFAULT_SHARED_LIMIT: u32 = 48 << 10;

/// Sequence lengths past this would overflow the kernels' `int` tile arithmetic.
const MAX_SEQ: usize = i32::MAX as usize - 256;

/// Threads of a block (both families).
const THREADS: u32 = 256;

/// Keys per tile (both families).
const KEY_TILE: usize = 64;

/// One kernel family's tile geometry, as `kernels/attention.cu` defines it.
struct Family {
    prefix: &'static str,
    /// Queries per block.
    queries: usize,
    /// Bytes per element of the staged Q, K and V tiles.
    element: usize,
    /// Padding of a staged row, in elements.
    pad: usize,
    /// Whether K and V share one staging buffer (the f32 kernel) or have one each (bf16).
    shared_kv: bool,
}

const F32: Family = Family {
    prefix: "attention_f32",
    queries: 64,
    element: 4,
    pad: 1,
    shared_kv: true,
};

const BF16: Family = Family {
    prefix: "attention_bf16",
    queries: 128,
    element: 2,
    pad: 8,
    shared_kv: false,
};

impl Family {
    /// Dynamic shared memory of a block for head bucket `bucket`: the Q tile, the K/V tile(s)
    /// and the tile's key weights (f32).
    fn shared_bytes(&self, bucket: usize) -> usize {
        let kv_tiles = if self.shared_kv { 1 } else { 2 };
        (self.queries + kv_tiles * KEY_TILE) * (bucket + self.pad) * self.element + KEY_TILE * 4
    }
}

/// The kernels' head-width bucket for width `d` (at most [`MAX_HEAD_DIM`]).
fn bucket(d: usize) -> usize {
    match d {
        0..=32 => 32,
        33..=64 => 64,
        _ => 128,
    }
}

/// Softmax attention `q[B, Lq, H, d]`, `k`, `v` `[B, Lk, H, d]` -> `[B, Lq, H, d]`, scale
/// `1/√d`, with optional key multiplicities `[B, Lk]` (a key of multiplicity m counts m times;
/// 0 takes no part, and a row with no key taking part is NaN, like the CPU's 0/0).
pub(super) fn attention(
    b: &Cuda,
    q: &Tensor<Cuda>,
    k: &Tensor<Cuda>,
    v: &Tensor<Cuda>,
    key_multiplicity: Option<&Tensor<Cuda>>,
) -> Result<Tensor<Cuda>> {
    let [batch, lq, lk, h, d] = shapes::attention(q, k, v, key_multiplicity)?;
    let (qs, ks, vs) = (
        Cuda::f32_of(q, "attention")?,
        Cuda::f32_of(k, "attention")?,
        Cuda::f32_of(v, "attention")?,
    );
    let mult = key_multiplicity
        .map(|m| Cuda::f32_of(m, "attention"))
        .transpose()?;
    if d > MAX_HEAD_DIM {
        return Err(Error::shape(
            "attention",
            format!("head width {d}: the CUDA kernels take at most {MAX_HEAD_DIM}"),
        ));
    }
    if lq > MAX_SEQ || lk > MAX_SEQ {
        return Err(Error::shape(
            "attention",
            format!("sequence lengths {lq}, {lk} exceed {MAX_SEQ}"),
        ));
    }
    let mut out = b.output(vec![batch, lq, h, d])?;
    if out.numel() == 0 {
        return Ok(out);
    }
    let family = match b.precision() {
        Precision::F32 => &F32,
        Precision::Bf16 => &BF16,
    };
    let d_bucket = bucket(d);
    let name = format!("{}_d{d_bucket}", family.prefix);
    let blocks = lq.div_ceil(family.queries) * h * batch;
    let grid = u32::try_from(blocks)
        .ok()
        .filter(|&g| g <= i32::MAX as u32)
        .ok_or_else(|| {
            Error::shape(
                "attention",
                format!("{blocks} blocks exceed the grid (q {:?})", q.shape()),
            )
        })?;
    let smem = family.shared_bytes(d_bucket) as u32;
    if smem > DEFAULT_SHARED_LIMIT {
        b.func(&name)?
            .set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(|e| b.err(&format!("raising the shared memory limit of {name}"), e))?;
    }
    let cfg = LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem,
    };
    let (lq32, lk32, h32, d32) = (
        dim("attention", lq)?,
        dim("attention", lk)?,
        dim("attention", h)?,
        dim("attention", d)?,
    );
    let has_mult = i32::from(mult.is_some());
    let scale = 1.0 / (d as f32).sqrt();
    let os = Cuda::f32_mut(&mut out, "attention")?;
    b.launch(&name, cfg, |l| {
        // Without multiplicities the kernel never reads its `mult` pointer: q stands in.
        l.arg(qs)
            .arg(ks)
            .arg(vs)
            .arg(mult.unwrap_or(qs))
            .arg(&has_mult)
            .arg(os)
            .arg(&lq32)
            .arg(&lk32)
            .arg(&h32)
            .arg(&d32)
            .arg(&scale);
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_head_width() {
        assert_eq!(bucket(1), 32);
        assert_eq!(bucket(32), 32);
        assert_eq!(bucket(33), 64);
        assert_eq!(bucket(48), 64);
        assert_eq!(bucket(64), 64);
        assert_eq!(bucket(65), 128);
        assert_eq!(bucket(128), 128);
    }

    #[test]
    fn shared_memory_matches_the_kernels_layout() {
        // f32: Q [64][D+1] and one K/V buffer [64][D+1] in f32, key weights [64].
        assert_eq!(F32.shared_bytes(128), 128 * 129 * 4 + 256);
        assert_eq!(F32.shared_bytes(32), 128 * 33 * 4 + 256);
        // bf16: Q [128][D+8], K and V [64][D+8] in bf16, key weights [64] f32.
        assert_eq!(BF16.shared_bytes(128), 256 * 136 * 2 + 256);
        assert_eq!(BF16.shared_bytes(64), 256 * 72 * 2 + 256);
        // Within what every supported GPU (8.6 and 8.9: 99 KiB a block) allows.
        assert!(F32.shared_bytes(128).max(BF16.shared_bytes(128)) <= 99 << 10);
    }
}
