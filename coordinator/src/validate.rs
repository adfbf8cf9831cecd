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

    /// The name the model crate, `longtake.json` and the manifest use.
    pub fn name(self) -> &'static str {
        match self {
            NoiseMode::Independent => "independent",
            NoiseMode::Rescheduled => "rescheduled",
        }
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

    let stitching = match Stitching::try_from(spec.stitching) {
        Ok(s) => StitchingMode::from_proto(s).unwrap_or(d.stitching),
        Err(_) => {
            return Err(invalid(
                "stitching",
                format!(
                    "is {}; allowed: CODENOISE (1), INDEPENDENT (2), AUTOREGRESSIVE (3) or unset",
                    spec.stitching
                ),
            ));
        }
    };

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

    let noise_layout = match NoiseLayout::try_from(spec.noise_layout) {
        Ok(n) => NoiseMode::from_proto(n).unwrap_or(d.noise_layout),
        Err(_) => {
            return Err(invalid(
                "noise_layout",
                format!(
                    "is {}; allowed: INDEPENDENT (1), RESCHEDULED (2) or unset",
                    spec.noise_layout
                ),
            ));
        }
    };

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
        output,
        png_frames: spec.png_frames,
        priority: spec.priority,
        has_initial_noise: spec.initial_noise.is_some(),
        latent: geometry,
    })
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
mod tests {
    use super::*;

    fn base() -> RenderSpec {
        RenderSpec {
            prompt: "a lighthouse at dusk".into(),
            length: Some(Length::DurationS(60.0)),
            ..Default::default()
        }
    }

    fn model_info(spec: &RenderSpec) -> ModelInfo {
        use crate::geometry::{ModelCatalog, Wan21Catalog};
        Wan21Catalog.model_info(spec.model.trim()).unwrap()
    }

    fn check(spec: RenderSpec) -> Result<ValidSpec, InvalidField> {
        validate(&spec, &Limits::default(), &model_info(&spec), "renders", 7)
    }

    fn field_of(spec: RenderSpec) -> &'static str {
        check(spec).expect_err("should be rejected").field
    }

    #[test]
    fn geometry_and_defaults_come_from_the_model() {
        use crate::geometry::ModelDefaults;
        let info = ModelInfo {
            latent: LatentGeometry {
                channels: 8,
                spatial_factor: 4,
                temporal_factor: 2,
                size_multiple: 8,
            },
            native_window: 9,
            defaults: ModelDefaults {
                width: 96,
                height: 72,
                fps: 8,
                steps: 7,
                guidance: 3.0,
                window: 9,
                overlap: 2,
                stitching: StitchingMode::Autoregressive,
                noise_layout: NoiseMode::Rescheduled,
            },
        };
        let run = |spec: RenderSpec| validate(&spec, &Limits::default(), &info, "renders", 7);
        let v = run(RenderSpec {
            length: Some(Length::DurationS(2.0)),
            ..base()
        })
        .unwrap();
        // 2 s at 8 fps: 16 frames → 2k + 1 = 17; latent frames (17 − 1) / 2 + 1 = 9.
        assert_eq!(v.num_frames, 17);
        assert_eq!(v.latent_shape(), [8, 9, 72 / 4, 96 / 4]);
        assert_eq!((v.steps, v.guidance, v.window, v.overlap), (7, 3.0, 9, 2));
        // The model's stitching and noise layout when the request leaves them unset; the
        // request's when it names them.
        assert_eq!(v.stitching, StitchingMode::Autoregressive);
        assert_eq!(v.noise_layout, NoiseMode::Rescheduled);
        assert_eq!(
            run(RenderSpec {
                length: Some(Length::DurationS(2.0)),
                noise_layout: NoiseLayout::Independent as i32,
                ..base()
            })
            .unwrap()
            .noise_layout,
            NoiseMode::Independent
        );
        let v = run(RenderSpec {
            length: Some(Length::DurationS(2.0)),
            stitching: Stitching::Codenoise as i32,
            ..base()
        })
        .unwrap();
        assert_eq!(v.stitching, StitchingMode::Codenoise);
        let e = run(RenderSpec {
            length: Some(Length::NumFrames(20)),
            ..base()
        })
        .unwrap_err();
        assert_eq!(e.field, "num_frames");
        assert!(e.reason.contains("2k + 1"), "{}", e.reason);
        let e = run(RenderSpec {
            width: Some(100),
            ..base()
        })
        .unwrap_err();
        assert!(e.reason.contains("multiple of 8"), "{}", e.reason);
        let e = run(RenderSpec {
            window: Some(10),
            ..base()
        })
        .unwrap_err();
        assert!(e.reason.contains("1..=9"), "{}", e.reason);
    }

    #[test]
    fn smoke_defaults_apply() {
        // No model: the default built-in model, by name.
        let v = check(base()).unwrap();
        assert_eq!(v.model, DEFAULT_MODEL);
        assert!(!v.is_smoke() && v.is_builtin());
        let v = check(RenderSpec {
            model: SMOKE_MODEL.into(),
            ..base()
        })
        .unwrap();
        assert!(v.is_smoke());
        assert_eq!(v.num_frames, 961);
        assert_eq!(v.latent_frames(), 241);
        assert_eq!((v.width, v.height, v.fps, v.steps), (64, 64, 16, 4));
        assert_eq!((v.window, v.overlap), (21, 4));
        assert_eq!(v.guidance, 5.0);
        assert_eq!(v.seed, 7);
        assert_eq!(v.stitching, StitchingMode::Codenoise);
        assert_eq!(v.output, "renders");
        assert_eq!(v.latent_shape(), [16, 241, 8, 8]);
    }

    #[test]
    fn model_defaults_apply() {
        let v = check(RenderSpec {
            model: "/models/wan2.1-t2v-1.3b".into(),
            seed: Some(42),
            ..base()
        })
        .unwrap();
        assert_eq!((v.width, v.height, v.fps, v.steps), (832, 480, 16, 50));
        assert_eq!(v.seed, 42);
        assert_eq!(v.flow_shift, None);
        assert_eq!(v.latent_shape(), [16, 241, 60, 104]);
    }

    #[test]
    fn frames_rule() {
        assert_eq!(frames_for_duration(60.0, 16, 4), 961);
        assert_eq!(frames_for_duration(5.0, 16, 4), 81);
        assert_eq!(frames_for_duration(0.1, 40, 4), 5);
        assert_eq!(frames_for_duration(1.0, 1, 4), 5);
        assert_eq!(frames_for_duration(0.01, 16, 4), 5);
        assert_eq!(frames_for_duration(600.0, 16, 4), 9601);
    }

    #[test]
    fn to_proto_round_trips() {
        let v = check(base()).unwrap();
        let again = validate(
            &v.to_proto(None),
            &Limits::default(),
            &model_info(&v.to_proto(None)),
            "x",
            99,
        )
        .unwrap();
        assert_eq!(again, v);
    }

    #[test]
    fn prompt() {
        assert_eq!(
            field_of(RenderSpec {
                prompt: "".into(),
                ..base()
            }),
            "prompt"
        );
        assert_eq!(
            field_of(RenderSpec {
                prompt: " \n\t".into(),
                ..base()
            }),
            "prompt"
        );
        assert_eq!(
            field_of(RenderSpec {
                prompt: "x".repeat(MAX_PROMPT_BYTES + 1),
                ..base()
            }),
            "prompt"
        );
        assert_eq!(
            field_of(RenderSpec {
                negative_prompt: "x".repeat(MAX_PROMPT_BYTES + 1),
                ..base()
            }),
            "negative_prompt"
        );
    }

    #[test]
    fn length() {
        let e = check(RenderSpec {
            length: None,
            ..base()
        })
        .unwrap_err();
        assert_eq!(e.field, "duration_s");
        assert!(e.reason.contains("num_frames"));
        for d in [0.0, -1.0, 600.5, f64::NAN, f64::INFINITY] {
            let e = check(RenderSpec {
                length: Some(Length::DurationS(d)),
                ..base()
            })
            .unwrap_err();
            assert_eq!(e.field, "duration_s", "{d}");
            assert!(e.reason.contains("at most 600"), "{}", e.reason);
        }
        // 600 s at 120 fps is within the duration limit but over the frame limit.
        let e = check(RenderSpec {
            fps: Some(120),
            length: Some(Length::DurationS(600.0)),
            ..base()
        })
        .unwrap_err();
        assert_eq!(e.field, "duration_s");
        assert!(e.reason.contains("9601"), "{}", e.reason);
        for f in [0, 9605, 80, 82] {
            let e = check(RenderSpec {
                length: Some(Length::NumFrames(f)),
                ..base()
            })
            .unwrap_err();
            assert_eq!(e.field, "num_frames", "{f}");
        }
        let e = check(RenderSpec {
            length: Some(Length::NumFrames(80)),
            ..base()
        })
        .unwrap_err();
        assert!(e.reason.contains("77 or 81"), "{}", e.reason);
        let v = check(RenderSpec {
            length: Some(Length::NumFrames(81)),
            ..base()
        })
        .unwrap();
        assert_eq!((v.num_frames, v.duration_s), (81, None));
    }

    #[test]
    fn fps() {
        assert_eq!(
            field_of(RenderSpec {
                fps: Some(0),
                ..base()
            }),
            "fps"
        );
        assert_eq!(
            field_of(RenderSpec {
                fps: Some(121),
                ..base()
            }),
            "fps"
        );
        assert_eq!(
            check(RenderSpec {
                fps: Some(24),
                ..base()
            })
            .unwrap()
            .num_frames,
            1441
        );
    }

    #[test]
    fn sides() {
        for (w, h, field) in [
            (0, 64, "width"),
            (65, 64, "width"),
            (4112, 64, "width"),
            (64, 0, "height"),
            (64, 24, "height"),
            (64, 4112, "height"),
        ] {
            assert_eq!(
                field_of(RenderSpec {
                    width: Some(w),
                    height: Some(h),
                    ..base()
                }),
                field,
                "{w}x{h}"
            );
        }
        assert!(
            check(RenderSpec {
                width: Some(4096),
                height: Some(16),
                ..base()
            })
            .is_ok()
        );
    }

    #[test]
    fn steps_guidance_shift() {
        assert_eq!(
            field_of(RenderSpec {
                steps: Some(0),
                ..base()
            }),
            "steps"
        );
        assert_eq!(
            field_of(RenderSpec {
                steps: Some(1001),
                ..base()
            }),
            "steps"
        );
        for g in [f32::NAN, f32::INFINITY, -0.5] {
            assert_eq!(
                field_of(RenderSpec {
                    guidance: Some(g),
                    ..base()
                }),
                "guidance"
            );
        }
        assert_eq!(
            check(RenderSpec {
                guidance: Some(0.0),
                ..base()
            })
            .unwrap()
            .guidance,
            0.0
        );
        for s in [0.0, -1.0, f32::NAN] {
            assert_eq!(
                field_of(RenderSpec {
                    flow_shift: Some(s),
                    ..base()
                }),
                "flow_shift"
            );
        }
        assert_eq!(
            check(RenderSpec {
                flow_shift: Some(3.0),
                ..base()
            })
            .unwrap()
            .flow_shift,
            Some(3.0)
        );
    }

    #[test]
    fn window_and_overlap() {
        assert_eq!(
            field_of(RenderSpec {
                window: Some(0),
                ..base()
            }),
            "window"
        );
        let e = check(RenderSpec {
            window: Some(22),
            ..base()
        })
        .unwrap_err();
        assert_eq!(e.field, "window");
        assert!(e.reason.contains("1..=21"));
        let e = check(RenderSpec {
            window: Some(8),
            overlap: Some(8),
            ..base()
        })
        .unwrap_err();
        assert_eq!(e.field, "overlap");
        assert!(e.reason.contains("0..=7"), "{}", e.reason);
        // An explicit 0 overlap is allowed; a short window clamps the default overlap.
        assert_eq!(
            check(RenderSpec {
                overlap: Some(0),
                ..base()
            })
            .unwrap()
            .overlap,
            0
        );
        let v = check(RenderSpec {
            window: Some(3),
            ..base()
        })
        .unwrap();
        assert_eq!((v.window, v.overlap), (3, 2));
    }

    #[test]
    fn noise_layout() {
        for bad in [3, -1] {
            let e = check(RenderSpec {
                noise_layout: bad,
                ..base()
            })
            .unwrap_err();
            assert_eq!(e.field, "noise_layout");
            assert!(
                e.to_string().contains("INDEPENDENT (1), RESCHEDULED (2)"),
                "{e}"
            );
        }
        // Unset: independent (the model's default here); the request's layout otherwise, and it
        // travels on the wire.
        assert_eq!(check(base()).unwrap().noise_layout, NoiseMode::Independent);
        let v = check(RenderSpec {
            noise_layout: NoiseLayout::Rescheduled as i32,
            ..base()
        })
        .unwrap();
        assert_eq!(v.noise_layout, NoiseMode::Rescheduled);
        assert_eq!(
            v.to_proto(None).noise_layout,
            NoiseLayout::Rescheduled as i32
        );
    }

    #[test]
    fn stitching() {
        assert_eq!(
            field_of(RenderSpec {
                stitching: 9,
                ..base()
            }),
            "stitching"
        );
        assert_eq!(
            field_of(RenderSpec {
                stitching: -1,
                ..base()
            }),
            "stitching"
        );
        let v = check(RenderSpec {
            stitching: Stitching::Autoregressive as i32,
            ..base()
        })
        .unwrap();
        assert_eq!(v.stitching, StitchingMode::Autoregressive);
    }

    #[test]
    fn output() {
        for bad in [
            "ftp://host/x",
            "s3://",
            "s3://Bad_Bucket/x",
            "s3://ab",
            "a\0b",
        ] {
            assert_eq!(
                field_of(RenderSpec {
                    output: bad.into(),
                    ..base()
                }),
                "output",
                "{bad}"
            );
        }
        let e = validate(&base(), &Limits::default(), &model_info(&base()), "", 1).unwrap_err();
        assert_eq!(e.field, "output");
        let file = tempfile::NamedTempFile::new().unwrap();
        let e = check(RenderSpec {
            output: file.path().to_str().unwrap().into(),
            ..base()
        })
        .unwrap_err();
        assert!(e.reason.contains("not a directory"), "{}", e.reason);
        for good in ["s3://renders", "s3://my-bucket.eu/a/b", "out/dir", "/tmp"] {
            assert_eq!(
                check(RenderSpec {
                    output: good.into(),
                    ..base()
                })
                .unwrap()
                .output,
                good
            );
        }
    }

    fn noise_file(shape: &[usize], dtype: safetensors::Dtype) -> Vec<u8> {
        let n: usize = shape.iter().product();
        let width = if dtype == safetensors::Dtype::F32 {
            4
        } else {
            2
        };
        let data = vec![0u8; n * width];
        let view = safetensors::tensor::TensorView::new(dtype, shape.to_vec(), &data).unwrap();
        safetensors::serialize([("noise", view)], None).unwrap()
    }

    #[test]
    fn initial_noise() {
        let spec = |noise: Vec<u8>| RenderSpec {
            length: Some(Length::NumFrames(9)),
            initial_noise: Some(noise),
            ..base()
        };
        let ok = check(spec(noise_file(&[1, 16, 3, 8, 8], safetensors::Dtype::F32))).unwrap();
        assert!(ok.has_initial_noise);
        for bad in [
            noise_file(&[1, 16, 4, 8, 8], safetensors::Dtype::F32),
            noise_file(&[1, 16, 3, 8, 8], safetensors::Dtype::F16),
            b"not safetensors".to_vec(),
        ] {
            assert_eq!(field_of(spec(bad)), "initial_noise");
        }
    }

    #[test]
    fn status_names_the_field() {
        let status: tonic::Status = check(RenderSpec {
            steps: Some(0),
            ..base()
        })
        .unwrap_err()
        .into();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().starts_with("steps: "),
            "{}",
            status.message()
        );
    }
}
