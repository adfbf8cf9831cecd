//! The single-clip text-to-video pipeline (diffusers `WanPipeline`, wan21.md §2): prompt
//! encoding, the sampler loop with classifier-free guidance, de-normalisation and VAE decoding,
//! from a diffusers model directory.

use std::path::{Path, PathBuf};

use crate::backend::text_ops::TextOps;
use crate::backend::video_ops::VideoOps;
use crate::backend::{Backend, Tensor};
use crate::comm::Comm;
use crate::config::ConfigReader;
use crate::error::{Error, Result};
use crate::group::DitGroup;
use crate::noise::{NoiseLayout, latent_noise};
use crate::sched::SchedulerConfig;
use crate::text::{PromptEmbeds, PromptEncoder};
use crate::umt5::Umt5Config;
use crate::vae::{VaeConfig, WanVaeDecoder};
use crate::wan::{DitInputs, TextContext, WanConfig, WanTransformer};
use crate::window::Stitching;

/// A backend that runs every part of the pipeline.
pub trait PipelineBackend: Backend + TextOps + VideoOps {}
impl<B: Backend + TextOps + VideoOps> PipelineBackend for B {}

/// A diffusers `WanPipeline` directory, checked before anything heavy is loaded: every
/// component present with a class this code implements, and the components agreeing on their
/// shared sizes.
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub root: PathBuf,
    pub transformer: WanConfig,
    pub vae: VaeConfig,
    pub text_encoder: Umt5Config,
    pub scheduler: SchedulerConfig,
    /// What `longtake.json` declares (all fields optional; the file too).
    pub defaults: RenderDefaults,
}

/// The request defaults a model directory declares in its optional `longtake.json` (a file
/// diffusers ignores): the size, frame rate, step count and guidance it was made for, its
/// native clip length in latent frames, and how its windows are best joined (stitching strategy
/// and overlap). Absent fields fall back to Wan2.1's published settings (832×480, 16 fps, 50
/// steps, guidance 5, 21 latent frames) and codenoise with an overlap of 4 latent frames.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RenderDefaults {
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub fps: Option<usize>,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    /// Native clip length in latent frames (the longest window).
    pub native_window: Option<usize>,
    /// Window overlap in latent frames (less than the native clip).
    pub overlap: Option<usize>,
    /// How windows are joined.
    pub stitching: Option<Stitching>,
    /// How the initial noise is laid out over the latent frames.
    pub noise_layout: Option<NoiseLayout>,
    /// The share of each step's noise level that autoregressive windows re-noise their held
    /// frames to (0..=1).
    pub hold_noise: Option<f64>,
    /// The noise level (0..=1) at and below which autoregressive windows release their held
    /// frames and blend the overlap from the previous window's result to their own.
    pub hold_release: Option<f64>,
}

/// Wan2.1's clip in latent frames (81 pixel frames): the native window of a model that does not
/// declare one.
pub const WAN21_NATIVE_WINDOW: usize = 21;

impl RenderDefaults {
    /// `root/longtake.json`, or all defaults unset when the file is absent.
    pub fn from_dir(root: &Path) -> Result<Self> {
        let path = root.join("longtake.json");
        if !path.is_file() {
            return Ok(RenderDefaults::default());
        }
        let c = ConfigReader::open(&path)?;
        let positive = |key: &str| -> Result<Option<usize>> {
            match c.opt_usize(key)? {
                Some(0) => Err(c.error(key, "must be a positive integer")),
                v => Ok(v),
            }
        };
        let number = |key: &str, ok: fn(f64) -> bool, allowed: &str| -> Result<Option<f64>> {
            match c.raw(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => match v.as_f64() {
                    Some(x) if x.is_finite() && ok(x) => Ok(Some(x)),
                    _ => Err(c.error(key, format!("{v} must be {allowed}"))),
                },
            }
        };
        let guidance = number("guidance", |g| g >= 0.0, "a number >= 0")?;
        let hold_noise = number(
            "hold_noise",
            |h| (0.0..=1.0).contains(&h),
            "a number from 0 to 1",
        )?;
        let hold_release = number(
            "hold_release",
            |h| (0.0..=1.0).contains(&h),
            "a number from 0 to 1",
        )?;
        let native_window = positive("native_window")?;
        let overlap = c.opt_usize("overlap")?;
        if let Some(o) = overlap {
            let window = native_window.unwrap_or(WAN21_NATIVE_WINDOW);
            if o >= window {
                return Err(c.error(
                    "overlap",
                    format!(
                        "is {o}; allowed: 0..={} (less than the native clip, {window} latent frames)",
                        window - 1
                    ),
                ));
            }
        }
        let stitching = c.opt_named("stitching", Stitching::parse, &Stitching::allowed())?;
        let noise_layout =
            c.opt_named("noise_layout", NoiseLayout::parse, &NoiseLayout::allowed())?;
        Ok(RenderDefaults {
            width: positive("width")?,
            height: positive("height")?,
            fps: positive("fps")?,
            steps: positive("steps")?,
            guidance,
            native_window,
            overlap,
            stitching,
            noise_layout,
            hold_noise,
            hold_release,
        })
    }
}

impl ModelDir {
    pub fn open(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            return Err(Error::io(
                root,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "not a directory (expected a diffusers Wan2.1 model directory)",
                ),
            ));
        }
        let index_path = root.join("model_index.json");
        let idx = ConfigReader::open(&index_path)?;
        idx.expect_class(&["WanPipeline"])?;
        let expected: [(&str, &[&str]); 5] = [
            ("transformer", &["WanTransformer3DModel"]),
            ("vae", &["AutoencoderKLWan"]),
            ("text_encoder", &["UMT5EncoderModel"]),
            (
                "tokenizer",
                &[
                    "T5TokenizerFast",
                    "T5Tokenizer",
                    "PreTrainedTokenizerFast",
                    "AutoTokenizer",
                ],
            ),
            (
                "scheduler",
                &["UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler"],
            ),
        ];
        for (name, classes) in expected {
            let class = match idx.raw(name) {
                Some(serde_json::Value::Array(a)) if a.len() == 2 => {
                    a[1].as_str().unwrap_or("").to_string()
                }
                Some(v) => {
                    return Err(idx.error(name, format!("must be [library, class], found {v}")));
                }
                None => {
                    return Err(idx.error(
                        name,
                        format!(
                            "missing; a Wan pipeline needs {name}/ ({})",
                            classes.join(" or ")
                        ),
                    ));
                }
            };
            // The tokenizer's own files decide how it loads (transformers 5 writes
            // `TokenizersBackend`, older versions a T5 class): any class that comes with a
            // `tokenizer.json` is accepted.
            if name == "tokenizer" {
                if !root.join("tokenizer/tokenizer.json").is_file() {
                    return Err(idx.error(
                        name,
                        format!(
                            "class {class:?} without tokenizer/tokenizer.json; longtake loads \
                             tokenizers from tokenizer.json (save the tokenizer with a fast \
                             tokenizer class)"
                        ),
                    ));
                }
            } else if !classes.contains(&class.as_str()) {
                return Err(idx.error(
                    name,
                    format!(
                        "class {class:?} is not supported; allowed: {}",
                        classes.join(", ")
                    ),
                ));
            }
            if !root.join(name).is_dir() {
                return Err(Error::io(
                    root.join(name),
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("missing sub-folder {name}/ named in model_index.json"),
                    ),
                ));
            }
        }
        if let Some(v) = idx
            .raw("transformer_2")
            .filter(|v| v.as_array().is_none_or(|a| a.iter().any(|x| !x.is_null())))
        {
            return Err(idx.error(
                "transformer_2",
                format!("{v}: two-expert (Wan2.2) pipelines are not supported"),
            ));
        }
        let transformer = WanConfig::from_file(&root.join("transformer/config.json"))?;
        let vae = VaeConfig::from_file(&root.join("vae/config.json"))?;
        let text_encoder = Umt5Config::from_file(&root.join("text_encoder/config.json"))?;
        let scheduler = SchedulerConfig::from_file(&root.join("scheduler/scheduler_config.json"))?;
        if text_encoder.d_model != transformer.text_dim {
            return Err(Error::Config {
                path: root.join("transformer/config.json"),
                key: "text_dim".into(),
                reason: format!(
                    "is {}, but the text encoder's d_model is {} (text_encoder/config.json): the components do not belong together",
                    transformer.text_dim, text_encoder.d_model
                ),
            });
        }
        if transformer.in_channels != vae.z_dim || transformer.out_channels != vae.z_dim {
            return Err(Error::Config {
                path: root.join("transformer/config.json"),
                key: "in_channels".into(),
                reason: format!(
                    "in/out channels {}/{} must equal the VAE's z_dim {} (vae/config.json)",
                    transformer.in_channels, transformer.out_channels, vae.z_dim
                ),
            });
        }
        let defaults = RenderDefaults::from_dir(root)?;
        let m = transformer.patch_size[1].max(transformer.patch_size[2]) * vae.spatial_factor();
        for (key, v) in [("width", defaults.width), ("height", defaults.height)] {
            if let Some(v) = v.filter(|v| v % m != 0) {
                return Err(Error::Config {
                    path: root.join("longtake.json"),
                    key: key.into(),
                    reason: format!("is {v}; must be a multiple of {m} for this model"),
                });
            }
        }
        Ok(ModelDir {
            root: root.to_path_buf(),
            transformer,
            vae,
            text_encoder,
            scheduler,
            defaults,
        })
    }

    /// Pixel height/width must be multiples of this.
    pub fn size_multiple(&self) -> usize {
        self.vae.spatial_factor()
            * self.transformer.patch_size[1].max(self.transformer.patch_size[2])
    }
}

/// One clip to generate.
#[derive(Debug, Clone)]
pub struct ClipRequest {
    pub prompt: String,
    /// `None` is the reference's default, the empty prompt.
    pub negative_prompt: Option<String>,
    pub num_frames: usize,
    pub height: usize,
    pub width: usize,
    pub steps: usize,
    pub guidance: f32,
    pub flow_shift: Option<f64>,
    pub seed: u64,
    /// Initial latents `[1, z_dim, T, h, w]` replacing the seeded noise (for exact comparison
    /// with a reference run).
    pub noise: Option<(Vec<usize>, Vec<f32>)>,
}

/// A generated clip.
pub struct Clip {
    /// Final latents before de-normalisation, `[1, z_dim, T, h, w]`.
    pub latents: Vec<f32>,
    pub latents_shape: Vec<usize>,
    /// The VAE output in [−1, 1], `[1, 3, F, H, W]`.
    pub video: Vec<f32>,
    pub video_shape: Vec<usize>,
    /// Things the user should know (snapped frame count, truncated prompt).
    pub notices: Vec<String>,
}

/// The transformer of a pipeline: on this thread's device, or a tensor-parallel group driven
/// from it (rank 0 here, the other ranks on helper threads; see [`DitGroup`]).
pub enum Transformer<B: PipelineBackend> {
    Local(WanTransformer<B>),
    Group(DitGroup<B>),
}

impl<B: PipelineBackend> Transformer<B> {
    /// The (rank 0) transformer: its config describes the whole model.
    pub fn model(&self) -> &WanTransformer<B> {
        match self {
            Transformer::Local(t) => t,
            Transformer::Group(g) => g.rank0(),
        }
    }

    /// One forward of host latents `shape` on `backend`. A group uses its own communicators
    /// and ignores `comm`.
    fn forward(
        &self,
        comm: &dyn Comm<B>,
        backend: &B,
        shape: &[usize],
        latents: Vec<f32>,
        timesteps: &[f32],
        context: &TextContext<B>,
    ) -> Result<Tensor<B>> {
        match self {
            Transformer::Local(t) => {
                let x = backend.upload_f32(shape, latents)?;
                t.forward(
                    comm,
                    &DitInputs {
                        latents: &x,
                        timesteps,
                        context,
                    },
                )
            }
            Transformer::Group(g) => g.forward(shape, latents, timesteps, context),
        }
    }
}

/// The loaded pipeline.
pub struct WanPipeline<B: PipelineBackend> {
    pub dir: ModelDir,
    backend: B,
    text: PromptEncoder<B>,
    transformer: Transformer<B>,
    vae: WanVaeDecoder<B>,
}

/// The latent shape `[z, T, h, w]` for a request, after validation; notices collect the
/// reference's silent adjustments.
pub fn latent_shape(
    dir: &ModelDir,
    req: &ClipRequest,
    notices: &mut Vec<String>,
) -> Result<[usize; 4]> {
    if req.prompt.trim().is_empty() {
        return Err(Error::input("prompt", "must not be empty"));
    }
    if let Some(s) = req.flow_shift.filter(|s| !(s.is_finite() && *s > 0.0)) {
        return Err(Error::input(
            "flow_shift",
            format!("{s} must be a positive number"),
        ));
    }
    let m = dir.size_multiple();
    for (name, v) in [("height", req.height), ("width", req.width)] {
        if v == 0 || v % m != 0 {
            return Err(Error::input(
                name,
                format!("{v} must be a positive multiple of {m}"),
            ));
        }
    }
    if req.num_frames == 0 {
        return Err(Error::input(
            "num_frames",
            "must be at least 1 (allowed: 1, 5, 9, …, 4k + 1)",
        ));
    }
    let frames = (req.num_frames - 1) / 4 * 4 + 1;
    if frames != req.num_frames {
        notices.push(format!(
            "num_frames {} is not of the form 4k + 1; using {frames} (as the reference does)",
            req.num_frames
        ));
    }
    if req.steps == 0 {
        return Err(Error::input("steps", "must be at least 1"));
    }
    if !req.guidance.is_finite() || req.guidance < 0.0 {
        return Err(Error::input(
            "guidance",
            format!(
                "{} must be a number ≥ 0 (1 or less disables guidance)",
                req.guidance
            ),
        ));
    }
    let f = dir.vae.spatial_factor();
    Ok([
        dir.vae.z_dim,
        (frames - 1) / 4 + 1,
        req.height / f,
        req.width / f,
    ])
}

impl<B: PipelineBackend> WanPipeline<B> {
    pub fn load(root: &Path, backend: &B) -> Result<Self> {
        let dir = ModelDir::open(root)?;
        Ok(WanPipeline {
            text: PromptEncoder::load(root, backend)?,
            transformer: Transformer::Local(WanTransformer::load(
                &root.join("transformer"),
                backend,
                0,
                1,
            )?),
            vae: WanVaeDecoder::load(&root.join("vae"), backend)?,
            backend: backend.clone(),
            dir,
        })
    }

    /// The pipeline with its transformer sharded over `ranks` (a backend and a communicator
    /// each, rank order); the text encoder and the VAE run on rank 0's backend. One rank is
    /// [`Self::load`].
    pub fn load_group(root: &Path, ranks: Vec<(B, Box<dyn Comm<B>>)>) -> Result<Self> {
        if ranks.len() <= 1 {
            let backend = ranks
                .into_iter()
                .next()
                .map(|(b, _)| b)
                .ok_or_else(|| Error::Parallel("a group of no ranks".into()))?;
            return Self::load(root, &backend);
        }
        let dir = ModelDir::open(root)?;
        WanTransformer::<B>::check_parallelism(&dir.transformer, ranks.len())?;
        let backend = ranks[0].0.clone();
        Ok(WanPipeline {
            text: PromptEncoder::load(root, &backend)?,
            vae: WanVaeDecoder::load(&root.join("vae"), &backend)?,
            transformer: Transformer::Group(DitGroup::load(&root.join("transformer"), ranks)?),
            backend,
            dir,
        })
    }

    pub fn transformer(&self) -> &WanTransformer<B> {
        self.transformer.model()
    }

    pub fn vae(&self) -> &WanVaeDecoder<B> {
        &self.vae
    }

    /// Encode a prompt, noting truncation.
    pub fn encode(
        &self,
        prompt: &str,
        what: &str,
        notices: &mut Vec<String>,
    ) -> Result<PromptEmbeds> {
        self.encode_until(prompt, what, notices, &|| false)
    }

    /// [`Self::encode`], cancellable between encoder layers by `stop`.
    pub fn encode_until(
        &self,
        prompt: &str,
        what: &str,
        notices: &mut Vec<String>,
        stop: &dyn Fn() -> bool,
    ) -> Result<PromptEmbeds> {
        let e = self.text.encode_prompt_until(prompt, stop)?;
        if e.truncated {
            notices.push(format!(
                "{what} has {} tokens; only the first {} are used (the model's limit)",
                e.full_len,
                self.text.max_len()
            ));
        }
        Ok(e)
    }

    /// The scheduler of a request (the model's, with `flow_shift` applied).
    pub fn scheduler(&self, req: &ClipRequest) -> Result<SchedulerConfig> {
        match req.flow_shift {
            Some(shift) => self.dir.scheduler.clone().with_shift(shift),
            None => Ok(self.dir.scheduler.clone()),
        }
    }

    /// Encode a request's prompts into the guided model.
    pub fn guided(&self, req: &ClipRequest, notices: &mut Vec<String>) -> Result<Guided<'_, B>> {
        self.guided_until(req, notices, &|| false)
    }

    /// [`Self::guided`], cancellable between text-encoder layers by `stop`
    /// ([`Error::Cancelled`]).
    pub fn guided_until(
        &self,
        req: &ClipRequest,
        notices: &mut Vec<String>,
        stop: &dyn Fn() -> bool,
    ) -> Result<Guided<'_, B>> {
        let cond = self.encode_until(&req.prompt, "the prompt", notices, stop)?;
        let neg = if req.guidance > 1.0 {
            Some(self.encode_until(
                req.negative_prompt.as_deref().unwrap_or(""),
                "the negative prompt",
                notices,
                stop,
            )?)
        } else {
            None
        };
        Guided::new(
            &self.transformer,
            &self.backend,
            &cond,
            neg.as_ref(),
            req.guidance,
        )
    }

    /// De-normalise final latents `[z, T, h, w]` as the pipeline writes it (divide by the
    /// reciprocal of std, add the mean) for the VAE.
    pub fn denormalize(&self, latents: &[f32], frames_hw: usize) -> Vec<f32> {
        let mut z = latents.to_vec();
        for (c, chunk) in z.chunks_mut(frames_hw).enumerate() {
            let inv = 1.0f32 / self.dir.vae.latents_std[c];
            let mean = self.dir.vae.latents_mean[c];
            chunk.iter_mut().for_each(|v| *v = *v / inv + mean);
        }
        z
    }

    /// Generate one clip; `progress(step, steps)` is called after every sampler step.
    pub fn generate(
        &self,
        comm: &dyn Comm<B>,
        req: &ClipRequest,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Clip> {
        let mut notices = Vec::new();
        let [z, t, h, w] = latent_shape(&self.dir, req, &mut notices)?;
        let mut x = match &req.noise {
            Some((shape, data)) => {
                if shape != &[1, z, t, h, w] {
                    return Err(Error::input(
                        "noise",
                        format!("shape {shape:?}; this request needs [1, {z}, {t}, {h}, {w}]"),
                    ));
                }
                if data.iter().any(|v| !v.is_finite()) {
                    return Err(Error::input("noise", "all values must be finite"));
                }
                data.clone()
            }
            None => latent_noise(req.seed, z, 0..t, h, w),
        };
        let guided = self.guided(req, &mut notices)?;
        let mut sampler = self.scheduler(req)?.build(req.steps)?;
        let timesteps = sampler.timesteps().to_vec();
        for (i, &ts) in timesteps.iter().enumerate() {
            let v = guided.velocity(comm, &x, [z, t, h, w], ts)?;
            sampler.step(&v, &mut x)?;
            progress(i + 1, timesteps.len());
        }
        let zden = self.denormalize(&x, t * h * w);
        let (video_shape, video) = self.vae.decode_all(&zden, [1, z, t, h, w], 1)?;
        Ok(Clip {
            latents: x,
            latents_shape: vec![1, z, t, h, w],
            video,
            video_shape,
            notices,
        })
    }
}

/// The transformer with a prompt's conditioning and classifier-free guidance: latents in, the
/// guided flow velocity out. The conditional and unconditional passes run as one batch of two.
pub struct Guided<'a, B: PipelineBackend> {
    transformer: &'a Transformer<B>,
    backend: B,
    context: TextContext<B>,
    guidance: f32,
    cfg: bool,
}

impl<'a, B: PipelineBackend> Guided<'a, B> {
    /// `neg` present means guidance is on (the reference's `guidance_scale > 1`).
    pub fn new(
        transformer: &'a Transformer<B>,
        backend: &B,
        cond: &PromptEmbeds,
        neg: Option<&PromptEmbeds>,
        guidance: f32,
    ) -> Result<Self> {
        let mut text = cond.data.clone();
        if let Some(n) = neg {
            if n.shape != cond.shape {
                return Err(Error::input(
                    "negative_prompt",
                    "embeddings differ in shape from the prompt's",
                ));
            }
            text.extend_from_slice(&n.data);
        }
        let batch = if neg.is_some() { 2 } else { 1 };
        let [_, s, d] = cond.shape;
        if let Transformer::Group(g) = transformer {
            g.set_context(batch, s, d, &text)?;
        }
        Ok(Guided {
            transformer,
            backend: backend.clone(),
            context: TextContext::from_host(backend, batch, s, d, &text)?,
            guidance,
            cfg: neg.is_some(),
        })
    }

    /// The guided velocity for latents `x` of shape `[z, T, h, w]` at timestep `t`.
    pub fn velocity(
        &self,
        comm: &dyn Comm<B>,
        x: &[f32],
        shape: [usize; 4],
        t: f32,
    ) -> Result<Vec<f32>> {
        let batch = if self.cfg { 2 } else { 1 };
        let mut input = x.to_vec();
        if self.cfg {
            input.extend_from_slice(x);
        }
        let [z, f, h, w] = shape;
        let out = self.transformer.forward(
            comm,
            &self.backend,
            &[batch, z, f, h, w],
            input,
            &vec![t; batch],
            &self.context,
        )?;
        let out = self.backend.download(&out)?;
        Ok(if self.cfg {
            let (c, u) = out.split_at(x.len());
            u.iter()
                .zip(c)
                .map(|(u, c)| u + self.guidance * (c - u))
                .collect()
        } else {
            out
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults(json: &str) -> Result<RenderDefaults> {
        let dir = tempfile::tempdir().expect("temporary directory");
        std::fs::write(dir.path().join("longtake.json"), json).expect("write longtake.json");
        RenderDefaults::from_dir(dir.path())
    }

    #[test]
    fn longtake_json_declares_stitching_and_overlap() {
        let d = defaults(
            r#"{"steps": 20, "guidance": 2.0, "stitching": "autoregressive", "overlap": 8,
                "noise_layout": "rescheduled", "hold_noise": 0.5, "hold_release": 0.4}"#,
        )
        .unwrap();
        assert_eq!(d.hold_noise, Some(0.5));
        assert_eq!(d.hold_release, Some(0.4));
        assert_eq!(d.noise_layout, Some(NoiseLayout::Rescheduled));
        assert_eq!(d.steps, Some(20));
        assert_eq!(d.guidance, Some(2.0));
        assert_eq!(d.stitching, Some(Stitching::Autoregressive));
        assert_eq!(d.overlap, Some(8));
        let d = defaults("{}").unwrap();
        assert_eq!(d, RenderDefaults::default());
        let none = tempfile::tempdir().unwrap();
        assert_eq!(
            RenderDefaults::from_dir(none.path()).unwrap(),
            RenderDefaults::default()
        );
    }

    #[test]
    fn longtake_json_refuses_bad_values_by_name() {
        for (json, key, allowed) in [
            (
                r#"{"stitching": "zigzag"}"#,
                "stitching",
                "independent, autoregressive",
            ),
            (r#"{"stitching": 3}"#, "stitching", "allowed: codenoise"),
            (
                r#"{"noise_layout": "fresh"}"#,
                "noise_layout",
                "allowed: independent, rescheduled",
            ),
            (r#"{"overlap": 21}"#, "overlap", "0..=20"),
            (r#"{"native_window": 9, "overlap": 9}"#, "overlap", "0..=8"),
            (r#"{"overlap": -1}"#, "overlap", "non-negative"),
            (r#"{"guidance": "high"}"#, "guidance", ">= 0"),
            (r#"{"hold_noise": 1.5}"#, "hold_noise", "from 0 to 1"),
            (r#"{"hold_noise": "low"}"#, "hold_noise", "from 0 to 1"),
            (r#"{"hold_release": -0.2}"#, "hold_release", "from 0 to 1"),
            (r#"{"steps": 0}"#, "steps", "positive"),
        ] {
            let e = defaults(json).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(allowed), "{json}: {e}");
        }
    }
}
