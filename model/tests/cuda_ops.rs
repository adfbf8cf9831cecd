//! Per-op parity of the CUDA backend with the CPU reference.
//!
//! Every method of [`Backend`], [`VideoOps`] and [`TextOps`] runs on GPU 0 and on [`Cpu`] with the
//! same seeded pseudo-random inputs, on deliberately awkward shapes: sizes that are no multiple
//! of a tile (7, 13, 17, 33, 130, 257, ...), size-1 dimensions, long rows (D = 1536, 5120),
//! attention with Lq ≠ Lk and Lk = 1, head widths 8 to 128, key multiplicities with zeros, VAE
//! convolutions with 3 / 17 / 96 channels and every history case, weights stored in f32, bf16
//! and f16. Each case checks the output's shape, that it holds no NaN, and its distance to the
//! CPU's: exact equality for pure data movement, relative L2 ≤ 1e-5 for f32 arithmetic, ≤ 1e-2
//! for `linear` with 16-bit weights (the activations are rounded to the weight type for the
//! tensor cores) and ≤ 2e-2 for `attention` in [`Precision::Bf16`]. Shape mismatches must be
//! errors naming the op, never panics, and a group of one GPU must run every NCCL collective.
//!
//! Every test needs a GPU and is `#[ignore]`d; `scripts/gpu-check` runs them with
//! `LONGTAKE_CUDA_POISON=1`, which fills each buffer the CUDA backend allocates with NaN bytes,
//! so an output element a kernel never writes fails the NaN check. Each case prints one row
//! (op, case, error, bound, verdict) to stderr; a test fails at its end, listing the bad rows.

mod common;

use std::any::TypeId;
use std::panic::{AssertUnwindSafe, catch_unwind};

use half::{bf16, f16};
use longtake_model::Result;
use longtake_model::backend::cpu::Cpu;
use longtake_model::backend::cuda::nccl::NcclComm;
use longtake_model::backend::cuda::{Cuda, Precision};
use longtake_model::backend::text_ops::TextOps;
use longtake_model::backend::video_ops::VideoOps;
use longtake_model::backend::{Activation, Backend, ModRow, Modulation, Tensor};
use longtake_model::comm::Comm;
use longtake_model::dtype::{DType, HostSlice};
use longtake_model::pipeline::PipelineBackend;

// ================================================================================================
// Inputs
// ================================================================================================

const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];
const ACTS: [Activation; 3] = [Activation::Identity, Activation::Silu, Activation::GeluTanh];

/// A deterministic generator (xorshift64*): the same seed gives the same inputs on every run.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[-1, 1)`.
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// An f32 tensor, uniform in `[-amp, amp)`.
    fn tensor(&mut self, shape: &[usize], amp: f32) -> Host {
        self.weight(shape, amp, DType::F32)
    }

    /// A tensor stored as `dtype`, uniform in `[-amp, amp)` before rounding.
    fn weight(&mut self, shape: &[usize], amp: f32, dtype: DType) -> Host {
        let n = shape.iter().product();
        let values = (0..n).map(|_| amp * self.uniform()).collect();
        Host::new(shape, values, dtype)
    }
}

/// One input tensor on the host. Its values are already rounded through `dtype`, so the f32
/// copy that the CPU's VAE ops need holds exactly the numbers the GPU gets.
#[derive(Clone)]
struct Host {
    shape: Vec<usize>,
    values: Vec<f32>,
    dtype: DType,
}

impl Host {
    fn new(shape: &[usize], values: Vec<f32>, dtype: DType) -> Host {
        assert_eq!(shape.iter().product::<usize>(), values.len(), "{shape:?}");
        let values = match dtype {
            DType::F32 => values,
            DType::BF16 => values.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
            DType::F16 => values.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
        };
        Host {
            shape: shape.to_vec(),
            values,
            dtype,
        }
    }

    fn f32(shape: &[usize], values: Vec<f32>) -> Host {
        Host::new(shape, values, DType::F32)
    }

    /// Upload in the storage type.
    fn upload<B: Backend>(&self, b: &B) -> Result<Tensor<B>> {
        match self.dtype {
            DType::F32 => b.upload(&self.shape, HostSlice::F32(&self.values)),
            DType::BF16 => {
                let v: Vec<bf16> = self.values.iter().map(|&x| bf16::from_f32(x)).collect();
                b.upload(&self.shape, HostSlice::BF16(&v))
            }
            DType::F16 => {
                let v: Vec<f16> = self.values.iter().map(|&x| f16::from_f32(x)).collect();
                b.upload(&self.shape, HostSlice::F16(&v))
            }
        }
    }

    /// Upload a VAE weight: in its storage type to the GPU, as f32 to the CPU reference, whose
    /// VAE ops read f32 weights only (same values either way).
    fn upload_vae<B: Backend>(&self, b: &B) -> Result<Tensor<B>> {
        if TypeId::of::<B>() == TypeId::of::<Cpu>() {
            b.upload(&self.shape, HostSlice::F32(&self.values))
        } else {
            self.upload(b)
        }
    }
}

// ================================================================================================
// The comparison table
// ================================================================================================

/// How close the GPU's output must be to the CPU's.
#[derive(Clone, Copy)]
enum Tol {
    /// The same values (data movement).
    Exact,
    /// Relative L2 error at most this.
    RelL2(f64),
}

/// f32 arithmetic.
const F32_TOL: Tol = Tol::RelL2(1e-5);
/// `attention` in bf16 precision (tensor cores).
const BF16_ATTENTION_TOL: Tol = Tol::RelL2(2e-2);

/// `linear`: with 16-bit weights the activations are rounded to the weight type.
fn linear_tol(dtype: DType) -> Tol {
    match dtype {
        DType::F32 => F32_TOL,
        DType::BF16 | DType::F16 => Tol::RelL2(1e-2),
    }
}

/// An op's output, downloaded.
struct Output {
    shape: Vec<usize>,
    data: Vec<f32>,
}

/// Run an op, wait for it and download its output (an asynchronous kernel failure surfaces here).
fn settle<B: Backend>(b: &B, op: impl FnOnce() -> Result<Tensor<B>>) -> Result<Output> {
    let t = op()?;
    b.synchronize()?;
    Ok(Output {
        shape: t.shape().to_vec(),
        data: b.download(&t)?,
    })
}

/// The multi-index of flat element `i` of `shape`.
fn unravel(shape: &[usize], mut i: usize) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for (d, &n) in shape.iter().enumerate().rev() {
        idx[d] = i % n.max(1);
        i /= n.max(1);
    }
    idx
}

/// The rows of one test on one GPU, printed together when the test ends (so that tests running
/// in parallel do not interleave their rows), failures collected for the verdict.
struct Table<'g> {
    gpu: &'g Cuda,
    title: String,
    lines: Vec<String>,
    rows: usize,
    /// The largest relative L2 error of a compared row.
    worst: f64,
    failures: Vec<String>,
}

impl<'g> Table<'g> {
    fn new(title: &str, gpu: &'g Cuda) -> Table<'g> {
        let title = format!("{title} on {} ({})", gpu.name(), gpu.device_name());
        let head = format!(
            "{:<18} {:<66} {:>9} {:>6}  verdict",
            "op", "case", "error", "bound"
        );
        Table {
            gpu,
            lines: vec![String::new(), format!("== {title}"), head],
            title,
            rows: 0,
            worst: 0.0,
            failures: Vec::new(),
        }
    }

    fn row(&mut self, op: &str, case: &str, error: &str, bound: &str, verdict: Result<(), String>) {
        self.rows += 1;
        let line = format!("{op:<18} {case:<66} {error:>9} {bound:>6}");
        match verdict {
            Ok(()) => self.lines.push(format!("{line}  ok")),
            Err(why) => {
                self.lines.push(format!("{line}  FAIL: {why}"));
                self.failures.push(format!("{op} {case}: {why}"));
            }
        }
    }

    /// The GPU's output against the CPU's: same shape, no NaN, within `tol`.
    fn compare(
        &mut self,
        op: &str,
        case: &str,
        tol: Tol,
        want: Result<Output>,
        got: Result<Output>,
    ) {
        let bound = match tol {
            Tol::Exact => "exact".to_string(),
            Tol::RelL2(t) => format!("{t:.0e}"),
        };
        let mut error = "-".to_string();
        let verdict = || {
            let want = want.map_err(|e| format!("the CPU reference failed: {e}"))?;
            let got = got.map_err(|e| format!("error: {e}"))?;
            if got.shape != want.shape {
                return Err(format!("shape {:?}, expected {:?}", got.shape, want.shape));
            }
            if let Some(i) = got.data.iter().position(|v| v.is_nan()) {
                return Err(format!("NaN at index {i} {:?}", unravel(&got.shape, i)));
            }
            match tol {
                Tol::Exact => {
                    if let Some(i) = got.data.iter().zip(&want.data).position(|(g, w)| g != w) {
                        let (g, w, at) = (got.data[i], want.data[i], unravel(&got.shape, i));
                        return Err(format!("index {i} {at:?} is {g}, expected {w}"));
                    }
                    error = "0".into();
                }
                Tol::RelL2(t) => {
                    let e = common::rel_l2(&got.data, &want.data);
                    error = format!("{e:.2e}");
                    self.worst = self.worst.max(e);
                    if e.is_nan() || e > t {
                        return Err(format!("relative L2 error {e:.3e} > {t:.0e}"));
                    }
                }
            }
            Ok(())
        };
        let verdict = verdict();
        self.row(op, case, &error, &bound, verdict);
    }

    /// A check that is not a numeric comparison.
    fn expect(&mut self, op: &str, case: &str, ok: bool, why: impl FnOnce() -> String) {
        self.row(op, case, "-", "-", if ok { Ok(()) } else { Err(why()) });
    }

    /// A check that must come out `Ok(true)`.
    fn holds(&mut self, op: &str, case: &str, r: Result<bool>) {
        let ok = matches!(r, Ok(true));
        self.expect(op, case, ok, || format!("{r:?}"));
    }

    /// Both backends must refuse an input, the GPU with an error (not a panic) naming `op`.
    fn refused(&mut self, op: &str, case: &str, cpu: Outcome, gpu: Outcome) {
        let mut message = None;
        let verdict = match (cpu, gpu) {
            (_, Err(_)) => Err("the GPU op panicked".to_string()),
            (_, Ok(Ok(()))) => Err("the GPU op accepted it".to_string()),
            (Err(_) | Ok(Ok(())), _) => Err("the CPU reference does not refuse it".to_string()),
            (Ok(Err(_)), Ok(Err(e))) if e.to_string().contains(op) => {
                message = Some(format!("    {e}"));
                Ok(())
            }
            (Ok(Err(_)), Ok(Err(e))) => Err(format!("the error does not name `{op}`: {e}")),
        };
        self.row(op, case, "-", "error", verdict);
        self.lines.extend(message);
    }

    /// Print the table and a summary line; fail the test if any row failed, listing them.
    fn finish(mut self) {
        let (n, rows, worst) = (self.failures.len(), self.rows, self.worst);
        let summary = format!("{rows} cases, {n} failed, worst relative L2 error {worst:.2e}");
        self.lines.push(summary);
        eprintln!("{}", std::mem::take(&mut self.lines).join("\n"));
        let list = self.failures.join("\n  ");
        assert!(
            n == 0,
            "{}: {n} of {rows} cases failed:\n  {list}",
            self.title
        );
    }
}

impl Drop for Table<'_> {
    /// A test that panicked before [`Table::finish`] still shows its rows.
    fn drop(&mut self) {
        if !self.lines.is_empty() {
            eprintln!("{}", self.lines.join("\n"));
        }
    }
}

/// What an op that should be refused did: panicked (`Err`), or returned.
type Outcome = std::thread::Result<Result<()>>;

/// Run `$body` (an op returning `Result<Tensor<B>>`, `?` allowed) with `$b` bound to the CPU
/// reference, then to the table's GPU, and compare the outputs.
macro_rules! check {
    ($t:expr, $op:expr, $case:expr, $tol:expr, |$b:ident| $body:expr) => {{
        let want = settle(&Cpu, || {
            let $b = &Cpu;
            $body
        });
        let got = settle($t.gpu, || {
            let $b = $t.gpu;
            $body
        });
        $t.compare($op, &$case, $tol, want, got);
    }};
}

/// Run `$body` on both backends: both must refuse it, the GPU with an error naming `$op`.
macro_rules! refused {
    ($t:expr, $op:expr, $case:expr, |$b:ident| $body:expr) => {{
        let cpu = catch_unwind(AssertUnwindSafe(|| {
            let $b = &Cpu;
            $body.map(|_| ())
        }));
        let gpu = catch_unwind(AssertUnwindSafe(|| {
            let $b = $t.gpu;
            $body.map(|_| ())
        }));
        $t.refused($op, $case, cpu, gpu);
    }};
}

// ================================================================================================
// Op helpers, generic over the backend
// ================================================================================================

/// Upload `x`, apply an in-place op to it, return it.
fn in_place<B: Backend>(
    b: &B,
    x: &Host,
    op: impl FnOnce(&mut Tensor<B>) -> Result<()>,
) -> Result<Tensor<B>> {
    let mut t = x.upload(b)?;
    op(&mut t)?;
    Ok(t)
}

/// Upload an optional input.
fn upload_opt<B: Backend>(b: &B, h: Option<&Host>) -> Result<Option<Tensor<B>>> {
    h.map(|h| h.upload(b)).transpose()
}

/// Upload an optional VAE weight (see [`Host::upload_vae`]).
fn upload_vae_opt<B: Backend>(b: &B, h: Option<&Host>) -> Result<Option<Tensor<B>>> {
    h.map(|h| h.upload_vae(b)).transpose()
}

/// Layer norm with eps 1e-6; `modulation`: a table `[B, C, D]` and its shift and scale rows.
fn layer_norm<B: PipelineBackend>(
    b: &B,
    x: &Host,
    affine: Option<(&Host, &Host)>,
    modulation: Option<(&Host, usize, usize)>,
) -> Result<Tensor<B>> {
    let affine = match affine {
        Some((w, bb)) => Some((w.upload(b)?, bb.upload(b)?)),
        None => None,
    };
    let table = upload_opt(b, modulation.map(|m| m.0))?;
    let modulation = table
        .as_ref()
        .zip(modulation)
        .map(|(t, (_, shift, scale))| Modulation {
            shift: ModRow {
                table: t,
                index: shift,
            },
            scale: ModRow {
                table: t,
                index: scale,
            },
        });
    let affine = affine.as_ref().map(|(w, bb)| (w, bb));
    b.layer_norm(&x.upload(b)?, 1e-6, affine, modulation)
}

/// `x += y · gate`; `gate`: a table `[B, C, D]` and its row.
fn add_gated<B: PipelineBackend>(
    b: &B,
    x: &Host,
    y: &Host,
    gate: Option<(&Host, usize)>,
) -> Result<Tensor<B>> {
    let table = upload_opt(b, gate.map(|g| g.0))?;
    let gate = table
        .as_ref()
        .zip(gate)
        .map(|(t, (_, index))| ModRow { table: t, index });
    in_place(b, x, |x| b.add_gated(x, &y.upload(b)?, gate))
}

// ================================================================================================
// Backend: memory, layout, dense, normalisation
// ================================================================================================

#[test]
#[ignore = "needs a GPU: scripts/gpu-check runs it"]
fn memory_and_layout_ops_match_cpu() {
    let gpu = common::cuda();
    let mut t = Table::new("memory and layout ops", &gpu);
    let mut rng = Rng::new(1);
    let name = gpu.name();
    t.expect("name", "", name == "cuda:0", || format!("named {name}"));
    t.holds("synchronize", "", gpu.synchronize().map(|()| true));

    for shape in [vec![1], vec![7, 13], vec![3, 130, 257]] {
        for dtype in DTYPES {
            let h = rng.weight(&shape, 3.0, dtype);
            let case = format!("{shape:?} {dtype}");
            check!(t, "upload, download", case, Tol::Exact, |b| h.upload(b));
            t.holds(
                "dtype",
                &case,
                h.upload(&gpu).map(|x| gpu.dtype(&x) == dtype),
            );
        }
        let h = rng.tensor(&shape, 3.0);
        let case = format!("{shape:?}");
        check!(t, "upload_f32", case, Tol::Exact, |b| {
            b.upload_f32(&shape, h.values.clone())
        });
    }

    let slices: [(&[usize], usize, usize); 7] = [
        (&[7, 13], 0, 7),
        (&[7, 13], 2, 3),
        (&[7, 13], 6, 1),
        (&[7, 13], 3, 0),
        (&[130, 3, 5], 129, 1),
        (&[130, 3, 5], 1, 128),
        (&[257], 100, 157),
    ];
    for (shape, start, len) in slices {
        let x = rng.tensor(shape, 1.0);
        let case = format!("{shape:?} rows {start}..{}", start + len);
        check!(t, "slice_rows", case, Tol::Exact, |b| {
            b.slice_rows(&x.upload(b)?, start, len)
        });
    }

    let concats: [&[&[usize]]; 4] = [
        &[&[3, 5, 7], &[1, 5, 7], &[130, 5, 7]],
        &[&[2, 1536]],
        &[&[5], &[7], &[1]],
        &[&[1, 3], &[0, 3], &[257, 3]],
    ];
    for shapes in concats {
        let parts: Vec<Host> = shapes.iter().map(|s| rng.tensor(s, 1.0)).collect();
        check!(t, "concat_rows", format!("{shapes:?}"), Tol::Exact, |b| {
            let parts = parts
                .iter()
                .map(|p| p.upload(b))
                .collect::<Result<Vec<_>>>()?;
            b.concat_rows(&parts)
        });
    }

    // [B, C, F, H, W] -> tokens; dimensions that fill no whole patch drop their tail.
    let patchifies: [([usize; 5], [usize; 3]); 4] = [
        ([1, 16, 3, 6, 10], [1, 2, 2]),
        ([2, 17, 5, 7, 9], [1, 2, 2]),
        ([1, 3, 4, 5, 6], [2, 1, 3]),
        ([1, 1, 1, 1, 1], [1, 1, 1]),
    ];
    for (shape, patch) in patchifies {
        let x = rng.tensor(&shape, 1.0);
        let case = format!("{shape:?} patch {patch:?}");
        check!(t, "patchify", case, Tol::Exact, |b| {
            b.patchify(&x.upload(b)?, patch)
        });
    }
    // (B, grid, patch, C)
    let unpatchifies: [(usize, [usize; 3], [usize; 3], usize); 3] = [
        (1, [3, 3, 5], [1, 2, 2], 16),
        (2, [2, 4, 3], [2, 1, 3], 17),
        (1, [1, 1, 1], [1, 1, 1], 1),
    ];
    for (batch, grid, patch, c) in unpatchifies {
        let l: usize = grid.iter().product();
        let y = rng.tensor(&[batch, l, patch.iter().product::<usize>() * c], 1.0);
        let case = format!("{:?} grid {grid:?} patch {patch:?} C {c}", y.shape);
        check!(t, "unpatchify", case, Tol::Exact, |b| {
            b.unpatchify(&y.upload(b)?, grid, patch, c)
        });
    }

    // Rotary embedding on [B, L, H, d] with tables [L, d/2] of RoPE frequencies.
    for [batch, l, h, d] in [
        [1, 1, 1, 2],
        [2, 7, 3, 8],
        [1, 130, 12, 128],
        [1, 257, 2, 48],
    ] {
        let x = rng.tensor(&[batch, l, h, d], 1.0);
        let half = d / 2;
        let angle = |i: usize| (i / half) as f32 * 1e4f32.powf(-((i % half) as f32) / half as f32);
        let cos = Host::f32(&[l, half], (0..l * half).map(|i| angle(i).cos()).collect());
        let sin = Host::f32(&[l, half], (0..l * half).map(|i| angle(i).sin()).collect());
        check!(t, "rope", format!("x {:?}", x.shape), F32_TOL, |b| {
            in_place(b, &x, |x| b.rope(x, &cos.upload(b)?, &sin.upload(b)?))
        });
    }
    t.finish();
}

#[test]
#[ignore = "needs a GPU: scripts/gpu-check runs it"]
fn dense_ops_match_cpu() {
    let gpu = common::cuda();
    let mut t = Table::new("dense ops", &gpu);
    let mut rng = Rng::new(2);

    // (x shape, N): every weight type, with and without bias, the activations in turn.
    let linears: [(&[usize], usize); 6] = [
        (&[1, 1], 1),
        (&[7, 13], 5),
        (&[2, 65, 96], 17),
        (&[130, 1536], 33),
        (&[3, 5120], 257),
        (&[257, 48], 1536),
    ];
    for (i, (xs, n)) in linears.into_iter().enumerate() {
        let k = xs[xs.len() - 1];
        let x = rng.tensor(xs, 1.0);
        for (j, dtype) in DTYPES.into_iter().enumerate() {
            let w = rng.weight(&[n, k], 1.0 / (k as f32).sqrt(), dtype);
            let bias = rng.weight(&[n], 0.5, dtype);
            for with_bias in [false, true] {
                let act = ACTS[(i + j + usize::from(with_bias)) % 3];
                let bias = with_bias.then_some(&bias);
                let case = format!("x {xs:?} w [{n}, {k}] {dtype} bias {with_bias} {act:?}");
                check!(t, "linear", case, linear_tol(dtype), |b| {
                    let (x, w) = (x.upload(b)?, w.upload(b)?);
                    b.linear(&x, &w, upload_opt(b, bias)?.as_ref(), act)
                });
            }
        }
    }

    for shape in [vec![1], vec![7, 13], vec![3, 130, 257], vec![2, 5120]] {
        let x = rng.tensor(&shape, 8.0);
        for act in ACTS {
            let case = format!("{shape:?} {act:?}");
            check!(t, "activate", case, F32_TOL, |b| {
                in_place(b, &x, |x| b.activate(x, act))
            });
        }
    }

    // (B, C, D, shared): proj [B, C·D] (a vector per chunk) or [B, D] (one for all chunks).
    for (batch, c, d, shared) in [(1, 6, 1536, false), (2, 6, 1536, true), (3, 2, 17, false)] {
        let proj = rng.tensor(&[batch, if shared { d } else { c * d }], 1.0);
        for dtype in DTYPES {
            let table = rng.weight(&[c, d], 1.0, dtype);
            let case = format!("table [{c}, {d}] {dtype}, proj {:?}", proj.shape);
            check!(t, "modulation_table", case, F32_TOL, |b| {
                b.modulation_table(&table.upload(b)?, &proj.upload(b)?)
            });
        }
    }
    t.finish();
}

#[test]
#[ignore = "needs a GPU: scripts/gpu-check runs it"]
fn norm_ops_match_cpu() {
    let gpu = common::cuda();
    let mut t = Table::new("normalisation ops", &gpu);
    let mut rng = Rng::new(3);

    // Plain, affine (each weight type), modulated (shift row 3, scale row 4 of a [B, 6, D]
    // table), both.
    let variants = [
        (false, DType::F32, false),
        (true, DType::F32, false),
        (true, DType::BF16, true),
    ];
    let variants = variants
        .into_iter()
        .chain([(true, DType::F16, false), (false, DType::F32, true)]);
    let variants: Vec<_> = variants.collect();
    for [batch, l, d] in [
        [1, 1, 1],
        [2, 7, 5],
        [1, 130, 96],
        [2, 33, 1536],
        [1, 3, 5120],
    ] {
        // A mean far from zero, as in the residual stream.
        let mut x = rng.tensor(&[batch, l, d], 1.0);
        x.values.iter_mut().for_each(|v| *v += 2.5);
        let table = rng.tensor(&[batch, 6, d], 0.5);
        for &(with_affine, dtype, modulated) in &variants {
            let (w, bb) = (rng.weight(&[d], 1.0, dtype), rng.weight(&[d], 0.5, dtype));
            let affine = with_affine.then_some((&w, &bb));
            let modulation = modulated.then_some((&table, 3, 4));
            let aff = if with_affine {
                dtype.to_string()
            } else {
                "none".into()
            };
            let case = format!("x [{batch}, {l}, {d}] affine {aff} modulated {modulated}");
            check!(t, "layer_norm", case, F32_TOL, |b| {
                layer_norm(b, &x, affine, modulation)
            });
        }
        let y = rng.tensor(&[batch, l, d], 1.0);
        for gate in [None, Some((&table, 2))] {
            let case = format!("x [{batch}, {l}, {d}] gated {}", gate.is_some());
            check!(t, "add_gated", case, F32_TOL, |b| {
                add_gated(b, &x, &y, gate)
            });
        }
    }
    for shape in [vec![130, 257], vec![2, 3, 5, 7]] {
        let (x, y) = (rng.tensor(&shape, 1.0), rng.tensor(&shape, 1.0));
        let case = format!("x {shape:?} gated false");
        check!(t, "add_gated", case, F32_TOL, |b| {
            add_gated(b, &x, &y, None)
        });
    }

    // T5's RMS norm; `full_width` > D stands for columns split across tensor-parallel ranks.
    let shapes: [&[usize]; 6] = [
        &[1, 1],
        &[7, 5],
        &[2, 130, 96],
        &[3, 1536],
        &[2, 2, 5120],
        &[1000],
    ];
    for (i, shape) in shapes.into_iter().enumerate() {
        let x = rng.tensor(shape, 2.0);
        let case = format!("{shape:?}");
        check!(t, "sum_squares", case, F32_TOL, |b| {
            b.sum_squares(&x.upload(b)?)
        });
        let d = shape[shape.len() - 1];
        let sums = x
            .values
            .chunks(d)
            .map(|r| r.iter().map(|v| v * v).sum())
            .collect();
        let sumsq = Host::f32(&shape[..shape.len() - 1], sums);
        for (j, full_width) in [d, 3 * d].into_iter().enumerate() {
            let dtype = DTYPES[(i + j) % 3];
            let w = rng.weight(&[d], 1.0, dtype);
            let case = format!("{shape:?} full width {full_width} weight {dtype}");
            check!(t, "rms_apply", case, F32_TOL, |b| {
                let (s, w) = (sumsq.upload(b)?, w.upload(b)?);
                in_place(b, &x, |x| b.rms_apply(x, &s, full_width, 1e-6, &w))
            });
        }
    }
    t.finish();
}

// ================================================================================================
// Backend: attention
// ================================================================================================

/// Which keys take part: all once, counts 0..=3 with some zeros, or (in the last batch item;
/// the others mixed) a single one.
#[derive(Clone, Copy, Debug)]
enum Keys {
    All,
    Mixed,
    AllButOne,
}

/// Key multiplicities `[B, Lk]` (`None` for `Keys::All`); every row keeps a key.
fn multiplicities(rng: &mut Rng, batch: usize, lk: usize, keys: Keys) -> Option<Host> {
    if let Keys::All = keys {
        return None;
    }
    let mut m = vec![0.0f32; batch * lk];
    for row in m.chunks_mut(lk) {
        row.iter_mut().for_each(|v| *v = rng.below(4) as f32);
        row[rng.below(lk)] = 1.0 + rng.below(3) as f32;
    }
    if let Keys::AllButOne = keys {
        let last = &mut m[(batch - 1) * lk..];
        last.fill(0.0);
        last[lk / 2] = 2.0;
    }
    Some(Host::f32(&[batch, lk], m))
}

fn attention_cases(gpu: &Cuda, title: &str, tol: Tol) {
    let mut t = Table::new(title, gpu);
    let mut rng = Rng::new(4);
    // [B, Lq, Lk, H, d]: Lq ≠ Lk both ways, Lk = 1, Lq = 1, head widths inside and at the
    // edge of each kernel bucket, H·d = 1536.
    let cases: [([usize; 5], Keys); 9] = [
        ([1, 1, 1, 1, 8], Keys::All),
        ([2, 7, 1, 3, 8], Keys::All),
        ([1, 130, 257, 2, 48], Keys::All),
        ([2, 257, 130, 4, 64], Keys::Mixed),
        ([2, 65, 77, 12, 128], Keys::AllButOne),
        ([1, 200, 512, 1, 100], Keys::All),
        ([1, 33, 300, 3, 128], Keys::Mixed),
        ([2, 1, 130, 2, 64], Keys::AllButOne),
        ([1, 129, 1, 5, 17], Keys::AllButOne),
    ];
    for ([batch, lq, lk, h, d], keys) in cases {
        let q = rng.tensor(&[batch, lq, h, d], 2.0);
        let k = rng.tensor(&[batch, lk, h, d], 2.0);
        let v = rng.tensor(&[batch, lk, h, d], 1.0);
        let mult = multiplicities(&mut rng, batch, lk, keys);
        let case = format!("B {batch} Lq {lq} Lk {lk} H {h} d {d} keys {keys:?}");
        check!(t, "attention", case, tol, |b| {
            let m = upload_opt(b, mult.as_ref())?;
            b.attention(&q.upload(b)?, &k.upload(b)?, &v.upload(b)?, m.as_ref())
        });
    }
    t.finish();
}

#[test]
#[ignore = "needs a GPU: scripts/gpu-check runs it"]
fn attention_f32_matches_cpu() {
    attention_cases(&common::cuda(), "attention, f32 precision", F32_TOL);
}

#[test]
#[ignore = "needs a GPU: scripts/gpu-check runs it"]
fn attention_bf16_matches_cpu() {
    let gpu = Cuda::new(0, Precision::Bf16).unwrap_or_else(|e| panic!("needs a GPU: {e}"));
    attention_cases(&gpu, "attention, bf16 precision", BF16_ATTENTION_TOL);
}

// ================================================================================================
// VideoOps
// ================================================================================================

#[test]
#[ignore = "needs a GPU: scripts/gpu-check runs it"]
fn vae_convolutions_match_cpu() {
    let gpu = common::cuda();
    let mut t = Table::new("VAE convolutions", &gpu);
    let mut rng = Rng::new(5);

    // (T, Cin, Cout, [kt, kh, kw], H, W, history frames): history absent, full, short, unused
    // (kt = 1), longer than needed; narrow (Cout ≤ 16) and wide output tiles.
    type Conv3d = (usize, usize, usize, [usize; 3], usize, usize, Option<usize>);
    let convs: [Conv3d; 9] = [
        (2, 3, 17, [3, 3, 3], 9, 11, None),
        (3, 17, 96, [3, 3, 3], 7, 13, Some(2)),
        (1, 96, 3, [3, 3, 3], 5, 6, Some(1)),
        (2, 17, 33, [1, 1, 1], 23, 17, None),
        (2, 17, 33, [1, 1, 1], 23, 17, Some(2)),
        (4, 96, 17, [3, 1, 1], 6, 5, Some(5)),
        (2, 96, 96, [3, 3, 3], 23, 17, Some(2)),
        (1, 1, 1, [1, 3, 3], 1, 1, None),
        (3, 16, 16, [3, 3, 3], 4, 130, Some(2)),
    ];
    for (tt, cin, cout, [kt, kh, kw], h, w, hist) in convs {
        let x = rng.tensor(&[tt, cin, h, w], 1.0);
        let history = hist.map(|n| rng.tensor(&[n, cin, h, w], 1.0));
        let amp = 1.0 / ((cin * kt * kh * kw) as f32).sqrt();
        for (j, dtype) in DTYPES.into_iter().enumerate() {
            let wt = rng.weight(&[cout, cin, kt, kh, kw], amp, dtype);
            let bias = (j != 1).then(|| rng.weight(&[cout], 0.5, dtype));
            let (hs, bs) = (hist.map_or(0, |n| n), bias.is_some());
            let case = format!(
                "x [{tt}, {cin}, {h}, {w}] k {kt}x{kh}x{kw} Cout {cout} hist {hs} {dtype} bias {bs}"
            );
            check!(t, "conv3d_causal", case, F32_TOL, |b| {
                let (x, w) = (x.upload(b)?, wt.upload_vae(b)?);
                let hist = upload_opt(b, history.as_ref())?;
                let bias = upload_vae_opt(b, bias.as_ref())?;
                b.conv3d_causal(&x, hist.as_ref(), &w, bias.as_ref())
            });
        }
    }

    // (T, Cin, Cout, kh, kw, H, W): odd and even frames, the smallest frame for a 3×3 kernel.
    let downs = [
        (1, 3, 17, 3, 3, 9, 7),
        (2, 17, 96, 3, 3, 8, 10),
        (1, 96, 3, 3, 3, 2, 2),
        (3, 17, 17, 1, 1, 5, 5),
        (1, 96, 96, 3, 3, 23, 17),
    ];
    for (tt, cin, cout, kh, kw, h, w) in downs {
        let x = rng.tensor(&[tt, cin, h, w], 1.0);
        let amp = 1.0 / ((cin * kh * kw) as f32).sqrt();
        for (j, dtype) in DTYPES.into_iter().enumerate() {
            let wt = rng.weight(&[cout, cin, kh, kw], amp, dtype);
            let bias = (j != 2).then(|| rng.weight(&[cout], 0.5, dtype));
            let bs = bias.is_some();
            let case =
                format!("x [{tt}, {cin}, {h}, {w}] k {kh}x{kw} Cout {cout} {dtype} bias {bs}");
            check!(t, "conv2d_down2", case, F32_TOL, |b| {
                let bias = upload_vae_opt(b, bias.as_ref())?;
                b.conv2d_down2(&x.upload(b)?, &wt.upload_vae(b)?, bias.as_ref())
            });
        }
    }

    // (T, Cin, Cout, kt, H, W): 1, 2 and 3 output frames.
    let time_downs = [
        (3, 17, 96, 3, 5, 7),
        (6, 96, 17, 3, 4, 4),
        (7, 3, 3, 3, 23, 17),
        (1, 17, 33, 1, 2, 3),
    ];
    for (tt, cin, cout, kt, h, w) in time_downs {
        let x = rng.tensor(&[tt, cin, h, w], 1.0);
        let amp = 1.0 / ((cin * kt) as f32).sqrt();
        for (j, dtype) in DTYPES.into_iter().enumerate() {
            let wt = rng.weight(&[cout, cin, kt, 1, 1], amp, dtype);
            let bias = (j != 0).then(|| rng.weight(&[cout], 0.5, dtype));
            let bs = bias.is_some();
            let case = format!("x [{tt}, {cin}, {h}, {w}] kt {kt} Cout {cout} {dtype} bias {bs}");
            check!(t, "conv_time_down2", case, F32_TOL, |b| {
                let bias = upload_vae_opt(b, bias.as_ref())?;
                b.conv_time_down2(&x.upload(b)?, &wt.upload_vae(b)?, bias.as_ref())
            });
        }
    }
    t.finish();
}

#[test]
#[ignore = "needs a GPU: scripts/gpu-check runs it"]
fn video_ops_match_cpu() {
    let gpu = common::cuda();
    let mut t = Table::new("video ops", &gpu);
    let mut rng = Rng::new(6);

    let norms = [
        [1, 3, 23, 17],
        [2, 17, 5, 7],
        [1, 96, 23, 17],
        [1, 384, 4, 5],
        [2, 1, 3, 3],
    ];
    for (i, shape) in norms.into_iter().enumerate() {
        let x = rng.tensor(&shape, 2.0);
        for silu in [false, true] {
            let dtype = DTYPES[(i + usize::from(silu)) % 3];
            let gamma = rng.weight(&[shape[1]], 1.0, dtype);
            let case = format!("{shape:?} gamma {dtype} silu {silu}");
            check!(t, "channel_rms_norm", case, F32_TOL, |b| {
                b.channel_rms_norm(&x.upload(b)?, &gamma.upload_vae(b)?, silu)
            });
        }
    }

    for shape in [[2, 3, 5, 7], [1, 17, 23, 17], [3, 1, 1, 1], [1, 96, 1, 130]] {
        let x = rng.tensor(&shape, 1.0);
        let case = format!("{shape:?}");
        check!(t, "upsample2x", case, Tol::Exact, |b| {
            b.upsample2x(&x.upload(b)?)
        });
    }

    // qkv [T, 3C, H, W]; C = 400 takes two launches of the widest kernel.
    let attns = [
        [1, 96, 23, 17],
        [2, 17, 5, 7],
        [1, 384, 9, 11],
        [1, 400, 6, 7],
        [3, 1, 1, 1],
    ];
    for [tt, c, h, w] in attns.into_iter().chain([[2, 5, 1, 130]]) {
        let qkv = rng.tensor(&[tt, 3 * c, h, w], 1.0);
        let case = format!("T {tt} C {c} H·W {h}x{w}");
        check!(t, "spatial_attention", case, F32_TOL, |b| {
            b.spatial_attention(&qkv.upload(b)?)
        });
    }

    let clamps = [
        ([2, 3, 5, 7], -1.0, 1.0),
        ([1, 96, 23, 17], -0.25, 2.0),
        ([1, 1, 1, 3], 0.5, 0.5),
    ];
    for (shape, lo, hi) in clamps {
        let x = rng.tensor(&shape, 3.0);
        let case = format!("{shape:?} to [{lo}, {hi}]");
        check!(t, "clamp", case, Tol::Exact, |b| {
            in_place(b, &x, |x| b.clamp(x, lo, hi))
        });
    }
    t.finish();
}

// ================================================================================================
// TextOps
// ================================================================================================

#[test]
#[ignore = "needs a GPU: scripts/gpu-check runs it"]
fn text_ops_match_cpu() {
    let gpu = common::cuda();
    let mut t = Table::new("text ops", &gpu);
    let mut rng = Rng::new(7);

    // (V, D, ids): repeats, the first and last rows, no ids at all.
    let embeddings: [(usize, usize, Vec<u32>); 4] = [
        (37, 5, vec![0, 36, 5, 5, 17]),
        (
            300,
            4096,
            (0..13).map(|i| i * 97 % 300).chain([299]).collect(),
        ),
        (1, 1, vec![0, 0, 0]),
        (4, 7, vec![]),
    ];
    for (v, d, ids) in &embeddings {
        for dtype in DTYPES {
            let table = rng.weight(&[*v, *d], 1.0, dtype);
            let case = format!("table [{v}, {d}] {dtype}, {} ids", ids.len());
            check!(t, "embedding", case, Tol::Exact, |b| {
                b.embedding(&table.upload(b)?, ids)
            });
        }
    }

    // ([B, Lq, Lk, H, d], logit scale; UMT5's is 1).
    let rel_cases: [([usize; 5], f32); 5] = [
        ([1, 1, 1, 1, 8], 1.0),
        ([2, 7, 7, 3, 64], 1.0),
        ([1, 130, 130, 2, 48], 0.125),
        ([1, 257, 12, 1, 100], 1.0),
        ([2, 12, 257, 4, 64], 1.0),
    ];
    for ([batch, lq, lk, h, d], scale) in rel_cases {
        let q = rng.tensor(&[batch, lq, h, d], 0.5);
        let k = rng.tensor(&[batch, lk, h, d], 0.5);
        let v = rng.tensor(&[batch, lk, h, d], 1.0);
        let rel = rng.tensor(&[h, lq + lk - 1], 2.0);
        let case = format!("B {batch} Lq {lq} Lk {lk} H {h} d {d} scale {scale}");
        check!(t, "attention_rel_bias", case, F32_TOL, |b| {
            let (q, k, v) = (q.upload(b)?, k.upload(b)?, v.upload(b)?);
            b.attention_rel_bias(&q, &k, &v, &rel.upload(b)?, scale)
        });
    }

    for shape in [vec![1], vec![7, 13], vec![2, 130, 257]] {
        let (x, y) = (rng.tensor(&shape, 2.0), rng.tensor(&shape, 2.0));
        let case = format!("{shape:?}");
        check!(t, "mul_assign", case, F32_TOL, |b| {
            in_place(b, &x, |x| b.mul_assign(x, &y.upload(b)?))
        });
    }
    t.finish();
}

// ================================================================================================
// Errors and collectives
// ================================================================================================

#[test]
#[ignore = "needs a GPU: scripts/gpu-check runs it"]
fn shape_errors_are_errors() {
    let gpu = common::cuda();
    let mut t = Table::new("shape errors", &gpu);
    let mut rng = Rng::new(8);
    let mut r = |s: &[usize]| rng.tensor(s, 1.0);
    let (x37, w56, w57, b4) = (r(&[3, 7]), r(&[5, 6]), r(&[5, 7]), r(&[4]));
    let (q, k, v6, m4) = (
        r(&[1, 5, 2, 8]),
        r(&[1, 5, 2, 8]),
        r(&[1, 6, 2, 8]),
        r(&[1, 4]),
    );
    let (x234, x235, w5, s23) = (r(&[2, 3, 4]), r(&[2, 3, 5]), r(&[5]), r(&[2, 3]));
    let (xv, wv, wt, g4) = (
        r(&[2, 3, 4, 5]),
        r(&[8, 4, 3, 3, 3]),
        r(&[8, 3, 3, 1, 1]),
        r(&[4]),
    );
    let (xr, tab, qkv4, rel) = (r(&[1, 2, 1, 5]), r(&[2, 2]), r(&[1, 4, 2, 2]), r(&[2, 8]));
    let id = Activation::Identity;

    refused!(t, "upload", "shape [2, 3] for 5 values", |b| {
        b.upload(&[2, 3], HostSlice::F32(&[0.0; 5]))
    });
    refused!(t, "linear", "x [3, 7] · w [5, 6]ᵀ", |b| {
        b.linear(&x37.upload(b)?, &w56.upload(b)?, None, id)
    });
    refused!(t, "linear", "bias [4] for 5 outputs", |b| {
        b.linear(&x37.upload(b)?, &w57.upload(b)?, Some(&b4.upload(b)?), id)
    });
    refused!(t, "attention", "k [1, 5, 2, 8], v [1, 6, 2, 8]", |b| {
        b.attention(&q.upload(b)?, &k.upload(b)?, &v6.upload(b)?, None)
    });
    refused!(t, "attention", "multiplicity [1, 4] for Lk 5", |b| {
        let (q, k) = (q.upload(b)?, k.upload(b)?);
        b.attention(&q, &k, &k, Some(&m4.upload(b)?))
    });
    refused!(t, "layer_norm", "affine width 5 for D 4", |b| {
        layer_norm(b, &x234, Some((&w5, &w5)), None)
    });
    refused!(t, "add_gated", "[2, 3, 4] += [2, 3, 5]", |b| {
        add_gated(b, &x234, &x235, None)
    });
    refused!(t, "rms_apply", "weight [5] for D 4", |b| {
        let (s, w) = (s23.upload(b)?, w5.upload(b)?);
        in_place(b, &x234, |x| b.rms_apply(x, &s, 4, 1e-6, &w))
    });
    refused!(t, "rope", "odd head width 5", |b| {
        in_place(b, &xr, |x| b.rope(x, &tab.upload(b)?, &tab.upload(b)?))
    });
    refused!(t, "slice_rows", "rows 2..4 of [3, 7]", |b| {
        b.slice_rows(&x37.upload(b)?, 2, 2)
    });
    refused!(t, "concat_rows", "[3, 7] with [5, 6]", |b| {
        b.concat_rows(&[x37.upload(b)?, w56.upload(b)?])
    });
    refused!(t, "unpatchify", "[2, 3, 4] for grid [1, 2, 2]", |b| {
        b.unpatchify(&x234.upload(b)?, [1, 2, 2], [1, 2, 2], 1)
    });
    refused!(t, "conv3d_causal", "Cin 3, weight Cin 4", |b| {
        b.conv3d_causal(&xv.upload(b)?, None, &wv.upload(b)?, None)
    });
    refused!(t, "conv_time_down2", "T 2 < kt 3", |b| {
        b.conv_time_down2(&xv.upload(b)?, &wt.upload(b)?, None)
    });
    refused!(t, "channel_rms_norm", "gamma [4] for 3 channels", |b| {
        b.channel_rms_norm(&xv.upload(b)?, &g4.upload(b)?, false)
    });
    refused!(t, "spatial_attention", "4 channels, not 3·C", |b| {
        b.spatial_attention(&qkv4.upload(b)?)
    });
    refused!(t, "attention_rel_bias", "bias [2, 8], not [2, 9]", |b| {
        let (q, k) = (q.upload(b)?, k.upload(b)?);
        b.attention_rel_bias(&q, &k, &k, &rel.upload(b)?, 1.0)
    });
    refused!(t, "mul_assign", "[3, 7] *= [5, 7]", |b| {
        in_place(b, &x37, |x| b.mul_assign(x, &w57.upload(b)?))
    });
    refused!(t, "embedding", "id 5 of a 5-row table", |b| {
        b.embedding(&w56.upload(b)?, &[0, 5])
    });

    // The GPU still works after refusing all of that.
    let w67 = rng.tensor(&[6, 7], 1.0);
    check!(t, "linear", "after the errors", F32_TOL, |b| {
        b.linear(&x37.upload(b)?, &w67.upload(b)?, None, id)
    });
    t.finish();
}

#[test]
#[ignore = "needs a GPU: scripts/gpu-check runs it"]
fn nccl_one_rank_collectives() {
    let gpu = common::cuda();
    let mut t = Table::new("NCCL, one rank", &gpu);
    let mut comms = NcclComm::group(std::slice::from_ref(&gpu)).expect("an NCCL group of one GPU");
    assert_eq!(comms.len(), 1, "one communicator per GPU");
    let comm = comms.pop().expect("one rank");
    let (rank, world) = (comm.rank(), comm.world_size());
    t.expect("group", "rank 0 of 1", (rank, world) == (0, 1), || {
        format!("{rank} of {world}")
    });

    let shape = [3, 5, 7];
    let values = Rng::new(9).tensor(&shape, 1.0).values;
    let same = |x: &Tensor<Cuda>| gpu.download(x).map(|v| v == values && x.shape() == shape);
    let mut x = gpu.upload_f32(&shape, values.clone()).expect("upload");

    let reduced = comm.all_reduce_sum(&mut x).and_then(|()| same(&x));
    t.holds("all_reduce_sum", "[3, 5, 7] unchanged", reduced);
    let gathered = comm.all_gather(&x).and_then(|g| same(&g));
    t.holds("all_gather", "[3, 5, 7] -> [3·1, 5, 7]", gathered);
    let sent = comm.broadcast(&mut x, 0).and_then(|()| same(&x));
    t.holds("broadcast", "from root 0, unchanged", sent);
    t.holds("barrier", "one rank", comm.barrier().map(|()| true));
    let bad = comm.broadcast(&mut x, 1);
    t.expect("broadcast", "from root 1 is an error", bad.is_err(), || {
        "accepted".into()
    });
    t.finish();
}
