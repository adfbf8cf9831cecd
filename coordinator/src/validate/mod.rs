//! SubmitRender validation: a `RenderSpec` from the wire becomes a [`ValidSpec`] with every default
//! applied, or an [`InvalidField`] naming the field and the allowed range (sent as
//! `INVALID_ARGUMENT`). Pure: the random seed for a spec without one is passed in.

use std::fmt;

use longtake_proto::v1::{NoiseLayout, RenderSpec, Stitching, render_spec::Length};
use serde::{Deserialize, Serialize};

use crate::geometry::{DEFAULT_MODEL, LatentGeometry, ModelInfo, SMOKE_MODEL};

pub const MAX_FPS: u32 = 120;
pub const MAX_SIDE: u32 = 4096;
pub const MAX_STEPS: u32 = 1000;
pub const MAX_PROMPT_BYTES: usize = 16 * 1024;
pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 128;

/// The limits a coordinator enforces beyond the fixed ones above.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Longest `duration_s` accepted, in seconds.
    pub max_duration_s: f64,
    /// Most pixel frames accepted, whether given as `num_frames` or derived from a duration.
    pub max_frames: u32,
    /// Longest window in latent frames the coordinator accepts, on top of the model's own
    /// native clip length.
    pub max_window: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_duration_s: 600.0,
            max_frames: frames_for_duration(600.0, 16, 4),
            max_window: 1024,
        }
    }
}

/// How windows are combined (the proto enum, with `UNSPECIFIED` resolved to the default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StitchingMode {
    Codenoise,
    Independent,
    Autoregressive,
}

impl StitchingMode {
    /// The mode a request names; `None` for `Unspecified` (the model's default applies).
    pub fn from_proto(s: Stitching) -> Option<StitchingMode> {
        match s {
            Stitching::Unspecified => None,
            Stitching::Codenoise => Some(StitchingMode::Codenoise),
            Stitching::Independent => Some(StitchingMode::Independent),
            Stitching::Autoregressive => Some(StitchingMode::Autoregressive),
        }
    }

    pub fn to_proto(self) -> Stitching {
        match self {
            StitchingMode::Codenoise => Stitching::Codenoise,
            StitchingMode::Independent => Stitching::Independent,
            StitchingMode::Autoregressive => Stitching::Autoregressive,
        }
    }
}

/// How the initial noise is laid out over the latent frames (the proto enum, with `UNSPECIFIED`
/// resolved to the default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoiseMode {
    /// Every latent frame draws its own noise.
    #[default]
    Independent,
    /// After the first window, runs of (window − overlap) frames reuse the first window's noise
    /// frames, shuffled (FreeNoise's noise rescheduling).
    Rescheduled,
}

impl NoiseMode {
    /// The layout a request names; `None` for `Unspecified` (the model's default applies).
    pub fn from_proto(n: NoiseLayout) -> Option<NoiseMode> {
        match n {
            NoiseLayout::Unspecified => None,
            NoiseLayout::Independent => Some(NoiseMode::Independent),
            NoiseLayout::Rescheduled => Some(NoiseMode::Rescheduled),
        }
    }

    pub fn to_proto(self) -> NoiseLayout {
        match self {
            NoiseMode::Independent => NoiseLayout::Independent,
            NoiseMode::Rescheduled => NoiseLayout::Rescheduled,
        }
    }

    pub fn is_independent(&self) -> bool {
        *self == NoiseMode::Independent
    }
}

/// A validated render request with every default applied: what the render actually uses.
/// Stored in job records (versioned JSON) and echoed in `Render.spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidSpec {
    pub prompt: String,
    pub negative_prompt: String,
    /// The requested duration, when the length was given in seconds.
    pub duration_s: Option<f64>,
    /// Pixel frames, of the form t·k + 1 (t: the model's temporal factor).
    pub num_frames: u32,
    pub fps: u32,
    pub width: u32,
    pub height: u32,
    pub seed: u64,
    pub steps: u32,
    pub guidance: f32,
    /// `None`: the model's scheduler config decides.
    pub flow_shift: Option<f32>,
    /// A model directory (as the workers see it), or a built-in model's name
    /// ([`DEFAULT_MODEL`] when the request names none, [`SMOKE_MODEL`]).
    pub model: String,
    pub stitching: StitchingMode,
    pub window: u32,
    pub overlap: u32,
    /// Records written before the layout was stored used independent noise, which is therefore
    /// left out of the record.
    #[serde(default, skip_serializing_if = "NoiseMode::is_independent")]
    pub noise_layout: NoiseMode,
    /// Autoregressive windows re-noise their held frames to this share of each step's noise
    /// level. Records written before it was stored held them at the full level (1), which is
    /// therefore left out of the record.
    #[serde(
        default = "full_hold_noise",
        skip_serializing_if = "is_full_hold_noise"
    )]
    pub hold_noise: f32,
    /// Autoregressive windows release their held frames from the first step at or below this
    /// noise level and blend the overlap. Records written before it was stored held them to the
    /// end (0), which is therefore left out of the record.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub hold_release: f32,
    /// A local directory path or `s3://bucket[/prefix]`.
    pub output: String,
    pub png_frames: bool,
    pub priority: i32,
    pub has_initial_noise: bool,
    /// The model's latent geometry, from its configuration (records written before it was
    /// stored are Wan2.1's, which is therefore left out of the record).
    #[serde(default, skip_serializing_if = "LatentGeometry::is_wan21")]
    pub latent: LatentGeometry,
}

/// The hold noise of records and catalogue entries written before it was stored: the full level.
pub(crate) fn full_hold_noise() -> f32 {
    1.0
}

fn is_full_hold_noise(v: &f32) -> bool {
    *v == 1.0
}

fn is_zero(v: &f32) -> bool {
    *v == 0.0
}

impl ValidSpec {
    /// The random-weight smoke-test model (noise, not a picture).
    pub fn is_smoke(&self) -> bool {
        self.model == SMOKE_MODEL
    }

    /// One of the models compiled into the binary (no directory path).
    pub fn is_builtin(&self) -> bool {
        self.model.is_empty() || self.model.starts_with("builtin:")
    }

    /// Seconds of video: the requested duration, else frames / fps.
    pub fn duration(&self) -> f64 {
        self.duration_s
            .unwrap_or(self.num_frames as f64 / self.fps.max(1) as f64)
    }

    pub fn latent_frames(&self) -> u32 {
        self.latent.latent_frames(self.num_frames)
    }

    /// [channels, frames, height, width] of the whole latent sequence.
    pub fn latent_shape(&self) -> [u32; 4] {
        [
            self.latent.channels,
            self.latent_frames(),
            self.height / self.latent.spatial_factor,
            self.width / self.latent.spatial_factor,
        ]
    }

    /// The spec as the wire shows it, every default filled in; `initial_noise` only when given.
    pub fn to_proto(&self, initial_noise: Option<Vec<u8>>) -> RenderSpec {
        RenderSpec {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            length: Some(match self.duration_s {
                Some(d) => Length::DurationS(d),
                None => Length::NumFrames(self.num_frames),
            }),
            fps: Some(self.fps),
            width: Some(self.width),
            height: Some(self.height),
            seed: Some(self.seed),
            steps: Some(self.steps),
            guidance: Some(self.guidance),
            flow_shift: self.flow_shift,
            model: self.model.clone(),
            stitching: self.stitching.to_proto() as i32,
            window: Some(self.window),
            overlap: Some(self.overlap),
            output: self.output.clone(),
            png_frames: self.png_frames,
            initial_noise,
            priority: self.priority,
            noise_layout: self.noise_layout.to_proto() as i32,
            // Only autoregressive windows hold frames (and only they accept the field).
            hold_noise: (self.stitching == StitchingMode::Autoregressive)
                .then_some(self.hold_noise),
            hold_release: (self.stitching == StitchingMode::Autoregressive)
                .then_some(self.hold_release),
        }
    }
}

/// A rejected field: sent as `INVALID_ARGUMENT` with the message `"<field>: <reason>"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidField {
    pub field: &'static str,
    pub reason: String,
}

impl fmt::Display for InvalidField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl std::error::Error for InvalidField {}

impl From<InvalidField> for tonic::Status {
    fn from(e: InvalidField) -> Self {
        crate::errors::Error::from(e).into()
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> InvalidField {
    InvalidField {
        field,
        reason: reason.into(),
    }
}

/// Pixel frames for a duration: F = t·⌈duration·fps / t⌉ + 1 for a model with temporal factor t,
/// the smallest length of the form t·k + 1 that is longer than `duration_s × fps` frames (Wan,
/// t = 4: 60 s at 16 fps is 961). A product within 1e-9 of a multiple of t counts as that
/// multiple, so float noise (0.1 × 40 = 4.000000000000001) does not add t frames.
pub fn frames_for_duration(duration_s: f64, fps: u32, temporal: u32) -> u32 {
    let t = f64::from(temporal.max(1));
    let k = (duration_s * fps as f64 / t - 1e-9).ceil().max(0.0);
    (t * k + 1.0).min(u32::MAX as f64) as u32
}

/// Validate `spec` for `info` (the model's geometry and defaults, from the model catalog) and apply the
/// defaults. `default_output` replaces an empty `output`; `random_seed` is used when the spec has
/// no seed.
pub fn validate(
    spec: &RenderSpec,
    limits: &Limits,
    info: &ModelInfo,
    default_output: &str,
    random_seed: u64,
) -> Result<ValidSpec, InvalidField> {
    if spec.prompt.trim().is_empty() {
        return Err(invalid("prompt", "must not be empty or blank"));
    }
    if spec.prompt.len() > MAX_PROMPT_BYTES {
        return Err(invalid(
            "prompt",
            format!("is {} bytes; at most {MAX_PROMPT_BYTES}", spec.prompt.len()),
        ));
    }
    if spec.negative_prompt.len() > MAX_PROMPT_BYTES {
        return Err(invalid(
            "negative_prompt",
            format!(
                "is {} bytes; at most {MAX_PROMPT_BYTES}",
                spec.negative_prompt.len()
            ),
        ));
    }
    let model = match spec.model.trim() {
        "" => DEFAULT_MODEL.to_string(),
        _ => spec.model.clone(),
    };
    if model.contains('\0') {
        return Err(invalid(
            "model",
            format!("must be a directory path, {DEFAULT_MODEL} or {SMOKE_MODEL}"),
        ));
    }
    let d = info.defaults;
    let (d_width, d_height, d_fps, d_steps, d_guidance, d_window, d_overlap) = (
        d.width, d.height, d.fps, d.steps, d.guidance, d.window, d.overlap,
    );
    let geometry = info.latent;
    let t = geometry.temporal_factor.max(1);
    let max_window = limits.max_window.min(info.native_window).max(1);

    let fps = spec.fps.unwrap_or(d_fps);
    if fps == 0 || fps > MAX_FPS {
        return Err(invalid("fps", format!("is {fps}; allowed: 1..={MAX_FPS}")));
    }

    let (duration_s, num_frames) = match spec.length {
        None => {
            return Err(invalid(
                "duration_s",
                "the length is missing: set exactly one of duration_s (seconds) or num_frames",
            ));
        }
        Some(Length::DurationS(d)) => {
            if !d.is_finite() || d <= 0.0 || d > limits.max_duration_s {
                return Err(invalid(
                    "duration_s",
                    format!(
                        "is {d}; allowed: more than 0 and at most {} seconds",
                        limits.max_duration_s
                    ),
                ));
            }
            let frames = frames_for_duration(d, fps, t);
            if frames > limits.max_frames {
                return Err(invalid(
                    "duration_s",
                    format!(
                        "{d} s at {fps} fps is {frames} frames; at most {} frames",
                        limits.max_frames
                    ),
                ));
            }
            (Some(d), frames)
        }
        Some(Length::NumFrames(f)) => {
            if f == 0 || f > limits.max_frames {
                return Err(invalid(
                    "num_frames",
                    format!(
                        "is {f}; allowed: 1..={} of the form {t}k + 1",
                        limits.max_frames
                    ),
                ));
            }
            if (f - 1) % t != 0 {
                let below = f - (f - 1) % t;
                return Err(invalid(
                    "num_frames",
                    format!(
                        "is {f}; must be of the form {t}k + 1 (for example {below} or {})",
                        below + t
                    ),
                ));
            }
            (None, f)
        }
    };

    let width = spec.width.unwrap_or(d_width);
    let height = spec.height.unwrap_or(d_height);
    for (field, v) in [("width", width), ("height", height)] {
        let m = geometry.size_multiple.max(1);
        if v == 0 || v % m != 0 || v > MAX_SIDE {
            return Err(invalid(
                field,
                format!("is {v}; allowed: a positive multiple of {m}, at most {MAX_SIDE}"),
            ));
        }
    }

    let steps = spec.steps.unwrap_or(d_steps);
    if steps == 0 || steps > MAX_STEPS {
        return Err(invalid(
            "steps",
            format!("is {steps}; allowed: 1..={MAX_STEPS}"),
        ));
    }
    let guidance = spec.guidance.unwrap_or(d_guidance);
    if !guidance.is_finite() || guidance < 0.0 {
        return Err(invalid(
            "guidance",
            format!("is {guidance}; allowed: a finite number >= 0"),
        ));
    }
    if let Some(shift) = spec.flow_shift
        && (!shift.is_finite() || shift <= 0.0)
    {
        return Err(invalid(
            "flow_shift",
            format!("is {shift}; allowed: a finite number > 0"),
        ));
    }

    let stitching = proto_enum(
        "stitching",
        spec.stitching,
        "CODENOISE (1), INDEPENDENT (2), AUTOREGRESSIVE (3)",
        |s: Stitching| StitchingMode::from_proto(s),
    )?
    .unwrap_or(d.stitching);

    let window = spec.window.unwrap_or(d_window.min(max_window));
    if window == 0 || window > max_window {
        return Err(invalid(
            "window",
            format!(
                "is {window}; allowed: 1..={max_window} latent frames (the model's native clip)",
            ),
        ));
    }
    let overlap = spec
        .overlap
        .unwrap_or(d_overlap.min(window.saturating_sub(1)));
    if overlap >= window {
        return Err(invalid(
            "overlap",
            format!(
                "is {overlap}; allowed: 0..={} (less than the window, {window})",
                window - 1
            ),
        ));
    }

    let noise_layout = proto_enum(
        "noise_layout",
        spec.noise_layout,
        "INDEPENDENT (1), RESCHEDULED (2)",
        |n: NoiseLayout| NoiseMode::from_proto(n),
    )?
    .unwrap_or(d.noise_layout);

    let hold_noise = hold_field("hold_noise", spec.hold_noise, stitching, d.hold_noise, 1.0)?;
    let hold_release = hold_field(
        "hold_release",
        spec.hold_release,
        stitching,
        d.hold_release,
        0.0,
    )?;

    let output = if spec.output.trim().is_empty() {
        default_output.to_string()
    } else {
        spec.output.clone()
    };
    check_output(&output)?;

    let latent_frames = geometry.latent_frames(num_frames);
    if let Some(noise) = &spec.initial_noise {
        check_noise(
            noise,
            [
                1,
                geometry.channels,
                latent_frames,
                height / geometry.spatial_factor,
                width / geometry.spatial_factor,
            ],
        )?;
    }

    Ok(ValidSpec {
        prompt: spec.prompt.clone(),
        negative_prompt: spec.negative_prompt.clone(),
        duration_s,
        num_frames,
        fps,
        width,
        height,
        seed: spec.seed.unwrap_or(random_seed),
        steps,
        guidance,
        flow_shift: spec.flow_shift,
        model,
        stitching,
        window,
        overlap,
        noise_layout,
        hold_noise,
        hold_release,
        output,
        png_frames: spec.png_frames,
        priority: spec.priority,
        has_initial_noise: spec.initial_noise.is_some(),
        latent: geometry,
    })
}

/// A field of autoregressive holding, from 0 to 1: the model's default when unset (`unused` for
/// the other strategies, which hold nothing), refused when set with another stitching.
fn hold_field(
    field: &'static str,
    value: Option<f32>,
    stitching: StitchingMode,
    model_default: f32,
    unused: f32,
) -> Result<f32, InvalidField> {
    match value {
        None if stitching == StitchingMode::Autoregressive => Ok(model_default),
        None => Ok(unused),
        Some(h) if !(0.0..=1.0).contains(&h) => Err(invalid(
            field,
            format!("is {h}; allowed: a number from 0 to 1"),
        )),
        Some(_) if stitching != StitchingMode::Autoregressive => Err(invalid(
            field,
            format!(
                "is set, but the stitching is {}; allowed only with AUTOREGRESSIVE windows \
                 (the only strategy that holds frames)",
                stitching
                    .to_proto()
                    .as_str_name()
                    .trim_start_matches("STITCHING_")
            ),
        )),
        Some(h) => Ok(h),
    }
}

/// A proto enum field's value resolved by `resolve` (`None`: unset, so the default applies); a
/// number the enum does not have is refused with the allowed values.
fn proto_enum<P: TryFrom<i32>, M>(
    field: &'static str,
    value: i32,
    allowed: &str,
    resolve: impl Fn(P) -> Option<M>,
) -> Result<Option<M>, InvalidField> {
    match P::try_from(value) {
        Ok(p) => Ok(resolve(p)),
        Err(_) => Err(invalid(
            field,
            format!("is {value}; allowed: {allowed} or unset"),
        )),
    }
}

/// A local directory path or `s3://bucket[/prefix]`.
fn check_output(output: &str) -> Result<(), InvalidField> {
    const ALLOWED: &str = "allowed: a local directory path or s3://bucket[/prefix]";
    if output.trim().is_empty() {
        return Err(invalid(
            "output",
            format!("is empty and the coordinator has no default output; {ALLOWED}"),
        ));
    }
    if output.contains('\0') {
        return Err(invalid("output", format!("contains a NUL byte; {ALLOWED}")));
    }
    if let Some(rest) = output.strip_prefix("s3://") {
        let bucket = rest.split('/').next().unwrap_or("");
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
        if !bucket_ok {
            return Err(invalid(
                "output",
                format!(
                    "bucket {bucket:?} is not a valid S3 bucket name (3 to 63 of a-z 0-9 . -); \
                     {ALLOWED}"
                ),
            ));
        }
        return Ok(());
    }
    if output.contains("://") {
        return Err(invalid(
            "output",
            format!("{output:?} has an unsupported scheme; {ALLOWED}"),
        ));
    }
    let path = std::path::Path::new(output);
    if path.exists() && !path.is_dir() {
        return Err(invalid(
            "output",
            format!("{output:?} exists and is not a directory; {ALLOWED}"),
        ));
    }
    Ok(())
}

/// `noise`: one f32 tensor of the expected shape.
fn check_noise(bytes: &[u8], expected: [u32; 5]) -> Result<(), InvalidField> {
    let want = format!(
        "a safetensors file with one f32 tensor `noise` of shape {:?}",
        expected
    );
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| {
        invalid(
            "initial_noise",
            format!("is not a safetensors file ({e}); expected {want}"),
        )
    })?;
    let t = st.tensor("noise").map_err(|_| {
        invalid(
            "initial_noise",
            format!("has no tensor `noise`; expected {want}"),
        )
    })?;
    let shape: Vec<usize> = t.shape().to_vec();
    let expected_usize: Vec<usize> = expected.iter().map(|&d| d as usize).collect();
    if t.dtype() != safetensors::Dtype::F32 || shape != expected_usize {
        return Err(invalid(
            "initial_noise",
            format!("`noise` is {:?} {:?}; expected {want}", t.dtype(), shape),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
