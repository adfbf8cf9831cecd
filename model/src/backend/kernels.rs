//! Row kernels of the CPU backend: the fused elementwise passes. Each public function is compiled
//! three times (AVX-512, AVX2+FMA, baseline) from one body and picks the widest the CPU supports
//! at run time, so the binary stays portable while the loops vectorise.

use super::Activation;

/// Define a function whose body is compiled for AVX-512 and AVX2 as well as the baseline target,
/// dispatching at run time.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn inner($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                fn v512($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                fn v256($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                if has_avx512() {
                    // SAFETY: the CPU reported every feature `v512` was compiled for (a forced
                    // family only ever lowers the level below what was detected).
                    return unsafe { v512($($arg),*) };
                }
                if has_avx2() {
                    // SAFETY: the CPU reported every feature `v256` was compiled for (as above).
                    return unsafe { v256($($arg),*) };
                }
            }
            inner($($arg),*)
        }
    };
}

/// The environment variable that forces a lower kernel family than the CPU's best
/// (`avx512`, `avx2-fma` or `baseline`; the `cpu-x86_64-` prefix may be given), to run and check
/// every family on one machine.
pub const FORCE_ENV: &str = "LONGTAKE_CPU_KERNELS";

#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Baseline,
    Avx2,
    Avx512,
}

/// The level the CPU supports and the level forced by [`FORCE_ENV`] (if set and valid), or why
/// the variable cannot be honoured.
#[cfg(target_arch = "x86_64")]
fn resolve() -> Result<Level, String> {
    let detected = detected();
    let Ok(wanted) = std::env::var(FORCE_ENV) else {
        return Ok(detected);
    };
    let level = match wanted.trim().trim_start_matches("cpu-x86_64-") {
        "" => return Ok(detected),
        "avx512" => Level::Avx512,
        "avx2-fma" | "avx2" => Level::Avx2,
        "baseline" => Level::Baseline,
        other => {
            return Err(format!(
                "{FORCE_ENV}={other:?} is not a kernel family; allowed: avx512, avx2-fma, baseline"
            ));
        }
    };
    if level > detected {
        return Err(format!(
            "{FORCE_ENV}={wanted:?}: this CPU does not support it (its best family is {})",
            name(detected)
        ));
    }
    Ok(level)
}

#[cfg(target_arch = "x86_64")]
fn name(level: Level) -> &'static str {
    match level {
        Level::Avx512 => "cpu-x86_64-avx512",
        Level::Avx2 => "cpu-x86_64-avx2-fma",
        Level::Baseline => "cpu-x86_64-baseline",
    }
}

/// The dispatch level, decided once per process (an invalid [`FORCE_ENV`] falls back to the
/// CPU's best; [`check_forced`] reports it first).
#[cfg(target_arch = "x86_64")]
fn level() -> Level {
    static LEVEL: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| resolve().unwrap_or_else(|_| detected()))
}

/// The best level this CPU supports.
#[cfg(target_arch = "x86_64")]
fn detected() -> Level {
    if detect_avx512() {
        Level::Avx512
    } else if detect_avx2() {
        Level::Avx2
    } else {
        Level::Baseline
    }
}

/// Whether [`FORCE_ENV`] (if set) names a family this CPU can run.
pub fn check_forced() -> Result<(), String> {
    #[cfg(target_arch = "x86_64")]
    {
        resolve().map(|_| ())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        match std::env::var(FORCE_ENV) {
            Ok(v) if !v.trim().is_empty() => Err(format!(
                "{FORCE_ENV} is only supported on x86-64 (this machine: {})",
                family()
            )),
            _ => Ok(()),
        }
    }
}

/// The kernel family this process runs (the row kernels' dispatch level): results are
/// bit-identical only between machines of one family.
pub fn family() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        name(level())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        if cfg!(target_arch = "aarch64") {
            "cpu-aarch64"
        } else {
            "cpu-other"
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn detect_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("fma")
}

#[cfg(target_arch = "x86_64")]
fn detect_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// Whether the AVX-512 bodies run: the CPU has every feature they were compiled for (checked in
/// [`resolve`]) and no lower family is forced.
#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    level() == Level::Avx512
}

/// Whether the AVX2+FMA bodies run (when the AVX-512 ones do not).
#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    level() >= Level::Avx2
}

/// e^x with a relative error below 2e-7 over the f32 range (inputs below −87 give ~1e-38, not 0).
/// Written without branches so that loops over it vectorise.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5·2^23: adding it rounds to the nearest integer
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let f = x - n * LN2_HI - n * LN2_LO;
    // Taylor series of e^f on |f| ≤ ln2/2, degree 7.
    let p: f32 = 1.0 / 5040.0;
    let p = p.mul_add(f, 1.0 / 720.0);
    let p = p.mul_add(f, 1.0 / 120.0);
    let p = p.mul_add(f, 1.0 / 24.0);
    let p = p.mul_add(f, 1.0 / 6.0);
    let p = p.mul_add(f, 0.5);
    let p = p.mul_add(f, 1.0);
    let p = p.mul_add(f, 1.0);
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * scale
}

#[inline(always)]
fn gelu_tanh(x: f32) -> f32 {
    const K: f32 = 0.797_884_6; // √(2/π)
    let u = K * (x + 0.044715 * x * x * x);
    // tanh(u) = 1 − 2/(e^{2u} + 1)
    let t = 1.0 - 2.0 / (exp(2.0 * u) + 1.0);
    0.5 * x * (1.0 + t)
}

#[inline(always)]
fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

#[inline(always)]
fn apply(act: Activation, v: &mut [f32]) {
    match act {
        Activation::Identity => {}
        Activation::Silu => v.iter_mut().for_each(|x| *x = silu(*x)),
        Activation::GeluTanh => v.iter_mut().for_each(|x| *x = gelu_tanh(*x)),
    }
}

/// Lanes of the partial sums below: enough independent accumulators for the compiler to keep one
/// vector register per lane group without reassociating a single serial sum.
const LANES: usize = 16;

/// Σ f(x) with LANES independent accumulators (vectorises; a single accumulator would not,
/// since float addition is not associative).
#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += f(c[i]);
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for v in rest {
        s += f(*v);
    }
    s
}

/// max(x) over the entries whose multiplicity is positive (all entries without `mult`).
#[inline(always)]
fn lane_max(x: &[f32], mult: Option<&[f32]>) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    match mult {
        None => {
            let chunks = x.chunks_exact(LANES);
            let rest = chunks.remainder();
            for c in chunks {
                for i in 0..LANES {
                    acc[i] = acc[i].max(c[i]);
                }
            }
            rest.iter().fold(
                acc.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b)),
                |a, b| a.max(*b),
            )
        }
        Some(m) => x
            .iter()
            .zip(m)
            .filter(|(_, m)| **m > 0.0)
            .fold(f32::NEG_INFINITY, |a, (v, _)| a.max(*v)),
    }
}

/// x ← e^(x − max) in place, returning Σ x, with LANES accumulators.
#[inline(always)]
fn exp_shift_sum(x: &mut [f32], max: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            c[i] = exp(c[i] - max);
            acc[i] += c[i];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for v in chunks.into_remainder() {
        *v = exp(*v - max);
        s += *v;
    }
    s
}

multiversion! {
    /// `rows[r, :] = act(rows[r, :] + bias)` for a block of rows of width `bias.len()` (or `n`).
    pub fn bias_act(rows: &mut [f32], n: usize, bias: Option<&[f32]>, act: Activation) {
        for row in rows.chunks_exact_mut(n) {
            if let Some(b) = bias {
                row.iter_mut().zip(b).for_each(|(x, b)| *x += *b);
            }
            apply(act, row);
        }
    }
}

multiversion! {
    /// Layer norm of each row of width `d`, then optional affine and modulation, into `out`.
    pub fn layer_norm_rows(
        x: &[f32],
        out: &mut [f32],
        d: usize,
        eps: f32,
        affine: Option<(&[f32], &[f32])>,
        modulation: Option<(&[f32], &[f32])>,
    ) {
        for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let mean = lane_sum(xr, |v| v) / d as f32;
            let var = lane_sum(xr, |v| (v - mean) * (v - mean));
            let rstd = 1.0 / (var / d as f32 + eps).sqrt();
            for (o, v) in or.iter_mut().zip(xr) {
                *o = (*v - mean) * rstd;
            }
            if let Some((w, b)) = affine {
                for ((o, w), b) in or.iter_mut().zip(w).zip(b) {
                    *o = *o * *w + *b;
                }
            }
            if let Some((shift, scale)) = modulation {
                for ((o, sh), sc) in or.iter_mut().zip(shift).zip(scale) {
                    *o = *o * (1.0 + *sc) + *sh;
                }
            }
        }
    }
}

multiversion! {
    /// `x += y · gate` row by row (gate of width `d`), or `x += y`.
    pub fn add_gated_rows(x: &mut [f32], y: &[f32], d: usize, gate: Option<&[f32]>) {
        match gate {
            Some(g) => {
                for (xr, yr) in x.chunks_exact_mut(d).zip(y.chunks_exact(d)) {
                    for ((x, y), g) in xr.iter_mut().zip(yr).zip(g) {
                        *x += *y * *g;
                    }
                }
            }
            None => x.iter_mut().zip(y).for_each(|(x, y)| *x += *y),
        }
    }
}

multiversion! {
    /// Sum of squares of each row of width `d`.
    pub fn sum_squares_rows(x: &[f32], d: usize, out: &mut [f32]) {
        for (xr, o) in x.chunks_exact(d).zip(out.iter_mut()) {
            *o = lane_sum(xr, |v| v * v);
        }
    }
}

multiversion! {
    /// `x[r, :] *= rsqrt(sumsq[r] / full + eps) · w`.
    pub fn rms_apply_rows(x: &mut [f32], d: usize, sumsq: &[f32], full: f32, eps: f32, w: &[f32]) {
        for (xr, s) in x.chunks_exact_mut(d).zip(sumsq) {
            let r = 1.0 / (*s / full + eps).sqrt();
            for (x, w) in xr.iter_mut().zip(w) {
                *x = *x * r * *w;
            }
        }
    }
}

multiversion! {
    /// Softmax of each row of width `n` (scores already scaled), in place. With `mult`, each
    /// entry's exponential is weighted by its multiplicity; entries of multiplicity 0 vanish.
    pub fn softmax_rows(s: &mut [f32], n: usize, mult: Option<&[f32]>) {
        for row in s.chunks_exact_mut(n) {
            let max = lane_max(row, mult);
            let sum = match mult {
                None => exp_shift_sum(row, max),
                Some(m) => {
                    exp_shift_sum(row, max);
                    row.iter_mut().zip(m).for_each(|(v, m)| *v *= *m);
                    lane_sum(row, |v| v)
                }
            };
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|v| *v *= inv);
        }
    }
}

multiversion! {
    /// Interleaved-pair rotation of each head vector of width `d` in `x` (rows of `h·d`) by the
    /// angles of the matching token row of `cos`/`sin` (width `d/2`).
    pub fn rope_rows(x: &mut [f32], hd: usize, d: usize, cos: &[f32], sin: &[f32]) {
        let half = d / 2;
        for (tok, xr) in x.chunks_exact_mut(hd).enumerate() {
            let c = &cos[tok * half..(tok + 1) * half];
            let s = &sin[tok * half..(tok + 1) * half];
            for head in xr.chunks_exact_mut(d) {
                for ((pair, c), s) in head.chunks_exact_mut(2).zip(c).zip(s) {
                    let (a, b) = (pair[0], pair[1]);
                    pair[0] = a * *c - b * *s;
                    pair[1] = a * *s + b * *c;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_within_2e7() {
        let mut worst = 0.0f64;
        let mut x = -80.0f32;
        while x < 80.0 {
            let r = (exp(x) as f64 - (x as f64).exp()).abs() / (x as f64).exp();
            worst = worst.max(r);
            x += 0.0137;
        }
        assert!(worst < 2e-7, "worst relative error {worst}");
    }

    #[test]
    fn gelu_and_silu_match_formulas() {
        for i in -400..400 {
            let x = i as f32 * 0.025;
            let g = 0.5
                * x
                * (1.0 + ((2.0 / std::f32::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh());
            assert!((gelu_tanh(x) - g).abs() < 1e-6, "gelu({x})");
            assert!((silu(x) - x / (1.0 + (-x).exp())).abs() < 1e-6, "silu({x})");
        }
    }
}

multiversion! {
    /// Wan's channel RMS norm of one frame `[C, HW]` (optionally then SiLU): every pixel's
    /// channel vector scaled by `√C / max(‖x‖₂, 1e−12)` and by `gamma[c]`.
    pub fn channel_rms_frame(x: &[f32], out: &mut [f32], c: usize, hw: usize, gamma: &[f32], silu_after: bool) {
        let mut ss = vec![0.0f32; hw];
        for ch in 0..c {
            let row = &x[ch * hw..(ch + 1) * hw];
            ss.iter_mut().zip(row).for_each(|(s, v)| *s += *v * *v);
        }
        let root_c = (c as f32).sqrt();
        ss.iter_mut().for_each(|s| *s = root_c / s.sqrt().max(1e-12));
        for ch in 0..c {
            let g = gamma[ch];
            let row = &x[ch * hw..(ch + 1) * hw];
            let o = &mut out[ch * hw..(ch + 1) * hw];
            if silu_after {
                o.iter_mut().zip(row).zip(&ss).for_each(|((o, v), s)| *o = silu(*v * *s * g));
            } else {
                o.iter_mut().zip(row).zip(&ss).for_each(|((o, v), s)| *o = *v * *s * g);
            }
        }
    }
}

multiversion! {
    /// `x *= y` elementwise.
    pub fn mul_rows(x: &mut [f32], y: &[f32]) {
        x.iter_mut().zip(y).for_each(|(x, y)| *x *= *y);
    }
}

multiversion! {
    /// Softmax of each row of width `n` after adding a relative-position (Toeplitz) bias: row
    /// `r` adds `rel[start - r..start - r + n]`, so entry `j` depends only on `j − r`.
    pub fn softmax_rel_bias_rows(s: &mut [f32], n: usize, rel: &[f32], start: usize) {
        for (r, row) in s.chunks_exact_mut(n).enumerate() {
            let bias = &rel[start - r..start - r + n];
            row.iter_mut().zip(bias).for_each(|(v, b)| *v += *b);
            let max = lane_max(row, None);
            let inv = 1.0 / exp_shift_sum(row, max);
            row.iter_mut().for_each(|v| *v *= inv);
        }
    }
}
