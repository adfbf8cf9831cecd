//! `longtake render`: one render on this machine through the same coordinator → worker →
//! storage path a cluster uses — the coordinator, N workers and the output store in this
//! process, talking real gRPC over loopback.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use longtake_coordinator::CoordinatorConfig;
use longtake_model::builtin::Builtin;
use longtake_model::device::Placement;
use longtake_model::noise::NoiseLayout;
use longtake_model::window::Stitching;
use longtake_proto::v1 as pb;
use longtake_proto::v1::render_service_client::RenderServiceClient;
use longtake_worker::WorkerBackend;
use tonic::transport::{Channel, Endpoint};

#[derive(Args)]
pub struct RenderArgs {
    #[command(flatten)]
    pub request: RequestArgs,
    /// In-process workers (default: one per device: each GPU of --device, or one on the CPU).
    /// On GPUs, N workers take the first N GPUs.
    #[arg(long)]
    workers: Option<u32>,
    #[command(flatten)]
    device: crate::device::DeviceArgs,
    /// Write the render to DIR/<render id>/ (default: ./renders).
    #[arg(long, conflicts_with = "store")]
    out: Option<PathBuf>,
    /// Write the render to an object store: s3://bucket/prefix (objects under jobs/<render id>/;
    /// endpoint and credentials from the AWS_* variables and LONGTAKE_S3_ENDPOINT).
    #[arg(long)]
    store: Option<String>,
}

/// What to render: the request flags shared by `render` and `submit`.
#[derive(Args)]
pub struct RequestArgs {
    /// What the video shows.
    #[arg(long)]
    prompt: String,
    /// What to steer away from (default: none, the empty prompt).
    #[arg(long)]
    negative_prompt: Option<String>,
    /// A diffusers Wan2.1 model directory, or a built-in model: `builtin:demo` (the default: a
    /// small model trained on the demo scenes, 64×64) or `builtin:smoke` (random weights: a
    /// noise-like smoke test of the whole path, for tests).
    #[arg(long, value_name = "DIR|builtin:NAME")]
    model: Option<String>,
    /// Length in seconds (frames = 4·⌈seconds·fps/4⌉ + 1: 60 s at 16 fps is 961 frames).
    #[arg(long, conflicts_with = "num_frames")]
    duration: Option<f64>,
    /// Length in pixel frames (4k + 1). Default: 5 s.
    #[arg(long)]
    num_frames: Option<u32>,
    /// Frames per second. Default: the model's `longtake.json`, else 16.
    #[arg(long)]
    fps: Option<u32>,
    /// Width in pixels, a multiple of the model's size multiple (16 for Wan2.1). Default: the
    /// model's `longtake.json`, else 832 (the built-in model: 64).
    #[arg(long)]
    width: Option<u32>,
    /// Height in pixels, like --width. Default: the model's `longtake.json`, else 480 (the
    /// built-in model: 64).
    #[arg(long)]
    height: Option<u32>,
    /// Seed of the initial noise (default: random, recorded in the manifest).
    #[arg(long)]
    seed: Option<u64>,
    /// Sampler steps. Default: the model's `longtake.json`, else 50 (the built-in demo model:
    /// 20, the smoke model: 4).
    #[arg(long)]
    steps: Option<u32>,
    /// Classifier-free guidance scale (1 or less disables it). Default: the model's
    /// `longtake.json`, else 5 (the built-in demo model: 2).
    #[arg(long)]
    guidance: Option<f32>,
    /// Override the scheduler's flow shift.
    #[arg(long)]
    flow_shift: Option<f32>,
    /// How windows are joined: codenoise, independent or autoregressive. Default: the model's
    /// `longtake.json`, else codenoise (the built-in demo model: autoregressive).
    #[arg(long)]
    stitching: Option<String>,
    /// Window length in latent frames (default 21, the model's native clip).
    #[arg(long)]
    window: Option<u32>,
    /// Overlap between windows in latent frames, smaller than the window. Default: the model's
    /// `longtake.json`, else 4 (the built-in demo model: 8).
    #[arg(long)]
    overlap: Option<u32>,
    /// How the seeded noise is laid out over the latent frames: independent (every frame its
    /// own) or rescheduled (after the first window, each run of window − overlap frames reuses
    /// the first window's noise frames in a shuffled order: FreeNoise). Default: the model's
    /// `longtake.json`, else independent.
    #[arg(long)]
    noise_layout: Option<String>,
    /// Autoregressive windows only: the share (0 to 1) of each step's noise level that the frames
    /// held to the previous window are re-noised to. 1 makes them as noisy as the window's own
    /// frames; lower shows them to the model more clearly, so the new frames follow them more
    /// closely. Default: the model's `longtake.json`, else 1 (the built-in demo model: 0.7).
    #[arg(long, value_name = "SHARE")]
    hold_noise: Option<f32>,
    /// Autoregressive windows only: the noise level (0 to 1) at and below which the frames held
    /// to the previous window are released. From the first step at or below it, the window
    /// denoises them with its own frames, and the overlap is blended from the previous window's
    /// result to this one's, so the hand-over is spread over the overlap instead of falling
    /// between two frames. 0 holds them to the end. Default: the model's `longtake.json`, else 0
    /// (the built-in demo model: 0.4).
    #[arg(long, value_name = "SIGMA")]
    hold_release: Option<f32>,
    /// Safetensors file with `noise` [1,16,T,h,w]: the initial latents instead of seeded noise.
    #[arg(long)]
    noise_file: Option<PathBuf>,
    /// Also write every frame as PNG (frames/000000.png, ...).
    #[arg(long)]
    png_frames: bool,
}

fn stitching(s: Option<&str>) -> Result<pb::Stitching> {
    let Some(s) = s else {
        return Ok(pb::Stitching::Unspecified);
    };
    let Some(mode) = Stitching::parse(s) else {
        bail!(
            "stitching: {s:?} is not a strategy; allowed: {}",
            Stitching::allowed()
        )
    };
    Ok(longtake_worker::stitching_to_pb(mode))
}

fn noise_layout(s: Option<&str>) -> Result<pb::NoiseLayout> {
    let Some(s) = s else {
        return Ok(pb::NoiseLayout::Unspecified);
    };
    let Some(layout) = NoiseLayout::parse(s) else {
        bail!(
            "noise-layout: {s:?} is not a layout; allowed: {}",
            NoiseLayout::allowed()
        )
    };
    Ok(longtake_worker::noise_layout_to_pb(layout))
}

impl RequestArgs {
    /// The request as a spec (no output: the caller sets it). `local_model` checks a model
    /// directory here and sends its absolute path (this machine's workers read it); otherwise the
    /// path is sent as given, as the workers see it.
    pub fn spec(&self, local_model: bool) -> Result<pb::RenderSpec> {
        let a = self;
        let stitching = stitching(a.stitching.as_deref())?;
        let noise_layout = noise_layout(a.noise_layout.as_deref())?;
        if a.noise_file.is_some() && a.noise_layout.is_some() {
            bail!(
                "noise-layout: lays out seeded noise; --noise-file gives the noise itself, so name one of them"
            );
        }
        let model = match &a.model {
            Some(name) if let Some(b) = Builtin::lookup(name) => b.name().to_string(),
            Some(name) if name.starts_with("builtin:") => bail!(
                "model: {name:?} is not a built-in model; allowed: {}, {} or a model directory",
                longtake_model::builtin::DEMO,
                longtake_model::builtin::SMOKE
            ),
            Some(dir) if !local_model => dir.clone(),
            Some(dir) => {
                let dir = std::path::Path::new(dir);
                longtake_model::pipeline::ModelDir::open(dir).with_context(|| {
                    format!(
                        "model: {} is not a usable Wan2.1 model directory",
                        dir.display()
                    )
                })?;
                dir.canonicalize()
                    .with_context(|| format!("model: {}", dir.display()))?
                    .to_string_lossy()
                    .into_owned()
            }
            None => String::new(),
        };
        let initial_noise = match &a.noise_file {
            Some(p) => {
                let bytes =
                    std::fs::read(p).with_context(|| format!("noise_file: {}", p.display()))?;
                longtake_model::io::read_f32_bytes(&bytes, "noise")
                    .with_context(|| format!("noise_file: {}", p.display()))?;
                Some(bytes)
            }
            None => None,
        };
        let length = match (a.duration, a.num_frames) {
            (Some(d), _) => Some(pb::render_spec::Length::DurationS(d)),
            (None, Some(n)) => Some(pb::render_spec::Length::NumFrames(n)),
            (None, None) => Some(pb::render_spec::Length::DurationS(5.0)),
        };
        Ok(pb::RenderSpec {
            prompt: a.prompt.clone(),
            negative_prompt: a.negative_prompt.clone().unwrap_or_default(),
            length,
            fps: a.fps,
            width: a.width,
            height: a.height,
            seed: a.seed,
            steps: a.steps,
            guidance: a.guidance,
            flow_shift: a.flow_shift,
            model,
            stitching: stitching as i32,
            window: a.window,
            overlap: a.overlap,
            output: String::new(),
            png_frames: a.png_frames,
            initial_noise,
            priority: 0,
            noise_layout: noise_layout as i32,
            hold_noise: a.hold_noise,
            hold_release: a.hold_release,
        })
    }
}

/// The in-process coordinator's configuration for renders written to `--out` or `--store`
/// (local models; jobs under `jobs/` in an object store), and the output location.
pub fn local_config(
    out: Option<&PathBuf>,
    store: Option<&String>,
) -> Result<(String, CoordinatorConfig)> {
    let (output, jobs_prefix) = match (out, store) {
        (_, Some(url)) => {
            if !url.starts_with("s3://") || url.len() <= 5 {
                bail!("store: {url:?} must be s3://bucket[/prefix]");
            }
            (url.clone(), "jobs".to_string())
        }
        (Some(dir), None) => (dir.to_string_lossy().into_owned(), String::new()),
        (None, None) => ("renders".to_string(), String::new()),
    };
    let config = CoordinatorConfig {
        jobs_prefix,
        default_output: output.clone(),
        models: std::sync::Arc::new(crate::models::LocalModels::default()),
        ..CoordinatorConfig::default()
    };
    Ok((output, config))
}

/// The in-process workers' devices: `workers` (default: one per device) on `device`.
pub fn worker_backends(
    device: &crate::device::DeviceArgs,
    workers: Option<u32>,
) -> Result<Vec<WorkerBackend>> {
    if let Some(n) = workers
        && !(1..=64).contains(&n)
    {
        bail!("workers: {n} is out of range; allowed: 1..=64");
    }
    match device.placement()? {
        Placement::Cpu => Ok(vec![
            WorkerBackend::Cpu { tp: 1 };
            workers.unwrap_or(1) as usize
        ]),
        Placement::Cuda(ids) => {
            let n = workers.map_or(ids.len(), |n| n as usize);
            if n > ids.len() {
                bail!(
                    "workers: {n} GPU workers, but --device gives {} GPU(s); allowed: 1..={}",
                    ids.len(),
                    ids.len()
                );
            }
            Ok(device
                .open_gpus(&ids[..n])?
                .into_iter()
                .map(|gpu| WorkerBackend::Cuda(gpu, Vec::new()))
                .collect())
        }
    }
}

pub fn run(a: &RenderArgs) -> Result<()> {
    // Everything that can be checked here is checked before any work starts.
    let mut spec = a.request.spec(true)?;
    let (output, config) = local_config(a.out.as_ref(), a.store.as_ref())?;
    spec.output = output;
    let backends = worker_backends(&a.device, a.workers)?;
    let location = crate::cluster::runtime()?.block_on(render(spec, config, &backends))?;
    let mut out = std::io::stdout().lock();
    use std::io::Write;
    match writeln!(out, "{location}") {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing to stdout"),
    }
}

/// Render `spec` on this machine with one in-process worker per backend; returns the output
/// location.
pub async fn render(
    spec: pb::RenderSpec,
    config: CoordinatorConfig,
    backends: &[WorkerBackend],
) -> Result<String> {
    let workers = backends.len() as u32;
    let started = Instant::now();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the coordinator to loopback")?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let coordinator = tokio::spawn(longtake_coordinator::run(
        listener,
        wait(stop_rx.clone()),
        config,
    ));
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?;
    let connect = || async {
        for _ in 0..50 {
            if let Ok(c) = endpoint.connect().await {
                return Ok(c);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!("could not reach the in-process coordinator at {addr}")
    };
    let channel: Channel = connect().await?;
    let mut worker_tasks = Vec::new();
    let registered = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    for (i, backend) in backends.iter().enumerate() {
        let ch = connect().await?;
        let opts = longtake_worker::WorkerOptions {
            name: format!("local-{i}"),
            backend: backend.clone(),
            devices: vec![format!("{backend:?}")],
            capacity: 1,
            registered: Some(std::sync::Arc::clone(&registered)),
            auth: Default::default(),
            metrics: Default::default(),
        };
        worker_tasks.push(tokio::spawn(longtake_worker::run(
            ch,
            opts,
            wait(stop_rx.clone()),
        )));
    }
    let mut client = RenderServiceClient::new(channel)
        .max_decoding_message_size(longtake_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(longtake_proto::MAX_MESSAGE_BYTES);
    let outcome = async {
        // Every worker takes part in the plan: submit once all have registered.
        tokio::time::timeout(Duration::from_secs(60), registered.acquire_many(workers))
            .await
            .map_err(|_| anyhow::anyhow!("the in-process workers did not register within 60 s"))?
            .map_err(|e| anyhow::anyhow!("worker registration: {e}"))?
            .forget();
        let resp = client
            .submit_render(pb::SubmitRenderRequest {
                spec: Some(spec),
                idempotency_key: String::new(),
            })
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?
            .into_inner();
        watch(&mut client, &resp.render_id).await
    }
    .await;
    let _ = stop_tx.send(true);
    for w in worker_tasks {
        let _ = w.await;
    }
    let _ = coordinator.await;
    let render = outcome?;
    let state = pb::RenderState::try_from(render.state).unwrap_or(pb::RenderState::Unspecified);
    if state != pb::RenderState::Succeeded {
        bail!(
            "render {} {}: {}",
            render.id,
            state.as_str_name(),
            render.error
        );
    }
    let spec = render.spec.unwrap_or_default();
    let frames = render.plan.as_ref().map(|p| p.num_frames).unwrap_or(0);
    if spec.model == longtake_model::builtin::SMOKE {
        eprintln!(
            "note: rendered with the built-in random-weight smoke model: the video is noise, not a picture"
        );
    }
    eprintln!(
        "render {} done in {:.1} s: {frames} frames → {}",
        render.id,
        started.elapsed().as_secs_f64(),
        render.output_uri
    );
    Ok(render.output_uri)
}

/// Follow a render until it ends, showing progress: a bar on a terminal, log lines otherwise.
async fn watch(client: &mut RenderServiceClient<Channel>, id: &str) -> Result<pb::Render> {
    let mut stream = client
        .watch_render(pb::WatchRenderRequest {
            render_id: id.to_string(),
            after_sequence: 0,
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    let mut display = ProgressDisplay::new();
    let mut last = pb::Render::default();
    while let Some(ev) = stream
        .message()
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
    {
        let Some(r) = ev.render else { continue };
        display.show(&r);
        last = r;
    }
    display.finish();
    Ok(last)
}

/// Progress of one render on stderr: a bar on a terminal, a log line on a change of phase and
/// at most every 2 s otherwise (plus every message that mentions a rollback).
pub struct ProgressDisplay {
    tty: bool,
    bar: indicatif::ProgressBar,
    last_state: i32,
    last_line: String,
    last_message: String,
    last_log: Instant,
}

impl ProgressDisplay {
    pub fn new() -> Self {
        let tty = std::io::stderr().is_terminal();
        let bar = indicatif::ProgressBar::new(0);
        if tty {
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg:<28} [{bar:40}] {pos}/{len} {elapsed_precise} ETA {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
        } else {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        ProgressDisplay {
            tty,
            bar,
            last_state: -1,
            last_line: String::new(),
            last_message: String::new(),
            last_log: Instant::now() - Duration::from_secs(10),
        }
    }

    pub fn show(&mut self, r: &pb::Render) {
        let state = pb::RenderState::try_from(r.state).unwrap_or(pb::RenderState::Unspecified);
        let p = r.progress.clone().unwrap_or_default();
        let (done, total, unit) = if state == pb::RenderState::Decoding {
            (p.frames_done, p.frames_total, "frames")
        } else {
            (p.window_steps_done, p.window_steps_total, "window-steps")
        };
        let phase = state
            .as_str_name()
            .trim_start_matches("RENDER_STATE_")
            .to_lowercase();
        if p.message.starts_with("rolled back") && p.message != self.last_message {
            self.bar
                .suspend(|| eprintln!("render {}: {}", r.id, p.message));
        }
        self.last_message = p.message.clone();
        if self.tty {
            self.bar.set_length(total);
            self.bar.set_position(done);
            self.bar.set_message(format!("{phase} ({unit})"));
        } else {
            let line = format!("render {}: {phase} {done}/{total} {unit}", r.id);
            if line != self.last_line
                && (self.last_log.elapsed() > Duration::from_secs(2) || r.state != self.last_state)
            {
                eprintln!("{line}");
                self.last_log = Instant::now();
                self.last_line = line;
            }
        }
        self.last_state = r.state;
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stitching_names_parse_and_a_bad_one_lists_the_allowed() {
        assert_eq!(stitching(None).unwrap(), pb::Stitching::Unspecified);
        for (name, want) in [
            ("codenoise", pb::Stitching::Codenoise),
            ("independent", pb::Stitching::Independent),
            ("autoregressive", pb::Stitching::Autoregressive),
        ] {
            assert_eq!(stitching(Some(name)).unwrap(), want);
        }
        for mode in Stitching::ALL {
            let v = longtake_worker::stitching_to_pb(mode) as i32;
            assert_eq!(longtake_worker::stitching_from_pb(v), mode);
        }
        let e = stitching(Some("zigzag")).unwrap_err().to_string();
        assert_eq!(
            e,
            "stitching: \"zigzag\" is not a strategy; allowed: codenoise, independent, autoregressive"
        );
    }

    #[test]
    fn noise_layout_names_parse_and_a_bad_one_lists_the_allowed() {
        assert_eq!(noise_layout(None).unwrap(), pb::NoiseLayout::Unspecified);
        assert_eq!(
            noise_layout(Some("rescheduled")).unwrap(),
            pb::NoiseLayout::Rescheduled
        );
        assert_eq!(
            noise_layout(Some("independent")).unwrap(),
            pb::NoiseLayout::Independent
        );
        for layout in [NoiseLayout::Independent, NoiseLayout::Rescheduled] {
            let v = longtake_worker::noise_layout_to_pb(layout) as i32;
            assert_eq!(longtake_worker::noise_layout_from_pb(v), layout);
        }
        let e = noise_layout(Some("fresh")).unwrap_err().to_string();
        assert_eq!(
            e,
            "noise-layout: \"fresh\" is not a layout; allowed: independent, rescheduled"
        );
    }

    /// The flags' help names the fallback values and the built-in demo model's own by hand; this
    /// keeps them equal to `ModelDefaults::WAN21` and the demo model's `longtake.json`.
    #[test]
    fn the_help_names_the_fallbacks_and_the_demo_models_settings() {
        use clap::Args as _;
        use longtake_coordinator::geometry::ModelCatalog as _;
        let models = crate::models::LocalModels::default();
        let demo = models.model_info("builtin:demo").unwrap().defaults;
        let smoke = models.model_info("builtin:smoke").unwrap().defaults;
        let wan = longtake_coordinator::geometry::ModelDefaults::WAN21;
        let name =
            |m: longtake_coordinator::validate::StitchingMode| format!("{m:?}").to_lowercase();
        let cmd = RequestArgs::augment_args(clap::Command::new("render"));
        let help = |id: &str| {
            let arg = cmd.get_arguments().find(|a| a.get_id() == id);
            let text = arg.and_then(|a| a.get_help()).map(|h| h.to_string());
            text.unwrap_or_else(|| panic!("--{id} has no help"))
        };
        for (id, fallback, own) in [
            (
                "steps",
                wan.steps.to_string(),
                format!("{}, the smoke model: {}", demo.steps, smoke.steps),
            ),
            (
                "guidance",
                wan.guidance.to_string(),
                demo.guidance.to_string(),
            ),
            ("stitching", name(wan.stitching), name(demo.stitching)),
            ("overlap", wan.overlap.to_string(), demo.overlap.to_string()),
            (
                "hold_noise",
                wan.hold_noise.to_string(),
                demo.hold_noise.to_string(),
            ),
            (
                "hold_release",
                wan.hold_release.to_string(),
                demo.hold_release.to_string(),
            ),
        ] {
            let want = format!("else {fallback} (the built-in demo model: {own})");
            let text = help(id);
            assert!(
                text.contains(&want),
                "--{id}: its help {text:?} should say {want:?}"
            );
        }
    }
}
