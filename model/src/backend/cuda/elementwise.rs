//! Elementwise kernels: activations, gated residuals, modulation tables, products, clamping.
//!
//! Also the launch geometry and modulation-row checks shared by the row kernels of `norm`,
//! `layout` and `text`.

use cudarc::driver::{CudaSlice, LaunchArgs, LaunchConfig, PushKernelArg};

use super::{Cuda, Tensor, dim, grid_1d, grid_rows, push_buf, suffix};
use crate::backend::{Activation, ModRow, expect_rank};
use crate::error::{Error, Result};

/// Blocks of a flat kernel's grid (each loops with a grid stride past it).
const MAX_FLAT_ELEMENTS: usize = 1 << 24;

/// Blocks of a row kernel's grid (each block loops over rows with a grid stride past it).
const MAX_ROW_BLOCKS: usize = 1 << 20;

/// Launch geometry for a flat kernel over `n` elements: 256 threads a block, grid-stride loop.
pub(super) fn flat_launch(n: usize) -> LaunchConfig {
    grid_1d(n.min(MAX_FLAT_ELEMENTS))
}

/// Launch geometry for a row kernel over `rows` rows of `width` elements: one block a row (the
/// kernel loops with a grid stride past `MAX_ROW_BLOCKS`), about four elements a thread, from
/// one warp up to 512 threads.
pub(super) fn row_launch(rows: usize, width: usize) -> LaunchConfig {
    let threads = width.div_ceil(4).next_multiple_of(32).clamp(32, 512) as u32;
    grid_rows(rows.min(MAX_ROW_BLOCKS), threads)
}

/// The activation code the kernels share with the host (see the prelude).
fn activation_code(act: Activation) -> i32 {
    match act {
        Activation::Identity => 0,
        Activation::Silu => 1,
        Activation::GeluTanh => 2,
    }
}

/// A modulation row checked against a batch and width: row `index` of batch item `bi` of the
/// f32 table `[B, C, D]` starts at `offset + bi · stride` (`offset = index · D`, `stride = C · D`).
pub(super) struct ModRowArgs<'a> {
    table: &'a CudaSlice<f32>,
    offset: u64,
    stride: u64,
}

impl<'a> ModRowArgs<'a> {
    /// Check `m` against batch `batch` and width `d` exactly as the CPU does (same errors).
    pub(super) fn new(m: &ModRow<'a, Cuda>, batch: usize, d: usize) -> Result<Self> {
        let t = m.table;
        expect_rank("modulation", t, 3)?;
        let [tb, c, td] = [t.shape()[0], t.shape()[1], t.shape()[2]];
        if tb != batch || td != d || m.index >= c {
            return Err(Error::shape(
                "modulation",
                format!(
                    "table {:?}, row {}, for batch {batch} width {d}",
                    t.shape(),
                    m.index
                ),
            ));
        }
        Ok(ModRowArgs {
            table: Cuda::f32_of(t, "modulation")?,
            offset: (m.index * d) as u64,
            stride: (c * d) as u64,
        })
    }

    /// Push the kernel arguments `(const float* table, u64 offset, u64 stride)`.
    pub(super) fn push<'l>(&'l self, l: &mut LaunchArgs<'l>)
    where
        'a: 'l,
    {
        l.arg(self.table).arg(&self.offset).arg(&self.stride);
    }
}

/// `x = act(x)` elementwise, in place (kernel `activate_inplace`).
pub(super) fn activate(b: &Cuda, x: &mut Tensor<Cuda>, act: Activation) -> Result<()> {
    let n = x.numel();
    let xs = Cuda::f32_mut(x, "activate")?;
    if act == Activation::Identity || n == 0 {
        return Ok(());
    }
    let (n64, code) = (n as u64, activation_code(act));
    b.launch("activate_inplace", flat_launch(n), |l| {
        l.arg(xs).arg(&n64).arg(&code);
    })
}

/// `out[b, c, :] = table[c, :] + proj[b, ..]`: table `[C, D]` of any storage type, proj f32
/// `[B, ..]` holding `C·D` (one vector per chunk) or `D` (shared by the chunks) values per batch
/// item; out f32 `[B, C, D]` (kernels `modulation_table_{f32,bf16,f16}`, one block a row).
pub(super) fn modulation_table(
    b: &Cuda,
    table: &Tensor<Cuda>,
    proj: &Tensor<Cuda>,
) -> Result<Tensor<Cuda>> {
    let (batch, c, d, shared) = crate::backend::shapes::modulation_table(table, proj)?;
    let ps = Cuda::f32_of(proj, "modulation_table")?;
    let mut out = b.output(vec![batch, c, d])?;
    let rows = batch * c;
    if rows * d == 0 {
        return Ok(out);
    }
    let os = Cuda::f32_mut(&mut out, "modulation_table")?;
    let name = format!("modulation_table_{}", suffix(table.buf.dtype()));
    let (rows64, chunks, d32) = (
        rows as u64,
        dim("modulation_table", c)?,
        dim("modulation_table", d)?,
    );
    // With C = 1 both layouts coincide; otherwise X = D means one vector shared by the chunks.
    let shared = i32::from(shared);
    b.launch(&name, row_launch(rows, d), |l| {
        push_buf(l, &table.buf);
        l.arg(ps)
            .arg(os)
            .arg(&rows64)
            .arg(&chunks)
            .arg(&d32)
            .arg(&shared);
    })?;
    Ok(out)
}

/// `x[B, L, D] += y · gate[b]` with the gate a row of a modulation table `[B, C, D]` (kernel
/// `add_gated_rows`, one block a row), or `x += y` elementwise without one (`add_inplace`).
pub(super) fn add_gated(
    b: &Cuda,
    x: &mut Tensor<Cuda>,
    y: &Tensor<Cuda>,
    gate: Option<ModRow<'_, Cuda>>,
) -> Result<()> {
    if x.shape() != y.shape() {
        return Err(Error::shape(
            "add_gated",
            format!("{:?} += {:?}", x.shape(), y.shape()),
        ));
    }
    let ys = Cuda::f32_of(y, "add_gated")?;
    let n = x.numel();
    let d = x.last_dim();
    match gate {
        None => {
            let xs = Cuda::f32_mut(x, "add_gated")?;
            if n == 0 {
                return Ok(());
            }
            let n64 = n as u64;
            b.launch("add_inplace", flat_launch(n), |l| {
                l.arg(xs).arg(ys).arg(&n64);
            })
        }
        Some(g) => {
            expect_rank("add_gated", x, 3)?;
            let [batch, tokens] = [x.shape()[0], x.shape()[1]];
            let gate = ModRowArgs::new(&g, batch, d)?;
            let xs = Cuda::f32_mut(x, "add_gated")?;
            if n == 0 {
                return Ok(());
            }
            let rows = batch * tokens;
            let (rows64, tokens64, d32) = (rows as u64, tokens as u64, dim("add_gated", d)?);
            b.launch("add_gated_rows", row_launch(rows, d), |l| {
                l.arg(xs).arg(ys);
                gate.push(l);
                l.arg(&rows64).arg(&tokens64).arg(&d32);
            })
        }
    }
}

/// `x *= y` elementwise (same shapes), in place (kernel `mul_inplace`).
pub(super) fn mul_assign(b: &Cuda, x: &mut Tensor<Cuda>, y: &Tensor<Cuda>) -> Result<()> {
    if x.shape() != y.shape() {
        return Err(Error::shape(
            "mul_assign",
            format!("{:?} *= {:?}", x.shape(), y.shape()),
        ));
    }
    let ys = Cuda::f32_of(y, "mul_assign")?;
    let n = x.numel();
    let xs = Cuda::f32_mut(x, "mul_assign")?;
    if n == 0 {
        return Ok(());
    }
    let n64 = n as u64;
    b.launch("mul_inplace", flat_launch(n), |l| {
        l.arg(xs).arg(ys).arg(&n64);
    })
}

/// `x = clamp(x, lo, hi)` elementwise, in place (kernel `clamp_inplace`; NaN stays NaN).
pub(super) fn clamp(b: &Cuda, x: &mut Tensor<Cuda>, lo: f32, hi: f32) -> Result<()> {
    // Bounds that f32::clamp refuses are a caller error, as on the CPU.
    if lo.is_nan() || hi.is_nan() || lo > hi {
        return Err(Error::shape("clamp", format!("bounds {lo}..={hi}")));
    }
    let n = x.numel();
    let xs = Cuda::f32_mut(x, "clamp")?;
    if n == 0 {
        return Ok(());
    }
    let n64 = n as u64;
    b.launch("clamp_inplace", flat_launch(n), |l| {
        l.arg(xs).arg(&n64).arg(&lo).arg(&hi);
    })
}
