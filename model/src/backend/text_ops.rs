//! Operations of the text encoder (UMT5) that the core [`Backend`] does not have: embedding row
//! gather, attention with a relative-position bias, and the elementwise product of the gated
//! feed-forward. T5's RMS norm is the core `sum_squares` + `rms_apply`.

use rayon::prelude::*;

use super::cpu::{Cpu, CpuBuffer, gemm_strided};
use super::{Backend, Tensor, expect_rank, kernels};
use crate::error::{Error, Result};

/// Text-encoder operations, implemented by every backend that runs the UMT5 encoder.
pub trait TextOps: Backend {
    /// Rows `ids` of an embedding table `[V, D]` (any storage type) as f32 `[ids.len(), D]`.
    /// An id outside the table is an input error naming it.
    fn embedding(&self, table: &Tensor<Self>, ids: &[u32]) -> Result<Tensor<Self>>;

    /// Softmax attention with a relative-position bias and no mask: `q[B, Lq, H, d]`, `k`, `v`
    /// `[B, Lk, H, d]` -> `[B, Lq, H, d]`, with logits
    /// `scale · q[i]·k[j] + rel_bias[h, j − i + Lq − 1]` (`rel_bias[H, Lq + Lk − 1]`, one value
    /// per head and key-minus-query distance, shared by the batch).
    fn attention_rel_bias(
        &self,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        rel_bias: &Tensor<Self>,
        scale: f32,
    ) -> Result<Tensor<Self>>;

    /// `x *= y` elementwise (same shapes), in place.
    fn mul_assign(&self, x: &mut Tensor<Self>, y: &Tensor<Self>) -> Result<()>;
}

/// Elements per parallel task of a flat elementwise pass.
const FLAT_CHUNK: usize = 32_768;

impl TextOps for Cpu {
    fn embedding(&self, table: &Tensor<Self>, ids: &[u32]) -> Result<Tensor<Self>> {
        expect_rank("embedding", table, 2)?;
        let (rows, d) = (table.shape()[0], table.shape()[1]);
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= rows) {
            return Err(Error::input(
                "input_ids",
                format!("token id {bad} is outside the embedding table ({rows} rows)"),
            ));
        }
        let mut out = vec![0.0f32; ids.len() * d];
        let buf = table.buffer();
        out.par_chunks_mut(d)
            .zip(ids.par_iter())
            .for_each(|(o, &id)| {
                let r = id as usize * d..(id as usize + 1) * d;
                match buf {
                    CpuBuffer::F32(t) => o.copy_from_slice(&t[r]),
                    CpuBuffer::BF16(t) => {
                        o.iter_mut().zip(&t[r]).for_each(|(o, v)| *o = v.to_f32())
                    }
                    CpuBuffer::F16(t) => o.iter_mut().zip(&t[r]).for_each(|(o, v)| *o = v.to_f32()),
                }
            });
        Ok(Tensor::from_parts(CpuBuffer::F32(out), vec![ids.len(), d]))
    }

    fn attention_rel_bias(
        &self,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        rel_bias: &Tensor<Self>,
        scale: f32,
    ) -> Result<Tensor<Self>> {
        expect_rank("attention q", q, 4)?;
        let [b, lq, lk, h, d] = super::shapes::attention_rel_bias(q, k, v, rel_bias)?;
        fn f32_of(t: &Tensor<Cpu>) -> Result<&[f32]> {
            match t.buffer() {
                CpuBuffer::F32(s) => Ok(s),
                _ => Err(Error::shape("attention_rel_bias", "inputs must be f32")),
            }
        }
        let (qs, ks, vs, rel) = (f32_of(q)?, f32_of(k)?, f32_of(v)?, f32_of(rel_bias)?);
        let hd = h * d;
        let width = lq + lk - 1;
        // Query rows per task: a bounded score buffer (~1 MiB), at least 16 rows.
        let qc = (262_144 / lk).clamp(16, 256).min(lq);
        // Head-major result [B, H, Lq, d]: every (batch, head, query block) task owns a
        // contiguous block; one transposing pass gives [B, Lq, H, d].
        let mut heads = vec![0.0f32; b * h * lq * d];
        heads
            .par_chunks_mut(lq * d)
            .enumerate()
            .for_each(|(bh, head_out)| {
                let (bi, hi) = (bh / h, bh % h);
                let rel_h = &rel[hi * width..(hi + 1) * width];
                let koff = bi * lk * hd + hi * d;
                head_out.par_chunks_mut(qc * d).enumerate().for_each_init(
                    Vec::<f32>::new,
                    |scores, (ci, o)| {
                        let q0 = ci * qc;
                        let rows = o.len() / d;
                        scores.resize(rows * lk, 0.0);
                        let qoff = (bi * lq + q0) * hd + hi * d;
                        gemm_strided(
                            rows,
                            lk,
                            d,
                            scores,
                            lk,
                            false,
                            &qs[qoff..],
                            hd,
                            1,
                            &ks[koff..],
                            1,
                            hd,
                            scale,
                            false,
                        );
                        kernels::softmax_rel_bias_rows(scores, lk, rel_h, lq - 1 - q0);
                        gemm_strided(
                            rows,
                            d,
                            lk,
                            o,
                            d,
                            false,
                            scores,
                            lk,
                            1,
                            &vs[koff..],
                            hd,
                            1,
                            1.0,
                            false,
                        );
                    },
                );
            });
        let mut out = vec![0.0f32; b * lq * hd];
        out.par_chunks_mut(hd).enumerate().for_each(|(row, o)| {
            let (bi, i) = (row / lq, row % lq);
            for (hi, oh) in o.chunks_exact_mut(d).enumerate() {
                let src = ((bi * h + hi) * lq + i) * d;
                oh.copy_from_slice(&heads[src..src + d]);
            }
        });
        Ok(Tensor::from_parts(CpuBuffer::F32(out), vec![b, lq, h, d]))
    }

    fn mul_assign(&self, x: &mut Tensor<Self>, y: &Tensor<Self>) -> Result<()> {
        if x.shape() != y.shape() {
            return Err(Error::shape(
                "mul_assign",
                format!("{:?} *= {:?}", x.shape(), y.shape()),
            ));
        }
        let CpuBuffer::F32(ys) = y.buffer() else {
            return Err(Error::shape("mul_assign", "activations must be f32"));
        };
        x.buffer_mut()
            .f32_mut("mul_assign")?
            .par_chunks_mut(FLAT_CHUNK)
            .zip(ys.par_chunks(FLAT_CHUNK))
            .for_each(|(xc, yc)| kernels::mul_rows(xc, yc));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward attention with the bias written out in full, for comparison.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        rel: &[f32],
        [b, lq, lk, h, d]: [usize; 5],
        scale: f32,
    ) -> Vec<f32> {
        let mut out = vec![0.0f32; b * lq * h * d];
        let width = lq + lk - 1;
        for bi in 0..b {
            for hi in 0..h {
                for i in 0..lq {
                    let mut s: Vec<f64> = (0..lk)
                        .map(|j| {
                            let dot: f64 = (0..d)
                                .map(|e| {
                                    q[((bi * lq + i) * h + hi) * d + e] as f64
                                        * k[((bi * lk + j) * h + hi) * d + e] as f64
                                })
                                .sum();
                            dot * scale as f64 + rel[hi * width + j + lq - 1 - i] as f64
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    s.iter_mut().for_each(|x| *x = (*x - m).exp());
                    let z: f64 = s.iter().sum();
                    for e in 0..d {
                        let o: f64 = (0..lk)
                            .map(|j| s[j] / z * v[((bi * lk + j) * h + hi) * d + e] as f64)
                            .sum();
                        out[((bi * lq + i) * h + hi) * d + e] = o as f32;
                    }
                }
            }
        }
        out
    }

    fn pseudo(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn relative_bias_attention_matches_naive() {
        // Lq = 300 spans two query blocks; Lk differs from Lq.
        for [b, lq, lk, h, d] in [[1, 7, 7, 3, 4], [2, 300, 5, 2, 8], [1, 40, 300, 1, 3]] {
            let q = pseudo(b * lq * h * d, 1);
            let k = pseudo(b * lk * h * d, 2);
            let v = pseudo(b * lk * h * d, 3);
            let rel = pseudo(h * (lq + lk - 1), 4);
            let up = |s: Vec<usize>, x: &Vec<f32>| Cpu.upload_f32(&s, x.clone()).unwrap();
            let got = Cpu
                .attention_rel_bias(
                    &up(vec![b, lq, h, d], &q),
                    &up(vec![b, lk, h, d], &k),
                    &up(vec![b, lk, h, d], &v),
                    &up(vec![h, lq + lk - 1], &rel),
                    0.7,
                )
                .unwrap();
            let want = naive(&q, &k, &v, &rel, [b, lq, lk, h, d], 0.7);
            let got = Cpu.download(&got).unwrap();
            let err = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(err < 1e-5, "{:?}: max error {err}", [b, lq, lk, h, d]);
        }
    }

    #[test]
    fn embedding_gathers_rows_and_rejects_bad_ids() {
        let table = Cpu
            .upload_f32(&[3, 2], vec![0., 1., 2., 3., 4., 5.])
            .unwrap();
        let e = Cpu.embedding(&table, &[2, 0, 2]).unwrap();
        assert_eq!(e.shape(), [3, 2]);
        assert_eq!(Cpu.download(&e).unwrap(), [4., 5., 0., 1., 4., 5.]);
        let err = Cpu.embedding(&table, &[3]).err().unwrap().to_string();
        assert!(err.contains("token id 3"), "{err}");
    }

    #[test]
    fn mul_assign_multiplies() {
        let mut x = Cpu.upload_f32(&[2, 2], vec![1., 2., 3., 4.]).unwrap();
        let y = Cpu.upload_f32(&[2, 2], vec![2., 0.5, -1., 0.]).unwrap();
        Cpu.mul_assign(&mut x, &y).unwrap();
        assert_eq!(Cpu.download(&x).unwrap(), [2., 1., -3., 0.]);
        let z = Cpu.upload_f32(&[4], vec![0.; 4]).unwrap();
        assert!(Cpu.mul_assign(&mut x, &z).is_err());
    }
}
