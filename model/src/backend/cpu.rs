//! The CPU backend: the reference every other backend is held to.
//!
//! Matrix products go through the `gemm` crate (runtime-dispatched AVX-512/AVX2/NEON kernels);
//! everything else is a fused row kernel from `kernels`, parallel over the rayon pool. The pool
//! size (`RAYON_NUM_THREADS`, default: all cores) is the thread count.

use std::borrow::Cow;

use half::{bf16, f16};
use rayon::prelude::*;

use super::{Activation, Backend, ModRow, Modulation, Tensor, expect_rank, kernels};
use crate::dtype::{DType, HostSlice};
use crate::error::{Error, Result};

/// The CPU device. Stateless: threads come from the global rayon pool.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu;

/// Host memory in one storage type.
#[derive(Debug, Clone)]
pub enum CpuBuffer {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
}

impl CpuBuffer {
    /// The data as f32, borrowed when it already is.
    pub fn to_f32(&self) -> Cow<'_, [f32]> {
        match self {
            CpuBuffer::F32(v) => Cow::Borrowed(v),
            CpuBuffer::BF16(v) => Cow::Owned(v.par_iter().map(|x| x.to_f32()).collect()),
            CpuBuffer::F16(v) => Cow::Owned(v.par_iter().map(|x| x.to_f32()).collect()),
        }
    }

    fn f32(&self, op: &'static str) -> Result<&[f32]> {
        match self {
            CpuBuffer::F32(v) => Ok(v),
            _ => Err(Error::shape(op, "activations must be f32")),
        }
    }

    /// Mutable f32 data; activations are always f32.
    pub fn f32_mut(&mut self, op: &'static str) -> Result<&mut [f32]> {
        match self {
            CpuBuffer::F32(v) => Ok(v),
            _ => Err(Error::shape(op, "activations must be f32")),
        }
    }

    fn dtype(&self) -> DType {
        match self {
            CpuBuffer::F32(_) => DType::F32,
            CpuBuffer::BF16(_) => DType::BF16,
            CpuBuffer::F16(_) => DType::F16,
        }
    }
}

/// A raw pointer that may cross threads. Used only where parallel tasks write disjoint elements
/// of one output buffer with strides that `par_chunks_mut` cannot express.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub(crate) *mut f32);
// SAFETY: every user writes a set of elements disjoint from all other tasks' sets, and the
// buffer outlives the parallel scope that uses the pointer.
unsafe impl Send for SharedMut {}
// SAFETY: as above; no two tasks touch the same element.
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// Accessed through a method so closures capture the whole `Send + Sync` wrapper.
    pub(crate) fn ptr(self) -> *mut f32 {
        self.0
    }
}

pub(crate) fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// Rows per parallel task for a row kernel over rows of width `d`: about 32K elements a task.
pub(crate) fn rows_per_task(d: usize) -> usize {
    (32_768 / d.max(1)).max(1)
}

/// `dst[m, n] = beta · lhs · rhs` (or `dst += beta · lhs · rhs` when `accumulate`) with
/// explicit strides. Inputs must cover the addressed ranges.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[f32],
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: &[f32],
    rhs_rs: usize,
    rhs_cs: usize,
    beta: f32,
    parallel: bool,
) {
    // Checked in release builds too: the call below trusts these bounds.
    assert!(m == 0 || n == 0 || dst.len() > (m - 1) * dst_rs + n - 1);
    assert!(m == 0 || k == 0 || lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
    assert!(n == 0 || k == 0 || rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    let par = if parallel && threads() > 1 {
        gemm::Parallelism::Rayon(threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above check that every element addressed by the dimensions and strides
    // lies inside its slice; `dst` is exclusively borrowed and does not alias the inputs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            beta,
            false,
            false,
            false,
            par,
        );
    }
}

impl Cpu {
    fn tensor(&self, shape: Vec<usize>, data: Vec<f32>) -> Tensor<Self> {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Tensor::from_parts(CpuBuffer::F32(data), shape)
    }

    /// Per-batch rows `[B, D]` of a modulation table `[B, C, D]`.
    fn mod_rows<'a>(
        &self,
        m: &'a ModRow<'_, Self>,
        batch: usize,
        d: usize,
    ) -> Result<Vec<&'a [f32]>> {
        let t = m.table;
        expect_rank("modulation", t, 3)?;
        let [b, c, dd] = [t.shape()[0], t.shape()[1], t.shape()[2]];
        if b != batch || dd != d || m.index >= c {
            return Err(Error::shape(
                "modulation",
                format!(
                    "table {:?}, row {}, for batch {batch} width {d}",
                    t.shape(),
                    m.index
                ),
            ));
        }
        let data = t.buf.f32("modulation")?;
        Ok((0..b)
            .map(|i| &data[(i * c + m.index) * d..(i * c + m.index + 1) * d])
            .collect())
    }
}

impl Backend for Cpu {
    type Buffer = CpuBuffer;

    fn name(&self) -> String {
        format!("cpu ({} threads)", threads())
    }

    fn upload(&self, shape: &[usize], data: HostSlice<'_>) -> Result<Tensor<Self>> {
        if shape.iter().product::<usize>() != data.len() {
            return Err(Error::shape(
                "upload",
                format!("shape {shape:?} for {} elements", data.len()),
            ));
        }
        let buf = match data {
            HostSlice::F32(s) => CpuBuffer::F32(s.to_vec()),
            HostSlice::BF16(s) => CpuBuffer::BF16(s.to_vec()),
            HostSlice::F16(s) => CpuBuffer::F16(s.to_vec()),
        };
        Ok(Tensor::from_parts(buf, shape.to_vec()))
    }

    fn upload_f32(&self, shape: &[usize], data: Vec<f32>) -> Result<Tensor<Self>> {
        if shape.iter().product::<usize>() != data.len() {
            return Err(Error::shape(
                "upload",
                format!("shape {shape:?} for {} elements", data.len()),
            ));
        }
        Ok(self.tensor(shape.to_vec(), data))
    }

    fn download(&self, t: &Tensor<Self>) -> Result<Vec<f32>> {
        Ok(t.buf.to_f32().into_owned())
    }

    fn dtype(&self, t: &Tensor<Self>) -> DType {
        t.buf.dtype()
    }

    fn slice_rows(&self, t: &Tensor<Self>, start: usize, len: usize) -> Result<Tensor<Self>> {
        let rows = *t.shape().first().unwrap_or(&0);
        if start + len > rows {
            return Err(Error::shape(
                "slice_rows",
                format!("rows {start}..{} of {:?}", start + len, t.shape()),
            ));
        }
        let per = t.numel() / rows.max(1);
        let data = t.buf.f32("slice_rows")?[start * per..(start + len) * per].to_vec();
        let mut shape = t.shape().to_vec();
        shape[0] = len;
        Ok(self.tensor(shape, data))
    }

    fn concat_rows(&self, parts: &[Tensor<Self>]) -> Result<Tensor<Self>> {
        let first = parts
            .first()
            .ok_or_else(|| Error::shape("concat_rows", "no parts"))?;
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.numel()).sum());
        let mut rows = 0;
        for p in parts {
            if p.shape()[1..] != first.shape()[1..] {
                return Err(Error::shape(
                    "concat_rows",
                    format!("{:?} vs {:?}", p.shape(), first.shape()),
                ));
            }
            rows += p.shape()[0];
            data.extend_from_slice(p.buf.f32("concat_rows")?);
        }
        let mut shape = first.shape().to_vec();
        shape[0] = rows;
        Ok(self.tensor(shape, data))
    }

    fn linear(
        &self,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        act: Activation,
    ) -> Result<Tensor<Self>> {
        expect_rank("linear weight", w, 2)?;
        let (n, k) = (w.shape()[0], w.shape()[1]);
        if x.last_dim() != k || bias.is_some_and(|b| b.numel() != n) {
            return Err(Error::shape(
                "linear",
                format!(
                    "x {:?} · w {:?}ᵀ + bias {:?}",
                    x.shape(),
                    w.shape(),
                    bias.map(|b| b.shape().to_vec())
                ),
            ));
        }
        let m = x.numel() / k.max(1);
        let xs = x.buf.f32("linear")?;
        let ws = w.buf.to_f32();
        let mut out = vec![0.0f32; m * n];
        gemm_strided(m, n, k, &mut out, n, false, xs, k, 1, &ws, 1, k, 1.0, true);
        let bias = bias.map(|b| b.buf.to_f32());
        if bias.is_some() || act != Activation::Identity {
            let b = bias.as_deref();
            out.par_chunks_mut(n * rows_per_task(n))
                .for_each(|rows| kernels::bias_act(rows, n, b, act));
        }
        let mut shape = x.shape().to_vec();
        *shape.last_mut().expect("rank ≥ 1") = n;
        Ok(self.tensor(shape, out))
    }

    fn activate(&self, x: &mut Tensor<Self>, act: Activation) -> Result<()> {
        let n = x.last_dim();
        x.buf
            .f32_mut("activate")?
            .par_chunks_mut(n * rows_per_task(n))
            .for_each(|rows| kernels::bias_act(rows, n, None, act));
        Ok(())
    }

    fn modulation_table(&self, table: &Tensor<Self>, proj: &Tensor<Self>) -> Result<Tensor<Self>> {
        let (b, c, d, shared) = super::shapes::modulation_table(table, proj)?;
        let t = table.buf.to_f32();
        let p = proj.buf.f32("modulation_table")?;
        let mut out = Vec::with_capacity(b * c * d);
        for bi in 0..b {
            for ci in 0..c {
                let off = if shared { bi * d } else { (bi * c + ci) * d };
                out.extend(
                    t[ci * d..(ci + 1) * d]
                        .iter()
                        .zip(&p[off..off + d])
                        .map(|(a, b)| a + b),
                );
            }
        }
        Ok(self.tensor(vec![b, c, d], out))
    }

    fn layer_norm(
        &self,
        x: &Tensor<Self>,
        eps: f32,
        affine: Option<(&Tensor<Self>, &Tensor<Self>)>,
        modulation: Option<Modulation<'_, Self>>,
    ) -> Result<Tensor<Self>> {
        expect_rank("layer_norm", x, 3)?;
        let [b, l, d] = [x.shape()[0], x.shape()[1], x.shape()[2]];
        let xs = x.buf.f32("layer_norm")?;
        let aff = affine.map(|(w, bb)| (w.buf.to_f32(), bb.buf.to_f32()));
        if aff
            .as_ref()
            .is_some_and(|(w, bb)| w.len() != d || bb.len() != d)
        {
            return Err(Error::shape(
                "layer_norm",
                "affine parameters must have width D",
            ));
        }
        let mods = match &modulation {
            Some(m) => Some((
                self.mod_rows(&m.shift, b, d)?,
                self.mod_rows(&m.scale, b, d)?,
            )),
            None => None,
        };
        let mut out = vec![0.0f32; xs.len()];
        let rpt = rows_per_task(d);
        for bi in 0..b {
            let xb = &xs[bi * l * d..(bi + 1) * l * d];
            let ob = &mut out[bi * l * d..(bi + 1) * l * d];
            let aff = aff.as_ref().map(|(w, bb)| (&w[..], &bb[..]));
            let md = mods.as_ref().map(|(sh, sc)| (sh[bi], sc[bi]));
            ob.par_chunks_mut(rpt * d)
                .zip(xb.par_chunks(rpt * d))
                .for_each(|(o, xr)| kernels::layer_norm_rows(xr, o, d, eps, aff, md));
        }
        Ok(self.tensor(x.shape().to_vec(), out))
    }

    fn add_gated(
        &self,
        x: &mut Tensor<Self>,
        y: &Tensor<Self>,
        gate: Option<ModRow<'_, Self>>,
    ) -> Result<()> {
        if x.shape() != y.shape() {
            return Err(Error::shape(
                "add_gated",
                format!("{:?} += {:?}", x.shape(), y.shape()),
            ));
        }
        let ys = y.buf.f32("add_gated")?;
        let d = x.last_dim();
        match gate {
            None => {
                let xs = x.buf.f32_mut("add_gated")?;
                xs.par_chunks_mut(32_768)
                    .zip(ys.par_chunks(32_768))
                    .for_each(|(xc, yc)| kernels::add_gated_rows(xc, yc, d, None));
            }
            Some(g) => {
                expect_rank("add_gated", x, 3)?;
                let [b, l] = [x.shape()[0], x.shape()[1]];
                let gates = self.mod_rows(&g, b, d)?;
                let xs = x.buf.f32_mut("add_gated")?;
                let rpt = rows_per_task(d);
                for (bi, gate) in gates.iter().enumerate() {
                    let range = bi * l * d..(bi + 1) * l * d;
                    xs[range.clone()]
                        .par_chunks_mut(rpt * d)
                        .zip(ys[range].par_chunks(rpt * d))
                        .for_each(|(xc, yc)| kernels::add_gated_rows(xc, yc, d, Some(gate)));
                }
            }
        }
        Ok(())
    }

    fn sum_squares(&self, x: &Tensor<Self>) -> Result<Tensor<Self>> {
        let d = x.last_dim();
        let rows = x.numel() / d.max(1);
        let xs = x.buf.f32("sum_squares")?;
        let mut out = vec![0.0f32; rows];
        let rpt = rows_per_task(d);
        out.par_chunks_mut(rpt)
            .zip(xs.par_chunks(rpt * d))
            .for_each(|(o, xr)| kernels::sum_squares_rows(xr, d, o));
        let shape = x.shape()[..x.shape().len() - 1].to_vec();
        Ok(self.tensor(shape, out))
    }

    fn rms_apply(
        &self,
        x: &mut Tensor<Self>,
        sumsq: &Tensor<Self>,
        full_width: usize,
        eps: f32,
        weight: &Tensor<Self>,
    ) -> Result<()> {
        let d = x.last_dim();
        if weight.numel() != d || sumsq.numel() * d != x.numel() {
            return Err(Error::shape(
                "rms_apply",
                format!(
                    "x {:?}, sumsq {:?}, weight {:?}",
                    x.shape(),
                    sumsq.shape(),
                    weight.shape()
                ),
            ));
        }
        let w = weight.buf.to_f32();
        let s = sumsq.buf.f32("rms_apply")?;
        let rpt = rows_per_task(d);
        x.buf
            .f32_mut("rms_apply")?
            .par_chunks_mut(rpt * d)
            .zip(s.par_chunks(rpt))
            .for_each(|(xr, sr)| kernels::rms_apply_rows(xr, d, sr, full_width as f32, eps, &w));
        Ok(())
    }

    fn rope(&self, x: &mut Tensor<Self>, cos: &Tensor<Self>, sin: &Tensor<Self>) -> Result<()> {
        expect_rank("rope", x, 4)?;
        let [b, l, h, d] = [x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]];
        if cos.numel() != l * d / 2 || sin.numel() != l * d / 2 || d % 2 != 0 {
            return Err(Error::shape(
                "rope",
                format!(
                    "x {:?}, tables {:?}/{:?}",
                    x.shape(),
                    cos.shape(),
                    sin.shape()
                ),
            ));
        }
        let (c, s) = (cos.buf.f32("rope")?, sin.buf.f32("rope")?);
        let hd = h * d;
        let tpt = rows_per_task(hd);
        let xs = x.buf.f32_mut("rope")?;
        for bi in 0..b {
            xs[bi * l * hd..(bi + 1) * l * hd]
                .par_chunks_mut(tpt * hd)
                .enumerate()
                .for_each(|(ci, xc)| {
                    let t0 = ci * tpt;
                    let nt = xc.len() / hd;
                    let half = d / 2;
                    kernels::rope_rows(
                        xc,
                        hd,
                        d,
                        &c[t0 * half..(t0 + nt) * half],
                        &s[t0 * half..(t0 + nt) * half],
                    )
                });
        }
        Ok(())
    }

    fn attention(
        &self,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        key_multiplicity: Option<&Tensor<Self>>,
    ) -> Result<Tensor<Self>> {
        let [b, lq, lk, h, d] = super::shapes::attention(q, k, v, key_multiplicity)?;
        let (qs, ks, vs) = (
            q.buf.f32("attention")?,
            k.buf.f32("attention")?,
            v.buf.f32("attention")?,
        );
        let mult = match key_multiplicity {
            Some(m) => Some(m.buf.f32("attention")?),
            None => None,
        };
        let hd = h * d;
        let scale = 1.0 / (d as f32).sqrt();
        // Query rows per task: bounded score buffer (~1 MiB), at least 16 rows.
        let qc = (262_144 / lk.max(1)).clamp(16, 256).min(lq.max(1));
        let chunks = lq.div_ceil(qc);
        let mut out = vec![0.0f32; b * lq * hd];
        let dst = SharedMut(out.as_mut_ptr());
        let out_len = out.len();
        (0..b * h * chunks)
            .into_par_iter()
            .for_each_init(Vec::<f32>::new, |scores, task| {
                let bi = task / (h * chunks);
                let hi = (task / chunks) % h;
                let q0 = (task % chunks) * qc;
                let rows = qc.min(lq - q0);
                scores.resize(rows * lk, 0.0);
                let qoff = (bi * lq + q0) * hd + hi * d;
                let koff = bi * lk * hd + hi * d;
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
                kernels::softmax_rows(scores, lk, mult.map(|m| &m[bi * lk..(bi + 1) * lk]));
                // SAFETY: this task writes rows q0..q0+rows of head hi in batch item bi of the
                // output, elements no other task writes; `out` lives until the scope ends.
                let o =
                    unsafe { std::slice::from_raw_parts_mut(dst.ptr().add(qoff), out_len - qoff) };
                gemm_strided(
                    rows,
                    d,
                    lk,
                    o,
                    hd,
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
            });
        Ok(self.tensor(vec![b, lq, h, d], out))
    }

    fn patchify(&self, x: &Tensor<Self>, patch: [usize; 3]) -> Result<Tensor<Self>> {
        expect_rank("patchify", x, 5)?;
        let s = x.shape();
        let [b, c, f, hh, ww] = [s[0], s[1], s[2], s[3], s[4]];
        let [pt, ph, pw] = patch;
        let [gf, gh, gw] = [f / pt, hh / ph, ww / pw];
        let l = gf * gh * gw;
        let feat = c * pt * ph * pw;
        let xs = x.buf.f32("patchify")?;
        let mut out = vec![0.0f32; b * l * feat];
        out.par_chunks_mut(feat).enumerate().for_each(|(row, o)| {
            let bi = row / l;
            let tok = row % l;
            let (fi, hi, wi) = (tok / (gh * gw), (tok / gw) % gh, tok % gw);
            let mut idx = 0;
            for ci in 0..c {
                for kt in 0..pt {
                    for kh in 0..ph {
                        let base =
                            (((bi * c + ci) * f + fi * pt + kt) * hh + hi * ph + kh) * ww + wi * pw;
                        o[idx..idx + pw].copy_from_slice(&xs[base..base + pw]);
                        idx += pw;
                    }
                }
            }
        });
        Ok(self.tensor(vec![b, l, feat], out))
    }

    fn unpatchify(
        &self,
        y: &Tensor<Self>,
        grid: [usize; 3],
        patch: [usize; 3],
        channels: usize,
    ) -> Result<Tensor<Self>> {
        let (b, l, feat) = super::shapes::unpatchify(y, grid, patch, channels)?;
        let [gf, gh, gw] = grid;
        let [pt, ph, pw] = patch;
        let [f, hh, ww] = [gf * pt, gh * ph, gw * pw];
        let ys = y.buf.f32("unpatchify")?;
        let mut out = vec![0.0f32; b * channels * f * hh * ww];
        // One task per (batch, channel, frame) plane.
        out.par_chunks_mut(hh * ww)
            .enumerate()
            .for_each(|(plane, o)| {
                let bi = plane / (channels * f);
                let ci = (plane / f) % channels;
                let fr = plane % f;
                let (fi, kt) = (fr / pt, fr % pt);
                for r in 0..hh {
                    let (hi, kh) = (r / ph, r % ph);
                    for col in 0..ww {
                        let (wi, kw) = (col / pw, col % pw);
                        let tok = (fi * gh + hi) * gw + wi;
                        let fidx = ((kt * ph + kh) * pw + kw) * channels + ci;
                        o[r * ww + col] = ys[(bi * l + tok) * feat + fidx];
                    }
                }
            });
        Ok(self.tensor(vec![b, channels, f, hh, ww], out))
    }
}
