//! Denoising a long latent sequence as overlapping windows (ARCHITECTURE.md §3).
//!
//! Latents are `[C, T, h·w]` (one batch item, diffusers layout). A window sees frames
//! `start .. start + len` with rotary positions starting at 0. The building blocks here —
//! per-window sampler state, the fusion of window predictions, re-noising held frames — are the
//! same whether all windows live in one process ([`denoise`]) or are spread over workers that
//! exchange only the overlaps: every fused value is computed from the same inputs in the same
//! order, so the result does not depend on where windows ran.

use std::ops::Range;

use crate::comm::Comm;
use crate::error::{Error, Result};
use crate::pipeline::{Guided, PipelineBackend};
use crate::sched::{Sampler, SchedulerConfig};

/// How windows are stitched together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stitching {
    /// Every step, each window's guided prediction is fused per frame with the plan's weights,
    /// then one sampler step is applied to the whole sequence.
    Codenoise,
    /// Windows sampled alone; their final latents fused with the same weights.
    Independent,
    /// Windows in order; each window's frames shared with the previous one are held to that
    /// window's clean result, re-noised at every step to a share of the step's noise level (see
    /// [`Hold`]).
    Autoregressive,
}

/// How an autoregressive window holds the frames it shares with the previous window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hold {
    /// Share (0..=1) of each step's noise level σ that the held frames are re-noised to.
    pub noise: f32,
    /// Noise level (0..=1) at and below which the held frames are released: from the first step
    /// whose σ is at most `release`, the window denoises them with its own frames, and its
    /// result over the shared frames is blended from the previous window's (first shared frame)
    /// to its own (last), so the hand-over is spread over the overlap instead of falling
    /// between two frames. 0 holds them to the end.
    pub release: f32,
}

impl Default for Hold {
    /// Held as noisy as the window's own frames, to the end.
    fn default() -> Self {
        Hold {
            noise: 1.0,
            release: 0.0,
        }
    }
}

impl Stitching {
    /// Every strategy, in the order the docs and `longtake compare` list them.
    pub const ALL: [Stitching; 3] = [
        Stitching::Codenoise,
        Stitching::Independent,
        Stitching::Autoregressive,
    ];

    /// The strategy named `s` (its [`name`](Self::name)).
    pub fn parse(s: &str) -> Option<Stitching> {
        Self::ALL.into_iter().find(|m| m.name() == s)
    }

    /// The strategies' names, comma-separated, for error messages.
    pub fn allowed() -> String {
        Self::ALL.map(Stitching::name).join(", ")
    }

    pub fn name(self) -> &'static str {
        match self {
            Stitching::Codenoise => "codenoise",
            Stitching::Independent => "independent",
            Stitching::Autoregressive => "autoregressive",
        }
    }
}

/// One window of the plan: frames `start .. start + len` and each frame's fusion weight.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowSpec {
    pub start: usize,
    pub len: usize,
    pub weights: Vec<f32>,
}

impl WindowSpec {
    pub fn frames(&self) -> Range<usize> {
        self.start..self.start + self.len
    }
}

/// The geometry of a latent sequence: channels, frames, pixels per frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub channels: usize,
    pub frames: usize,
    pub height: usize,
    pub width: usize,
}

impl Geometry {
    fn plane(&self) -> usize {
        self.height * self.width
    }

    /// The `[C, len, h, w]` shape of a window.
    pub fn window_shape(&self, len: usize) -> [usize; 4] {
        [self.channels, len, self.height, self.width]
    }

    /// Copy frames `range` of `x` (`[C, T, hw]`) into a `[C, range.len(), hw]` buffer.
    pub fn take(&self, x: &[f32], range: Range<usize>) -> Vec<f32> {
        let hw = self.plane();
        let mut out = Vec::with_capacity(self.channels * range.len() * hw);
        for c in 0..self.channels {
            let base = c * self.frames * hw;
            out.extend_from_slice(&x[base + range.start * hw..base + range.end * hw]);
        }
        out
    }

    /// Write `src` (`[C, n, hw]`) over frames `start .. start + n` of `x`.
    pub fn put(&self, x: &mut [f32], start: usize, src: &[f32]) {
        let hw = self.plane();
        let n = src.len() / (self.channels * hw).max(1);
        for c in 0..self.channels {
            let base = c * self.frames * hw;
            x[base + start * hw..base + (start + n) * hw]
                .copy_from_slice(&src[c * n * hw..(c + 1) * n * hw]);
        }
    }
}

/// A window's prediction (or latents) over frames `start .. start + len`, `[C, len, hw]`, with
/// the index of the window that made it.
#[derive(Debug, Clone)]
pub struct Part {
    pub window: usize,
    pub start: usize,
    pub len: usize,
    pub data: Vec<f32>,
}

/// Fuse parts over frames `range`: every frame is `Σ_w weight_w · part_w` over the parts that
/// cover it, added in ascending window order starting from zero (the fixed order is what makes
/// every worker compute bit-identical values). `plan[w]` gives window `w`'s weights.
pub fn fuse(
    geo: &Geometry,
    plan: &[WindowSpec],
    range: Range<usize>,
    parts: &[&Part],
) -> Result<Vec<f32>> {
    let hw = geo.plane();
    let n = range.len();
    let mut out = vec![0.0f32; geo.channels * n * hw];
    let mut order: Vec<&&Part> = parts.iter().collect();
    order.sort_by_key(|p| p.window);
    let mut covered = vec![false; n];
    for p in order {
        let spec = plan
            .get(p.window)
            .ok_or_else(|| Error::input("window", format!("{} is not in the plan", p.window)))?;
        if p.data.len() != geo.channels * p.len * hw
            || p.start < spec.start
            || p.start + p.len > spec.start + spec.len
        {
            return Err(Error::input(
                "halo",
                format!(
                    "part of window {} over frames {}..{} does not fit the plan",
                    p.window,
                    p.start,
                    p.start + p.len
                ),
            ));
        }
        let lo = p.start.max(range.start);
        let hi = (p.start + p.len).min(range.end);
        for f in lo..hi {
            let wgt = spec.weights[f - spec.start];
            covered[f - range.start] = true;
            for c in 0..geo.channels {
                let src =
                    &p.data[(c * p.len + f - p.start) * hw..(c * p.len + f - p.start + 1) * hw];
                let dst =
                    &mut out[(c * n + f - range.start) * hw..(c * n + f - range.start + 1) * hw];
                dst.iter_mut().zip(src).for_each(|(d, s)| *d += wgt * *s);
            }
        }
    }
    if let Some(i) = covered.iter().position(|c| !c) {
        return Err(Error::input(
            "halo",
            format!("no prediction covers frame {}", range.start + i),
        ));
    }
    Ok(out)
}

/// One window's sampling state.
pub struct WindowState {
    pub index: usize,
    pub spec: WindowSpec,
    /// The window's latents `[C, len, hw]`.
    pub x: Vec<f32>,
    /// The initial noise of the window's frames (for re-noising held frames).
    noise: Vec<f32>,
    sampler: Box<dyn Sampler>,
}

impl WindowState {
    /// A window starting from `noise` (the whole sequence's initial noise).
    pub fn new(
        index: usize,
        spec: WindowSpec,
        geo: &Geometry,
        noise_all: &[f32],
        scheduler: &SchedulerConfig,
        steps: usize,
    ) -> Result<Self> {
        let noise = geo.take(noise_all, spec.frames());
        Ok(WindowState {
            index,
            x: noise.clone(),
            noise,
            sampler: scheduler.build(steps)?,
            spec,
        })
    }

    pub fn timesteps(&self) -> &[f32] {
        self.sampler.timesteps()
    }

    /// The guided prediction for the current step.
    pub fn predict<B: PipelineBackend>(
        &self,
        guided: &Guided<'_, B>,
        comm: &dyn Comm<B>,
        geo: &Geometry,
    ) -> Result<Part> {
        let i = self.sampler.step_index();
        let t = *self
            .sampler
            .timesteps()
            .get(i)
            .ok_or_else(|| Error::input("step", "sampling is finished"))?;
        let data = guided.velocity(comm, &self.x, geo.window_shape(self.spec.len), t)?;
        Ok(Part {
            window: self.index,
            start: self.spec.start,
            len: self.spec.len,
            data,
        })
    }

    /// Apply one sampler step with the (fused) velocity over the window's frames.
    pub fn step(&mut self, velocity: &[f32]) -> Result<()> {
        self.sampler.step(velocity, &mut self.x)
    }

    /// Steps taken so far.
    pub fn step_index(&self) -> usize {
        self.sampler.step_index()
    }

    /// The window's complete state between two steps (latents and the sampler's history) as a
    /// safetensors file: tensor `x` and `sampler.<name>` tensors, and metadata naming the window,
    /// its frames, the step and the sampler's counters. [`WindowState::restore`] continues from
    /// it bit-identically.
    pub fn checkpoint(&self) -> Result<Vec<u8>> {
        let state = self.sampler.snapshot();
        let len = self.x.len();
        let names: Vec<String> = state
            .tensors
            .iter()
            .map(|(n, _)| format!("sampler.{n}"))
            .collect();
        let shape = [len];
        let mut tensors: Vec<(&str, &[usize], &[f32])> = vec![("x", &shape, &self.x)];
        for (name, (_, t)) in names.iter().zip(&state.tensors) {
            tensors.push((name, &shape, t));
        }
        let counters: Vec<String> = state.counters.iter().map(usize::to_string).collect();
        let metadata = [
            ("format", "longtake.window-checkpoint".to_string()),
            ("format_version", "1".to_string()),
            ("window", self.index.to_string()),
            ("start", self.spec.start.to_string()),
            ("len", self.spec.len.to_string()),
            ("step_index", state.step_index.to_string()),
            ("counters", counters.join(",")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        crate::io::f32_safetensors(&tensors, metadata)
    }

    /// Continue from a [`WindowState::checkpoint`] of this window (same plan, sampler and step
    /// count). Checks that it is this window's, and its sizes, before changing anything.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<()> {
        let bad = |reason: String| Error::input("checkpoint", reason);
        let meta = crate::io::safetensors_metadata(bytes)?;
        let field = |k: &str| {
            meta.get(k)
                .cloned()
                .ok_or_else(|| bad(format!("metadata has no {k:?}")))
        };
        let number = |k: &str| -> Result<usize> {
            field(k)?
                .parse()
                .map_err(|_| bad(format!("metadata {k:?} is not a number")))
        };
        if field("format")? != "longtake.window-checkpoint" || field("format_version")? != "1" {
            return Err(bad("not a version-1 window checkpoint".into()));
        }
        let (window, start, len) = (number("window")?, number("start")?, number("len")?);
        if (window, start, len) != (self.index, self.spec.start, self.spec.len) {
            return Err(bad(format!(
                "it is window {window} (frames {start}+{len}); this is window {} (frames {}+{})",
                self.index, self.spec.start, self.spec.len
            )));
        }
        let counters: Vec<usize> = field("counters")?
            .split(',')
            .filter(|c| !c.is_empty())
            .map(|c| c.parse().map_err(|_| bad(format!("counter {c:?}"))))
            .collect::<Result<_>>()?;
        let (_, x) = crate::io::read_f32_bytes(bytes, "x")?;
        if x.len() != self.x.len() {
            return Err(bad(format!(
                "x has {} values; the window has {}",
                x.len(),
                self.x.len()
            )));
        }
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
        let mut tensors = Vec::new();
        for name in st.names() {
            if let Some(short) = name.strip_prefix("sampler.") {
                tensors.push((short.to_string(), crate::io::read_f32_bytes(bytes, name)?.1));
            }
        }
        let state = crate::sched::SamplerState {
            step_index: number("step_index")?,
            counters,
            tensors,
        };
        self.sampler.restore(&state, x.len())?;
        self.x = x;
        Ok(())
    }

    /// Hold frames `range` (absolute) to `clean` (`[C, range.len(), hw]`), re-noised to
    /// `hold_noise` times the current step's noise level σ: `(1 − s)·clean + s·noise` with
    /// `s = hold_noise·σ`; after the last step, `clean`. At `hold_noise` 1 the held frames are
    /// as noisy as the rest of the window; below 1 the model sees them cleaner than the rest.
    pub fn hold(&mut self, geo: &Geometry, range: Range<usize>, clean: &[f32], hold_noise: f32) {
        let sigma = hold_noise * self.sigma();
        let (wgeo, local) = self.local(geo, range);
        let noise = wgeo.take(&self.noise, local.clone());
        let held: Vec<f32> = clean
            .iter()
            .zip(&noise)
            .map(|(c, n)| (1.0 - sigma) * c + sigma * n)
            .collect();
        wgeo.put(&mut self.x, local.start, &held);
    }

    /// The window's geometry, and the absolute frames `range` as frames of the window.
    fn local(&self, geo: &Geometry, range: Range<usize>) -> (Geometry, Range<usize>) {
        let wgeo = Geometry {
            frames: self.spec.len,
            ..*geo
        };
        (
            wgeo,
            range.start - self.spec.start..range.end - self.spec.start,
        )
    }

    /// The noise level σ of the next step; 0 once sampling is finished.
    pub fn sigma(&self) -> f32 {
        self.sampler
            .sigmas()
            .get(self.sampler.step_index())
            .copied()
            .unwrap_or(0.0)
    }

    /// Blend frames `range` (absolute) from `clean` (`[C, range.len(), hw]`, the previous
    /// window's result) to this window's own: frame `j` of `n` becomes
    /// `(1 − a)·clean + a·own` with `a = (j + 1)/(n + 1)`.
    pub fn ramp(&mut self, geo: &Geometry, range: Range<usize>, clean: &[f32]) {
        let (wgeo, local) = self.local(geo, range);
        let n = local.len();
        let hw = geo.plane();
        let mut own = wgeo.take(&self.x, local.clone());
        for (i, (o, c)) in own.iter_mut().zip(clean).enumerate() {
            let a = ((i / hw) % n + 1) as f32 / (n + 1) as f32;
            *o = (1.0 - a) * c + a * *o;
        }
        wgeo.put(&mut self.x, local.start, &own);
    }

    /// The window's current latents as a part.
    pub fn latents(&self) -> Part {
        Part {
            window: self.index,
            start: self.spec.start,
            len: self.spec.len,
            data: self.x.clone(),
        }
    }
}

/// Frames shared by two windows.
pub fn overlap(a: &WindowSpec, b: &WindowSpec) -> Range<usize> {
    let lo = a.start.max(b.start);
    let hi = (a.start + a.len).min(b.start + b.len);
    lo..hi.max(lo)
}

/// Denoise a whole sequence in one process: the reference for the distributed run, and the
/// single-worker path. `noise` is `[C, T, h, w]`; returns the final latents in the same layout.
/// `progress(done, total)` counts window-steps. `hold` says how autoregressive windows hold the
/// frames they share with the previous window (see [`Hold`]); the other strategies hold nothing.
#[allow(clippy::too_many_arguments)]
pub fn denoise<B: PipelineBackend>(
    guided: &Guided<'_, B>,
    comm: &dyn Comm<B>,
    scheduler: &SchedulerConfig,
    steps: usize,
    geo: &Geometry,
    noise: &[f32],
    plan: &[WindowSpec],
    stitching: Stitching,
    hold: Hold,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<f32>> {
    if noise.len() != geo.channels * geo.frames * geo.plane() {
        return Err(Error::input("noise", "does not match the latent geometry"));
    }
    let mut windows: Vec<WindowState> = plan
        .iter()
        .enumerate()
        .map(|(i, s)| WindowState::new(i, s.clone(), geo, noise, scheduler, steps))
        .collect::<Result<_>>()?;
    let total = steps * windows.len();
    let mut done = 0;
    let mut out = vec![0.0f32; noise.len()];
    match stitching {
        Stitching::Codenoise => {
            for _ in 0..steps {
                let preds: Vec<Part> = windows
                    .iter()
                    .map(|w| w.predict(guided, comm, geo))
                    .collect::<Result<_>>()?;
                let refs: Vec<&Part> = preds.iter().collect();
                for w in windows.iter_mut() {
                    let fused = fuse(geo, plan, w.spec.frames(), &refs)?;
                    w.step(&fused)?;
                    done += 1;
                    progress(done, total);
                }
            }
            // Overlap frames are identical in every window that holds them; take each frame
            // from the first.
            for w in windows.iter().rev() {
                geo.put(&mut out, w.spec.start, &w.x);
            }
        }
        Stitching::Independent => {
            for w in windows.iter_mut() {
                for _ in 0..steps {
                    let p = w.predict(guided, comm, geo)?;
                    w.step(&p.data)?;
                    done += 1;
                    progress(done, total);
                }
            }
            let finals: Vec<Part> = windows.iter().map(|w| w.latents()).collect();
            let refs: Vec<&Part> = finals.iter().collect();
            out = fuse(geo, plan, 0..geo.frames, &refs)?;
        }
        Stitching::Autoregressive => {
            let mut prev: Option<Part> = None;
            for w in windows.iter_mut() {
                let held = prev.as_ref().map(|p| {
                    let r = overlap(
                        &WindowSpec {
                            start: p.start,
                            len: p.len,
                            weights: vec![],
                        },
                        &w.spec,
                    );
                    let pgeo = Geometry {
                        frames: p.len,
                        ..*geo
                    };
                    let clean = pgeo.take(&p.data, r.start - p.start..r.end - p.start);
                    (r, clean)
                });
                let mut released = false;
                for _ in 0..steps {
                    if let Some((r, clean)) = &held {
                        if w.sigma() > hold.release {
                            w.hold(geo, r.clone(), clean, hold.noise);
                        } else {
                            released = true;
                        }
                    }
                    let p = w.predict(guided, comm, geo)?;
                    w.step(&p.data)?;
                    done += 1;
                    progress(done, total);
                }
                match &held {
                    Some((r, clean)) if released => w.ramp(geo, r.clone(), clean),
                    Some((r, clean)) => w.hold(geo, r.clone(), clean, hold.noise),
                    None => {}
                }
                geo.put(&mut out, w.spec.start, &w.x);
                prev = Some(w.latents());
            }
        }
    }
    Ok(out)
}
