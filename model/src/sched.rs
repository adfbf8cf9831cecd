//! Flow-matching samplers as Wan configures them (wan21.md §3): `UniPCMultistepScheduler`
//! (flow prediction, flow sigmas, bh2, predictor-corrector) and `FlowMatchEulerDiscreteScheduler`,
//! chosen from `scheduler/scheduler_config.json`'s `_class_name`.
//!
//! Samplers work on host f32 latents: a step is a handful of axpy passes over the latents, small
//! next to one transformer forward, and keeping them on the host keeps the state easy to
//! checkpoint and to split into windows.

use std::path::Path;

use crate::config::ConfigReader;
use crate::error::{Error, Result};

/// A sampler: a fixed sequence of timesteps and the update that moves the latents from one noise
/// level to the next given the model's velocity prediction.
pub trait Sampler: Send {
    /// Timesteps passed to the model, one per step.
    fn timesteps(&self) -> &[f32];
    /// Noise levels, one more than the steps (the last is where sampling ends).
    fn sigmas(&self) -> &[f32];
    /// Steps taken so far.
    fn step_index(&self) -> usize;
    /// Apply one step in place: `x` holds the latents at the current noise level and receives
    /// those at the next.
    fn step(&mut self, velocity: &[f32], x: &mut [f32]) -> Result<()>;
    /// Everything besides the latents that the next steps depend on (the multistep history),
    /// so that a restored sampler continues bit-identically.
    fn snapshot(&self) -> SamplerState;
    /// Continue from a snapshot of a sampler with the same configuration and step count.
    /// `len` is the latents' length: the history must match it.
    fn restore(&mut self, state: &SamplerState, len: usize) -> Result<()>;
}

/// A sampler's state between steps: its step index, integer counters and history tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerState {
    pub step_index: usize,
    pub counters: Vec<usize>,
    pub tensors: Vec<(String, Vec<f32>)>,
}

fn restore_error(reason: String) -> Error {
    Error::input("checkpoint", reason)
}

/// A validated scheduler configuration.
#[derive(Debug, Clone, PartialEq)]
pub enum SchedulerConfig {
    UniPc(UniPcConfig),
    FlowMatchEuler {
        shift: f64,
        num_train_timesteps: usize,
    },
}

/// The `UniPCMultistepScheduler` options the flow path uses.
#[derive(Debug, Clone, PartialEq)]
pub struct UniPcConfig {
    pub flow_shift: f64,
    pub num_train_timesteps: usize,
    pub solver_order: usize,
    pub lower_order_final: bool,
    /// `final_sigmas_type == "zero"` (otherwise `sigma_min`: the last sigma repeated).
    pub final_sigma_zero: bool,
    pub disable_corrector: Vec<usize>,
}

impl SchedulerConfig {
    /// Read `scheduler_config.json`, rejecting options this implementation does not follow.
    pub fn from_file(path: &Path) -> Result<Self> {
        let c = ConfigReader::open(path)?;
        let class = c.str_or("_class_name", "")?;
        match class {
            "UniPCMultistepScheduler" => {
                let must = |key: &str, ok: bool, allowed: &str| -> Result<()> {
                    if ok {
                        Ok(())
                    } else {
                        Err(c.error(key, format!("unsupported value; allowed: {allowed}")))
                    }
                };
                must(
                    "prediction_type",
                    c.str_or("prediction_type", "epsilon")? == "flow_prediction",
                    "\"flow_prediction\"",
                )?;
                must(
                    "use_flow_sigmas",
                    c.bool_or("use_flow_sigmas", false)?,
                    "true",
                )?;
                must("predict_x0", c.bool_or("predict_x0", true)?, "true")?;
                must(
                    "solver_type",
                    c.str_or("solver_type", "bh2")? == "bh2",
                    "\"bh2\"",
                )?;
                must("thresholding", !c.bool_or("thresholding", false)?, "false")?;
                for key in [
                    "use_karras_sigmas",
                    "use_exponential_sigmas",
                    "use_beta_sigmas",
                    "use_dynamic_shifting",
                ] {
                    must(key, !c.bool_or(key, false)?, "false")?;
                }
                let final_type = c.str_or("final_sigmas_type", "zero")?;
                must(
                    "final_sigmas_type",
                    matches!(final_type, "zero" | "sigma_min"),
                    "\"zero\", \"sigma_min\"",
                )?;
                let solver_order = c.usize_or("solver_order", 2)?;
                must("solver_order", (1..=2).contains(&solver_order), "1, 2")?;
                Ok(SchedulerConfig::UniPc(UniPcConfig {
                    flow_shift: positive(&c, "flow_shift", 1.0)?,
                    num_train_timesteps: train_steps(&c)?,
                    solver_order,
                    lower_order_final: c.bool_or("lower_order_final", true)?,
                    final_sigma_zero: final_type == "zero",
                    disable_corrector: c.usize_list_or("disable_corrector", &[])?,
                }))
            }
            "FlowMatchEulerDiscreteScheduler" => {
                for key in [
                    "use_dynamic_shifting",
                    "use_karras_sigmas",
                    "use_exponential_sigmas",
                    "use_beta_sigmas",
                    "invert_sigmas",
                    "stochastic_sampling",
                ] {
                    if c.bool_or(key, false)? {
                        return Err(c.error(key, "unsupported value; allowed: false"));
                    }
                }
                if c.raw("shift_terminal").is_some() {
                    return Err(c.error("shift_terminal", "unsupported; allowed: null"));
                }
                Ok(SchedulerConfig::FlowMatchEuler {
                    shift: positive(&c, "shift", 1.0)?,
                    num_train_timesteps: train_steps(&c)?,
                })
            }
            other => Err(c.error(
                "_class_name",
                format!(
                    "{other:?} is not supported; allowed: \"UniPCMultistepScheduler\", \
                     \"FlowMatchEulerDiscreteScheduler\""
                ),
            )),
        }
    }

    /// Wan's shipped scheduler (UniPC, flow shift 3).
    pub fn wan_default() -> Self {
        SchedulerConfig::UniPc(UniPcConfig {
            flow_shift: 3.0,
            num_train_timesteps: 1000,
            solver_order: 2,
            lower_order_final: true,
            final_sigma_zero: true,
            disable_corrector: vec![],
        })
    }

    /// The same scheduler with another shift (`--flow-shift`).
    pub fn with_shift(mut self, shift: f64) -> Result<Self> {
        if !(shift.is_finite() && shift > 0.0) {
            return Err(Error::input(
                "flow_shift",
                format!("{shift} must be a positive number"),
            ));
        }
        match &mut self {
            SchedulerConfig::UniPc(u) => u.flow_shift = shift,
            SchedulerConfig::FlowMatchEuler { shift: s, .. } => *s = shift,
        }
        Ok(self)
    }

    /// A sampler for `steps` steps.
    pub fn build(&self, steps: usize) -> Result<Box<dyn Sampler>> {
        if steps == 0 {
            return Err(Error::input("steps", "must be at least 1"));
        }
        Ok(match self {
            SchedulerConfig::UniPc(cfg) => Box::new(UniPc::new(cfg.clone(), steps)?),
            SchedulerConfig::FlowMatchEuler {
                shift,
                num_train_timesteps,
            } => Box::new(FlowMatchEuler::new(*shift, *num_train_timesteps, steps)?),
        })
    }
}

fn positive(c: &ConfigReader, key: &str, default: f64) -> Result<f64> {
    let v = c.f64_or(key, default)?;
    if !(v.is_finite() && v > 0.0) {
        return Err(c.error(key, format!("must be a positive number, found {v}")));
    }
    Ok(v)
}

fn train_steps(c: &ConfigReader) -> Result<usize> {
    let n = c.usize_or("num_train_timesteps", 1000)?;
    if n < 2 {
        return Err(c.error(
            "num_train_timesteps",
            format!("must be at least 2, found {n}"),
        ));
    }
    Ok(n)
}

fn shift_sigma(shift: f64, s: f64) -> f64 {
    shift * s / (1.0 + (shift - 1.0) * s)
}

fn check_len(velocity: &[f32], x: &[f32]) -> Result<()> {
    if velocity.len() != x.len() {
        return Err(Error::input(
            "model_output",
            format!("{} values for latents of {}", velocity.len(), x.len()),
        ));
    }
    Ok(())
}

fn done_error(n: usize) -> Error {
    Error::input(
        "step",
        format!("the sampler has already taken all {n} steps"),
    )
}

/// `UniPCMultistepScheduler` with flow sigmas, x0 prediction and the bh2 update.
pub struct UniPc {
    cfg: UniPcConfig,
    sigmas: Vec<f32>,
    timesteps: Vec<f32>,
    step_index: usize,
    /// The last two x0 predictions, oldest first.
    outputs: [Option<Vec<f32>>; 2],
    last_sample: Option<Vec<f32>>,
    this_order: usize,
    lower_order_nums: usize,
}

impl UniPc {
    pub fn new(cfg: UniPcConfig, steps: usize) -> Result<Self> {
        let n = steps;
        let ntrain = cfg.num_train_timesteps as f64;
        // linspace(1, 1/ntrain, n+1) without its last point, shifted, in f64; a first sigma of
        // 1 is nudged to 1 − 1e-6 so that λ(σ) stays finite.
        let step = (1.0 / ntrain - 1.0) / n as f64;
        let mut s: Vec<f64> = (0..n)
            .map(|i| shift_sigma(cfg.flow_shift, 1.0 + i as f64 * step))
            .collect();
        if (s[0] - 1.0).abs() < 1e-6 {
            s[0] -= 1e-6;
        }
        let timesteps: Vec<f32> = s.iter().map(|v| (v * ntrain).trunc() as f32).collect();
        let last = if cfg.final_sigma_zero { 0.0 } else { s[n - 1] };
        let mut sigmas: Vec<f32> = s.iter().map(|&v| v as f32).collect();
        sigmas.push(last as f32);
        Ok(UniPc {
            cfg,
            sigmas,
            timesteps,
            step_index: 0,
            outputs: [None, None],
            last_sample: None,
            this_order: 0,
            lower_order_nums: 0,
        })
    }

    fn lambda(sigma: f32) -> f64 {
        let s = sigma as f64;
        (1.0 - s).ln() - s.ln()
    }
}

impl Sampler for UniPc {
    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    fn step_index(&self) -> usize {
        self.step_index
    }

    fn step(&mut self, velocity: &[f32], x: &mut [f32]) -> Result<()> {
        check_len(velocity, x)?;
        let n = self.timesteps.len();
        let i = self.step_index;
        if i >= n {
            return Err(done_error(n));
        }
        let sig = &self.sigmas;
        // x0 prediction from the uncorrected sample.
        let s_i = sig[i];
        let m: Vec<f32> = x.iter().zip(velocity).map(|(x, v)| *x - s_i * *v).collect();

        // Corrector (UniC) towards sigma_i, with the previous step's order.
        let use_corrector = i > 0 && !self.cfg.disable_corrector.contains(&(i - 1));
        if let (true, Some(last), Some(m0)) = (use_corrector, &self.last_sample, &self.outputs[1]) {
            let order = self.this_order;
            let (st, s0) = (sig[i], sig[i - 1]);
            let alpha_t = 1.0 - st as f64;
            let h = Self::lambda(st) - Self::lambda(s0);
            let hh = -h;
            let phi = hh.exp_m1();
            let bh = phi;
            let ratio = (st as f64 / s0 as f64) as f32;
            let c_m0 = (alpha_t * phi) as f32;
            let (rho_d1, rho_t, d1) = if order >= 2 {
                let mprev = self.outputs[0].as_ref().expect("order 2 has two outputs");
                let r = (Self::lambda(sig[i - 2]) - Self::lambda(s0)) / h;
                let k1 = phi / hh - 1.0;
                let b1 = k1 / bh;
                let k2 = k1 / hh - 0.5;
                let b2 = 2.0 * k2 / bh;
                let rho0 = (b1 - b2) / (1.0 - r);
                let rho1 = (b2 - r * b1) / (1.0 - r);
                (rho0, rho1, Some((mprev, r)))
            } else {
                (0.0, 0.5, None)
            };
            let c_corr = (alpha_t * bh) as f32;
            let (rho_d1, rho_t) = (rho_d1 as f32, rho_t as f32);
            match d1 {
                Some((mprev, r)) => {
                    let r = r as f32;
                    for k in 0..x.len() {
                        let base = ratio * last[k] - c_m0 * m0[k];
                        let d1 = (mprev[k] - m0[k]) / r;
                        x[k] = base - c_corr * (rho_d1 * d1 + rho_t * (m[k] - m0[k]));
                    }
                }
                None => {
                    for k in 0..x.len() {
                        let base = ratio * last[k] - c_m0 * m0[k];
                        x[k] = base - c_corr * (rho_t * (m[k] - m0[k]));
                    }
                }
            }
        }

        // History and order for this step.
        self.outputs.swap(0, 1);
        self.outputs[1] = Some(m);
        let mut order = self.cfg.solver_order;
        if self.cfg.lower_order_final {
            order = order.min(n - i);
        }
        self.this_order = order.min(self.lower_order_nums + 1);
        self.last_sample = Some(x.to_vec());

        // Predictor (UniP) from sigma_i to sigma_{i+1}.
        let m = self.outputs[1].as_ref().expect("just stored");
        let (st, s0) = (sig[i + 1], sig[i]);
        if st == 0.0 {
            // λ = +∞: the update reduces to the x0 prediction.
            x.copy_from_slice(m);
        } else {
            let alpha_t = 1.0 - st as f64;
            let h = Self::lambda(st) - Self::lambda(s0);
            let hh = -h;
            let phi = hh.exp_m1();
            let ratio = (st as f64 / s0 as f64) as f32;
            let c_m0 = (alpha_t * phi) as f32;
            if self.this_order >= 2 {
                let mprev = self.outputs[0].as_ref().expect("order 2 has two outputs");
                let r = ((Self::lambda(sig[i - 1]) - Self::lambda(s0)) / h) as f32;
                let c_d1 = (alpha_t * phi * 0.5) as f32;
                for k in 0..x.len() {
                    let d1 = (mprev[k] - m[k]) / r;
                    x[k] = ratio * x[k] - c_m0 * m[k] - c_d1 * d1;
                }
            } else {
                for k in 0..x.len() {
                    x[k] = ratio * x[k] - c_m0 * m[k];
                }
            }
        }
        self.lower_order_nums = (self.lower_order_nums + 1).min(self.cfg.solver_order);
        self.step_index += 1;
        Ok(())
    }

    fn snapshot(&self) -> SamplerState {
        let mut tensors = Vec::new();
        for (name, t) in [
            ("out0", &self.outputs[0]),
            ("out1", &self.outputs[1]),
            ("last_sample", &self.last_sample),
        ] {
            if let Some(t) = t {
                tensors.push((name.to_string(), t.clone()));
            }
        }
        SamplerState {
            step_index: self.step_index,
            counters: vec![self.this_order, self.lower_order_nums],
            tensors,
        }
    }

    fn restore(&mut self, state: &SamplerState, len: usize) -> Result<()> {
        let n = self.timesteps.len();
        if state.step_index > n {
            return Err(restore_error(format!(
                "step {} of a {n}-step sampler",
                state.step_index
            )));
        }
        let [this_order, lower_order_nums] = state.counters[..] else {
            return Err(restore_error(format!(
                "UniPC needs 2 counters, the checkpoint has {}",
                state.counters.len()
            )));
        };
        let order = self.cfg.solver_order;
        if this_order > order || lower_order_nums > order {
            return Err(restore_error(format!(
                "orders {this_order}/{lower_order_nums} exceed the solver order {order}"
            )));
        }
        let get = |name: &str| -> Result<Option<Vec<f32>>> {
            match state.tensors.iter().find(|(n, _)| n == name) {
                None => Ok(None),
                Some((_, t)) if t.len() == len => Ok(Some(t.clone())),
                Some((_, t)) => Err(restore_error(format!(
                    "{name} has {} values; the latents have {len}",
                    t.len()
                ))),
            }
        };
        let (out0, out1, last) = (get("out0")?, get("out1")?, get("last_sample")?);
        let i = state.step_index;
        if i > 0 && (out1.is_none() || last.is_none()) {
            return Err(restore_error(format!(
                "step {i} needs out1 and last_sample"
            )));
        }
        if i > 0 && this_order >= 2 && out0.is_none() {
            return Err(restore_error(format!(
                "step {i} at order {this_order} needs out0"
            )));
        }
        self.step_index = i;
        self.this_order = this_order;
        self.lower_order_nums = lower_order_nums;
        self.outputs = [out0, out1];
        self.last_sample = last;
        Ok(())
    }
}

/// `FlowMatchEulerDiscreteScheduler`: `x ← x + (σ_{i+1} − σ_i)·v`.
pub struct FlowMatchEuler {
    sigmas: Vec<f32>,
    timesteps: Vec<f32>,
    step_index: usize,
}

impl FlowMatchEuler {
    pub fn new(shift: f64, num_train_timesteps: usize, steps: usize) -> Result<Self> {
        let ntrain = num_train_timesteps as f32;
        // Training sigmas are built in f32 and shifted once; their ends bound the schedule.
        let shift32 = |s: f32| shift as f32 * s / (1.0 + (shift as f32 - 1.0) * s);
        let sigma_max = shift32(1.0) as f64;
        let sigma_min = shift32(1.0 / ntrain) as f64;
        let (t0, t1) = (sigma_max * ntrain as f64, sigma_min * ntrain as f64);
        let n = steps;
        let mut sigmas: Vec<f32> = (0..n)
            .map(|i| {
                let t = if n == 1 {
                    t0
                } else if i == n - 1 {
                    t1
                } else {
                    t0 + i as f64 * (t1 - t0) / (n - 1) as f64
                };
                shift_sigma(shift, t / ntrain as f64) as f32
            })
            .collect();
        let timesteps = sigmas.iter().map(|s| s * ntrain).collect();
        sigmas.push(0.0);
        Ok(FlowMatchEuler {
            sigmas,
            timesteps,
            step_index: 0,
        })
    }
}

impl Sampler for FlowMatchEuler {
    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    fn step_index(&self) -> usize {
        self.step_index
    }

    fn step(&mut self, velocity: &[f32], x: &mut [f32]) -> Result<()> {
        check_len(velocity, x)?;
        let i = self.step_index;
        if i >= self.timesteps.len() {
            return Err(done_error(self.timesteps.len()));
        }
        let dt = self.sigmas[i + 1] - self.sigmas[i];
        x.iter_mut().zip(velocity).for_each(|(x, v)| *x += dt * *v);
        self.step_index += 1;
        Ok(())
    }

    fn snapshot(&self) -> SamplerState {
        SamplerState {
            step_index: self.step_index,
            counters: Vec::new(),
            tensors: Vec::new(),
        }
    }

    fn restore(&mut self, state: &SamplerState, _len: usize) -> Result<()> {
        let n = self.timesteps.len();
        if state.step_index > n {
            return Err(restore_error(format!(
                "step {} of a {n}-step sampler",
                state.step_index
            )));
        }
        self.step_index = state.step_index;
        Ok(())
    }
}
