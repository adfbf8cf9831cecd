//! `longtake`: the command-line entry point and composition root — the only crate that links
//! both the coordinator and the worker.
//!
//! Subcommands: `render` (a whole render on this machine: coordinator, workers and storage in
//! one process over loopback gRPC); the farm as separate processes: `coordinator`, `worker`,
//! and the clients `submit`, `get`, `watch`, `cancel`, `delete`, `list`, `loadgen`; `analyze`
//! (coherence measures of a finished render), `compare` (the measures of each stitching
//! strategy side by side), `model` (single model components on files, for checking them against
//! the reference), `bench` (time them) and `kernels` (compile the CUDA kernels with NVRTC).

/// `println!` for command output that a closed pipe (`| head`) ends quietly instead of with a
/// panic.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

mod analyze;
mod cluster;
mod compare;
mod device;
mod dit;
mod generate;
mod kernels;
mod loadgen;
mod models;
mod render;
mod text;
mod vae;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Render farm for long AI video.
#[derive(Parser)]
#[command(name = "longtake", version, about)]
struct Cli {
    /// Worker threads for CPU compute (default: every core; `RAYON_NUM_THREADS` also works).
    #[arg(long, global = true, env = "LONGTAKE_THREADS")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Render a video on this machine: coordinator, workers and storage in one process.
    Render(Box<render::RenderArgs>),
    /// Serve a coordinator (one replica of several with --etcd).
    Coordinator(cluster::CoordinatorArgs),
    /// Run a worker: register with the coordinator(s) and compute what they assign.
    Worker(cluster::WorkerArgs),
    /// Submit a render to a farm; prints its id (first line of stdout).
    Submit(Box<cluster::SubmitArgs>),
    /// Show one render's state.
    Get(cluster::IdArgs),
    /// Follow one render until it ends (exit 0 only if it succeeded).
    Watch(cluster::IdArgs),
    /// Cancel a render.
    Cancel(cluster::IdArgs),
    /// Delete a finished render: its outputs and its state.
    Delete(cluster::IdArgs),
    /// List renders, newest first.
    List(cluster::ListArgs),
    /// Load-test a farm: seeded synthetic prompts at a Poisson rate, then latency, queue,
    /// throughput and goodput figures.
    Loadgen(Box<loadgen::LoadgenArgs>),
    /// Measure a finished render's coherence: window seams (ratio and z-score), colour per
    /// second and drift, and for demo-world prompts the object's colours, track and motion.
    Analyze(analyze::AnalyzeArgs),
    /// Render one request with each stitching strategy and print the coherence measures side by
    /// side.
    Compare(Box<compare::CompareArgs>),
    /// Run one model component on safetensors files (developer tools; parity checks).
    #[command(subcommand)]
    Model(ModelCommand),
    /// Time model components; the last line printed is the figure.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Compile every CUDA kernel with NVRTC (no GPU needed) and write the PTX.
    Kernels(kernels::KernelsArgs),
}

#[derive(Subcommand)]
enum ModelCommand {
    /// One forward of the Wan transformer: IN holds `hidden_states` [B,C,F,H,W], `timestep` [B]
    /// and `encoder_hidden_states` [B,S,text_dim]; OUT gets `sample` [B,C_out,F,H,W] (f32).
    DitForward(DitForwardArgs),
    /// Encode a prompt as WanPipeline does (clean, tokenize, UMT5, zero-pad to 512): OUT gets
    /// `prompt_embeds` [1,512,d_model] (f32).
    EncodeText(EncodeTextArgs),
    /// Decode latents with the Wan VAE: IN holds `latents` [B,16,T,h,w]; OUT gets `sample`
    /// [B,3,F,H,W] (f32, in [−1, 1]).
    VaeDecode(vae::VaeDecodeArgs),
    /// Generate one clip with a diffusers Wan2.1 model directory (text encoder, sampler loop
    /// with guidance, VAE): OUT gets `latents` and `video`.
    Generate(Box<generate::GenerateArgs>),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Time the Wan transformer forward; prints `dit_forward_ms=<median> gflops=<rate>` last.
    Dit(BenchDitArgs),
    /// Time prompt encoding (tokenize + UMT5 + pad); prints `text_ms=<median>` last.
    Text(BenchTextArgs),
    /// Time the Wan VAE decode; prints `vae_ms=<median>` last.
    Vae(vae::BenchVaeArgs),
}

#[derive(Args)]
struct DitForwardArgs {
    /// A diffusers `transformer/` directory (config.json + safetensors, single or sharded).
    #[arg(long)]
    transformer: PathBuf,
    /// Input safetensors file.
    #[arg(long)]
    input: PathBuf,
    /// Output safetensors file (written atomically).
    #[arg(long)]
    output: PathBuf,
    /// Tensor-parallel ranks (CPU threads, or GPUs of --device); must divide the head count.
    #[arg(long, default_value_t = 1)]
    tp: usize,
    #[command(flatten)]
    device: device::DeviceArgs,
}

#[derive(Args)]
struct BenchDitArgs {
    /// A diffusers `transformer/` directory.
    #[arg(long)]
    transformer: PathBuf,
    /// Input safetensors file, as for `model dit-forward`.
    #[arg(long)]
    input: PathBuf,
    /// Tensor-parallel ranks (CPU threads, or GPUs of --device); must divide the head count.
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Timed forwards after one warm-up.
    #[arg(long, default_value_t = 10)]
    iters: usize,
    #[command(flatten)]
    device: device::DeviceArgs,
}

#[derive(Args)]
struct EncodeTextArgs {
    /// A diffusers Wan model directory holding `text_encoder/` and `tokenizer/`.
    #[arg(long)]
    model: PathBuf,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Output safetensors file (written atomically).
    #[arg(long)]
    output: PathBuf,
    #[command(flatten)]
    device: device::DeviceArgs,
}

#[derive(Args)]
struct BenchTextArgs {
    /// A diffusers Wan model directory holding `text_encoder/` and `tokenizer/`.
    #[arg(long)]
    model: PathBuf,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Timed encodes after one warm-up.
    #[arg(long, default_value_t = 10)]
    iters: usize,
    #[command(flatten)]
    device: device::DeviceArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = longtake_model::backend::check_cpu_kernels() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    if let Some(n) = cli.threads {
        if n == 0 {
            eprintln!("error: --threads must be at least 1");
            return ExitCode::from(2);
        }
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
        {
            eprintln!("error: could not start {n} threads: {e}");
            return ExitCode::FAILURE;
        }
    }
    let result = match cli.command {
        Command::Render(a) => render::run(&a),
        Command::Coordinator(a) => cluster::coordinator(&a),
        Command::Worker(a) => cluster::worker(&a),
        Command::Submit(a) => cluster::submit(&a),
        Command::Get(a) => cluster::get(&a),
        Command::Watch(a) => cluster::watch(&a),
        Command::Cancel(a) => cluster::cancel(&a),
        Command::Delete(a) => cluster::delete(&a),
        Command::List(a) => cluster::list(&a),
        Command::Loadgen(a) => loadgen::run(&a),
        Command::Analyze(a) => analyze::run(&a),
        Command::Compare(a) => compare::run(&a),
        Command::Kernels(a) => kernels::run(&a),
        Command::Model(ModelCommand::DitForward(a)) => {
            dit::forward(&a.transformer, &a.input, &a.output, a.tp, &a.device)
        }
        Command::Model(ModelCommand::EncodeText(a)) => {
            text::encode(&a.model, &a.prompt, &a.output, &a.device)
        }
        Command::Bench(BenchCommand::Dit(a)) => {
            dit::bench(&a.transformer, &a.input, a.tp, a.iters, &a.device)
        }
        Command::Model(ModelCommand::VaeDecode(a)) => vae::decode(&a),
        Command::Model(ModelCommand::Generate(a)) => generate::run(&a),
        Command::Bench(BenchCommand::Vae(a)) => vae::bench(&a),
        Command::Bench(BenchCommand::Text(a)) => {
            text::bench(&a.model, &a.prompt, a.iters, &a.device)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
