//! `longtake compare`: the same request rendered with each stitching strategy (codenoise,
//! independent, autoregressive) on this machine, then analyzed; the measures are printed side by
//! side (a table, or `--json`), so strategies are compared on evidence.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use longtake_model::window::Stitching;
use longtake_proto::v1 as pb;

use crate::analyze;
use crate::render::{RequestArgs, local_config, render};

#[derive(Args)]
pub struct CompareArgs {
    /// The request (its --stitching is ignored: every strategy is rendered; --hold-noise and
    /// --hold-release go to the autoregressive render only).
    #[command(flatten)]
    request: RequestArgs,
    /// In-process workers for each render (default: one per device: each GPU of --device, or
    /// one on the CPU).
    #[arg(long)]
    workers: Option<u32>,
    #[command(flatten)]
    device: crate::device::DeviceArgs,
    /// Write the three renders to DIR/<render id>/ (default: ./renders).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also draw each render's contact sheet, as PREFIX-<strategy>.png.
    #[arg(long, value_name = "PREFIX")]
    sheets: Option<PathBuf>,
    /// Print one JSON object per strategy (an array) instead of the table.
    #[arg(long)]
    json: bool,
}

pub fn run(a: &CompareArgs) -> Result<()> {
    let backends = crate::render::worker_backends(&a.device, a.workers)?;
    let mut spec = a.request.spec(true)?;
    // One seed for all three, recorded: the strategies differ only in how windows are joined.
    if spec.seed.is_none() {
        spec.seed = Some(rand_seed());
    }
    let (output, config) = local_config(a.out.as_ref(), None)?;
    spec.output = output;
    let rt = crate::cluster::runtime()?;
    let mut reports = Vec::new();
    for mode in Stitching::ALL {
        let name = mode.name();
        eprintln!("rendering with {name} stitching");
        let config = config.clone();
        let spec = pb::RenderSpec {
            stitching: longtake_worker::stitching_to_pb(mode) as i32,
            hold_noise: spec
                .hold_noise
                .filter(|_| mode == Stitching::Autoregressive),
            hold_release: spec
                .hold_release
                .filter(|_| mode == Stitching::Autoregressive),
            ..spec.clone()
        };
        let location = rt.block_on(render(spec, config, &backends))?;
        let (report, frames) = analyze::analyze(std::path::Path::new(&location))?;
        if let Some(prefix) = &a.sheets {
            let path = PathBuf::from(format!("{}-{name}.png", prefix.display()));
            std::fs::write(&path, analyze::sheet_png(&report, &frames)?)
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!("contact sheet: {}", path.display());
        }
        reports.push(report);
    }
    let mut out = std::io::stdout().lock();
    use std::io::Write;
    let text = if a.json {
        serde_json::Value::Array(reports.iter().map(analyze::json).collect()).to_string()
    } else {
        let columns: Vec<Vec<(String, String)>> = reports.iter().map(analyze::rows).collect();
        let mut header = vec!["measure".to_string()];
        header.extend(Stitching::ALL.iter().map(|m| m.name().to_string()));
        let rows: Vec<Vec<String>> = columns[0]
            .iter()
            .enumerate()
            .filter(|(_, (k, _))| k != "stitching")
            .map(|(i, (k, _))| {
                let mut row = vec![k.clone()];
                row.extend(
                    columns
                        .iter()
                        .map(|c| c.get(i).map_or("-".into(), |v| v.1.clone())),
                );
                row
            })
            .collect();
        format!(
            "{} (seed {})\n\n{}",
            reports[0].prompt,
            spec.seed.unwrap_or(0),
            analyze::table(&header, &rows)
        )
    };
    match writeln!(out, "{text}") {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing to stdout"),
    }
}

fn rand_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() >> 11
}
