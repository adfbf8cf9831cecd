//! The 3-D rotary position embedding of Wan (wan21.md §1.5).

use crate::backend::{Backend, Tensor};
use crate::error::{Error, Result};

/// Per-axis angle tables, computed once per model in f64 and kept as f32, from which the
/// per-token cos/sin tables of any grid are assembled.
#[derive(Debug, Clone)]
pub struct RopeTables {
    /// Pair counts per axis: (t, h, w) widths of the head dimension, halved.
    pairs: [usize; 3],
    max_len: usize,
    /// `cos[axis][p * pairs[axis] + j]`, likewise `sin`.
    cos: [Vec<f32>; 3],
    sin: [Vec<f32>; 3],
}

impl RopeTables {
    /// Tables for head dimension `d` (even) and positions `0..max_len` on each axis.
    pub fn new(d: usize, max_len: usize) -> Self {
        let hw = 2 * (d / 6);
        let widths = [d - 2 * hw, hw, hw];
        let mut cos: [Vec<f32>; 3] = Default::default();
        let mut sin: [Vec<f32>; 3] = Default::default();
        for (axis, &width) in widths.iter().enumerate() {
            let half = width / 2;
            for p in 0..max_len {
                for j in 0..half {
                    let freq = 1.0 / 10000f64.powf((2 * j) as f64 / width as f64);
                    let a = p as f64 * freq;
                    cos[axis].push(a.cos() as f32);
                    sin[axis].push(a.sin() as f32);
                }
            }
        }
        RopeTables {
            pairs: widths.map(|w| w / 2),
            max_len,
            cos,
            sin,
        }
    }

    /// Per-token tables `[L, d/2]` for a grid of (frames, rows, columns), token index
    /// `(f·H + h)·W + w`, positions starting at 0 on every axis.
    pub fn for_grid<B: Backend>(
        &self,
        backend: &B,
        grid: [usize; 3],
    ) -> Result<(Tensor<B>, Tensor<B>)> {
        if let Some(axis) = (0..3).find(|&a| grid[a] > self.max_len) {
            return Err(Error::input(
                "hidden_states",
                format!(
                    "the patch grid {grid:?} exceeds rope_max_seq_len {} on axis {axis}",
                    self.max_len
                ),
            ));
        }
        let half: usize = self.pairs.iter().sum();
        let l = grid[0] * grid[1] * grid[2];
        let mut c = Vec::with_capacity(l * half);
        let mut s = Vec::with_capacity(l * half);
        for f in 0..grid[0] {
            for h in 0..grid[1] {
                for w in 0..grid[2] {
                    for (axis, p) in [f, h, w].into_iter().enumerate() {
                        let n = self.pairs[axis];
                        c.extend_from_slice(&self.cos[axis][p * n..(p + 1) * n]);
                        s.extend_from_slice(&self.sin[axis][p * n..(p + 1) * n]);
                    }
                }
            }
        }
        Ok((
            backend.upload_f32(&[l, half], c)?,
            backend.upload_f32(&[l, half], s)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_dim_128_splits_44_42_42() {
        let t = RopeTables::new(128, 4);
        assert_eq!(t.pairs, [22, 21, 21]);
        let t = RopeTables::new(12, 4);
        assert_eq!(t.pairs, [2, 2, 2]);
        let t = RopeTables::new(32, 4);
        assert_eq!(t.pairs, [6, 5, 5]);
    }
}
