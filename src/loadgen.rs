//! `longtake loadgen`: synthetic load against a farm.
//!
//! Prompts come from seeded templates (subject × action × setting × style), lengths and sizes
//! from weighted mixes. Arrivals are open-loop: a Poisson process at `--rate` per second whose
//! submissions never wait for earlier answers (each is its own task), for `--duration` seconds.
//! Every submission carries an idempotency key derived from the seed and its index, so the
//! client's own retries across a failover never submit twice. Afterwards the renders are read
//! back (ListRenders) until they finish or `--drain` runs out, and the figures are printed: a
//! table, or `--json`.
//!
//! Latencies go into HDR histograms (3 significant digits), not sorted vectors.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Args;
use hdrhistogram::Histogram;
use longtake_proto::v1 as pb;
use serde_json::json;

use crate::cluster::{Coordinators, Target, runtime};

const SUBJECTS: &[&str] = &[
    "a lighthouse",
    "a red fox",
    "a city tram",
    "an old fishing boat",
    "a paper kite",
    "a snow leopard",
    "a glass greenhouse",
    "a steam locomotive",
];
const ACTIONS: &[&str] = &[
    "slowly turning",
    "crossing the frame",
    "seen from above",
    "in a long tracking shot",
    "standing still",
    "lit by passing clouds",
];
const SETTINGS: &[&str] = &[
    "on a cliff at dusk",
    "in a rainy street",
    "in a snowy forest",
    "by a harbour at dawn",
    "in a desert at noon",
    "under neon lights",
];
const STYLES: &[&str] = &[
    "cinematic",
    "watercolour",
    "35 mm film",
    "documentary",
    "stop motion",
];

#[derive(Args)]
pub struct LoadgenArgs {
    #[command(flatten)]
    target: Target,
    /// Mean submissions per second (Poisson arrivals, not waiting for answers).
    #[arg(long)]
    rate: f64,
    /// Seconds of arrivals.
    #[arg(long)]
    duration: f64,
    /// Seed of the prompts, the mix and the arrival times (the same seed, the same load).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The tenant's bearer token (same as --token; or LONGTAKE_TOKEN).
    #[arg(long)]
    tenant_token: Option<String>,
    /// Video lengths as `SECONDS:WEIGHT,...`.
    #[arg(long, default_value = "1:0.6,2:0.3,5:0.1")]
    lengths: String,
    /// Frame sizes as `WxH:WEIGHT,...` (empty: the model's own size).
    #[arg(long, default_value = "")]
    sizes: String,
    /// Sampler steps of every request (empty: the model's default).
    #[arg(long)]
    steps: Option<u32>,
    /// Model of every request (a name of the coordinator's catalogue; default: its default).
    #[arg(long)]
    model: Option<String>,
    /// Prefix of the idempotency keys (`<prefix>-<seed>-<index>`); change it to run the same
    /// seed again as new renders.
    #[arg(long, default_value = "loadgen")]
    key_prefix: String,
    /// Seconds to wait, after the last arrival, for the accepted renders to finish (they are
    /// read back every second); 0: do not wait.
    #[arg(long, default_value_t = 0.0)]
    drain: f64,
    /// Goodput: a render counts if it was accepted within this many milliseconds...
    #[arg(long, default_value_t = 50.0)]
    slo_submit_ms: f64,
    /// ... and succeeded within this many seconds of its submission.
    #[arg(long, default_value_t = 600.0)]
    slo_e2e_s: f64,
    /// Print the figures as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// A small seeded generator (SplitMix64): the same seed gives the same load on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[(self.next() % xs.len() as u64) as usize]
    }

    fn weighted<'a, T>(&mut self, xs: &'a [(T, f64)]) -> &'a T {
        let total: f64 = xs.iter().map(|(_, w)| w).sum();
        let mut u = self.unit() * total;
        for (x, w) in xs {
            if u < *w {
                return x;
            }
            u -= w;
        }
        &xs[xs.len() - 1].0
    }
}

fn parse_mix<T>(
    flag: &str,
    text: &str,
    item: impl Fn(&str) -> Option<T>,
    form: &str,
) -> Result<Vec<(T, f64)>> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let parsed = part.rsplit_once(':').and_then(|(x, w)| {
            let w: f64 = w.trim().parse().ok()?;
            (w.is_finite() && w > 0.0).then_some((item(x.trim())?, w))
        });
        match parsed {
            Some(p) => out.push(p),
            None => bail!("{flag}: {part:?} is not {form}:WEIGHT (a positive weight)"),
        }
    }
    Ok(out)
}

/// One synthetic request.
struct Request {
    key: String,
    spec: pb::RenderSpec,
}

fn requests(a: &LoadgenArgs) -> Result<Vec<(Duration, Request)>> {
    if !(a.rate.is_finite() && a.rate > 0.0 && a.rate <= 10_000.0) {
        bail!(
            "rate: {} is out of range; allowed: 0 < submissions/s <= 10000",
            a.rate
        );
    }
    if !(a.duration.is_finite() && a.duration > 0.0 && a.duration <= 86_400.0) {
        bail!(
            "duration: {} is out of range; allowed: 0 < seconds <= 86400",
            a.duration
        );
    }
    if !(a.drain.is_finite() && (0.0..=86_400.0).contains(&a.drain)) {
        bail!(
            "drain: {} is out of range; allowed: 0..=86400 seconds",
            a.drain
        );
    }
    let lengths = parse_mix(
        "lengths",
        &a.lengths,
        |x| x.parse::<f64>().ok().filter(|s| s.is_finite() && *s > 0.0),
        "SECONDS",
    )?;
    if lengths.is_empty() {
        bail!("lengths: give at least one SECONDS:WEIGHT");
    }
    let sizes = parse_mix(
        "sizes",
        &a.sizes,
        |x| {
            let (w, h) = x.split_once('x')?;
            Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?))
        },
        "WxH",
    )?;
    let mut rng = Rng(a.seed);
    let mut t = 0.0f64;
    let mut out = Vec::new();
    loop {
        // Exponential gaps: a Poisson process at `rate`.
        t += -(1.0 - rng.unit()).ln() / a.rate;
        if t >= a.duration {
            break;
        }
        let i = out.len();
        let prompt = format!(
            "{} {} {}, {}",
            rng.pick(SUBJECTS),
            rng.pick(ACTIONS),
            rng.pick(SETTINGS),
            rng.pick(STYLES)
        );
        let seconds = *rng.weighted(&lengths);
        let size = if sizes.is_empty() {
            None
        } else {
            Some(*rng.weighted(&sizes))
        };
        let spec = pb::RenderSpec {
            prompt,
            length: Some(pb::render_spec::Length::DurationS(seconds)),
            width: size.map(|s| s.0),
            height: size.map(|s| s.1),
            steps: a.steps,
            seed: Some(rng.next() >> 1),
            model: a.model.clone().unwrap_or_default(),
            ..Default::default()
        };
        out.push((
            Duration::from_secs_f64(t),
            Request {
                key: format!("{}-{}-{i}", a.key_prefix, a.seed),
                spec,
            },
        ));
    }
    Ok(out)
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

#[derive(Default)]
struct Tally {
    accepted: Vec<(String, u64, f64)>,
    rejected: BTreeMap<String, u64>,
}

fn reason(s: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    match s.get_error_details().error_info() {
        Some(info) => info.reason.clone(),
        None => format!("{:?}", s.code()).to_uppercase(),
    }
}

fn seconds(t: &Option<prost_types::Timestamp>) -> Option<f64> {
    t.as_ref()
        .map(|t| t.seconds as f64 + f64::from(t.nanos) / 1e9)
}

pub fn run(a: &LoadgenArgs) -> Result<()> {
    let mut target = a.target.clone();
    if a.tenant_token.is_some() {
        target.token = a.tenant_token.clone();
    }
    let load = requests(a)?;
    let total = load.len();
    let coords = Coordinators::new(&target)?;
    runtime()?.block_on(async move {
        let submit_us = Arc::new(Mutex::new(histogram()));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let start = Instant::now();
        let mut tasks = Vec::with_capacity(total);
        let mut last_progress = Instant::now();
        for (at, req) in load {
            let due = start + at;
            loop {
                let now = Instant::now();
                if now >= due {
                    break;
                }
                tokio::time::sleep((due - now).min(Duration::from_millis(200))).await;
                if last_progress.elapsed() >= Duration::from_secs(1) {
                    last_progress = Instant::now();
                    progress(start, tasks.len(), &done, &tally, &submit_us);
                }
            }
            let mut coords = coords.clone();
            let (submit_us, tally, done) = (submit_us.clone(), tally.clone(), done.clone());
            let seconds_of_video = match req.spec.length {
                Some(pb::render_spec::Length::DurationS(d)) => d,
                _ => 0.0,
            };
            tasks.push(tokio::spawn(async move {
                let clock = Instant::now();
                let r = coords
                    .call(|mut c| {
                        let req = pb::SubmitRenderRequest {
                            spec: Some(req.spec.clone()),
                            idempotency_key: req.key.clone(),
                        };
                        async move { c.submit_render(req).await }
                    })
                    .await;
                let us = clock.elapsed().as_micros().max(1) as u64;
                submit_us
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .saturating_record(us);
                let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
                match r {
                    Ok(resp) => t.accepted.push((resp.render_id, us, seconds_of_video)),
                    Err(s) => *t.rejected.entry(reason(&s)).or_default() += 1,
                }
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let arrivals_s = start.elapsed().as_secs_f64();
        progress(start, total, &done, &tally, &submit_us);
        eprintln!();
        let tally = std::mem::take(&mut *tally.lock().unwrap_or_else(|e| e.into_inner()));
        let submit_us = submit_us.lock().unwrap_or_else(|e| e.into_inner()).clone();

        // Read the accepted renders back until they finish or the drain time runs out.
        let mut coords = coords;
        let drain_until = Instant::now() + Duration::from_secs_f64(a.drain);
        let wanted: HashMap<&str, (u64, f64)> = tally
            .accepted
            .iter()
            .map(|(id, us, s)| (id.as_str(), (*us, *s)))
            .collect();
        let mut renders: HashMap<String, pb::Render> = HashMap::new();
        loop {
            renders.clear();
            let mut token = String::new();
            loop {
                let page = coords
                    .call(|mut c| {
                        let req = pb::ListRendersRequest {
                            page_size: 1000,
                            page_token: token.clone(),
                            states: Vec::new(),
                        };
                        async move { c.list_renders(req).await }
                    })
                    .await
                    .map_err(|s| anyhow::anyhow!("listing renders: {}", s.message()))?;
                for r in page.renders {
                    if wanted.contains_key(r.id.as_str()) {
                        renders.insert(r.id.clone(), r);
                    }
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            let open = renders
                .values()
                .filter(|r| !crate::cluster::terminal(r.state))
                .count();
            if open == 0 || Instant::now() >= drain_until {
                break;
            }
            eprint!(
                "\rdraining: {open} of {} accepted renders not finished   ",
                wanted.len()
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let wall_s = start.elapsed().as_secs_f64();
        let report = figures(
            a, total, &tally, &submit_us, &renders, &wanted, arrivals_s, wall_s,
        );
        if a.json {
            out!("{}", report);
        } else {
            print_table(&report);
        }
        Ok(())
    })
}

fn progress(
    start: Instant,
    submitted: usize,
    done: &std::sync::atomic::AtomicUsize,
    tally: &Mutex<Tally>,
    submit_us: &Mutex<Histogram<u64>>,
) {
    let (accepted, rejected) = {
        let t = tally.lock().unwrap_or_else(|e| e.into_inner());
        (t.accepted.len(), t.rejected.values().sum::<u64>())
    };
    let p99 = submit_us
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .value_at_quantile(0.99) as f64
        / 1000.0;
    let answered = done.load(std::sync::atomic::Ordering::Relaxed);
    eprint!(
        "\r{:6.1} s: {submitted} submitted, {accepted} accepted, {rejected} rejected, {} in flight, submit p99 {p99:.1} ms   ",
        start.elapsed().as_secs_f64(),
        submitted.saturating_sub(answered)
    );
}

/// p50, p95, p99, max and count of a histogram of microseconds, in units of `unit_us`
/// microseconds (1000: ms, 1e6: s), to 3 decimals.
fn quantiles(h: &Histogram<u64>, unit_us: f64) -> serde_json::Value {
    if h.is_empty() {
        return json!(null);
    }
    let r = |us: u64| (us as f64 / unit_us * 1000.0).round() / 1000.0;
    json!({
        "p50": r(h.value_at_quantile(0.5)),
        "p95": r(h.value_at_quantile(0.95)),
        "p99": r(h.value_at_quantile(0.99)),
        "max": r(h.max()),
        "count": h.len(),
    })
}

#[allow(clippy::too_many_arguments)]
fn figures(
    a: &LoadgenArgs,
    submitted: usize,
    tally: &Tally,
    submit_us: &Histogram<u64>,
    renders: &HashMap<String, pb::Render>,
    wanted: &HashMap<&str, (u64, f64)>,
    arrivals_s: f64,
    wall_s: f64,
) -> serde_json::Value {
    let mut queue_us = histogram();
    let mut e2e_us = histogram();
    let mut states: BTreeMap<String, u64> = BTreeMap::new();
    let mut video_s = 0.0;
    let mut good = 0u64;
    for r in renders.values() {
        *states
            .entry(crate::cluster::state_name(r.state))
            .or_default() += 1;
        let created = seconds(&r.created_at);
        if let (Some(c), Some(s)) = (created, seconds(&r.started_at)) {
            queue_us.saturating_record(((s - c).max(0.0) * 1e6) as u64);
        }
        if r.state == pb::RenderState::Succeeded as i32
            && let (Some(c), Some(f)) = (created, seconds(&r.finished_at))
        {
            let e2e = (f - c).max(0.0);
            e2e_us.saturating_record((e2e * 1e6) as u64);
            let (us, video) = wanted
                .get(r.id.as_str())
                .copied()
                .unwrap_or((u64::MAX, 0.0));
            video_s += video;
            if us as f64 <= a.slo_submit_ms * 1000.0 && e2e <= a.slo_e2e_s {
                good += 1;
            }
        }
    }
    json!({
        "rate": a.rate,
        "duration_s": a.duration,
        "seed": a.seed,
        "submitted": submitted,
        "accepted": tally.accepted.len(),
        "rejected": tally.rejected,
        "found_afterwards": renders.len(),
        "states": states,
        "submit_ms": quantiles(submit_us, 1e3),
        "queue_wait_s": quantiles(&queue_us, 1e6),
        "end_to_end_s": quantiles(&e2e_us, 1e6),
        "arrivals_s": arrivals_s,
        "wall_s": wall_s,
        "video_s_per_wall_s": video_s / wall_s.max(1e-9),
        "goodput": {
            "slo_submit_ms": a.slo_submit_ms,
            "slo_e2e_s": a.slo_e2e_s,
            "renders": good,
            "per_s": good as f64 / wall_s.max(1e-9),
            "fraction_of_submitted": if submitted == 0 { 0.0 } else { good as f64 / submitted as f64 },
        },
    })
}

fn print_table(r: &serde_json::Value) {
    let q = |v: &serde_json::Value, unit: &str| -> String {
        if v.is_null() {
            return "-".into();
        }
        format!(
            "p50 {} / p95 {} / p99 {} / max {} {unit} (n = {})",
            v["p50"], v["p95"], v["p99"], v["max"], v["count"]
        )
    };
    let rejected = r["rejected"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "none".into());
    out!("| figure | value |");
    out!("|---|---|");
    out!(
        "| load | {} submissions/s for {} s, seed {} |",
        r["rate"],
        r["duration_s"],
        r["seed"]
    );
    out!("| submitted | {} |", r["submitted"]);
    out!("| accepted | {} |", r["accepted"]);
    out!("| rejected | {rejected} |");
    out!(
        "| found afterwards | {} ({}) |",
        r["found_afterwards"],
        r["states"]
    );
    out!("| submit latency | {} |", q(&r["submit_ms"], "ms"));
    out!("| queue wait | {} |", q(&r["queue_wait_s"], "s"));
    out!("| end to end | {} |", q(&r["end_to_end_s"], "s"));
    out!(
        "| video-seconds per wall-second | {:.3} |",
        r["video_s_per_wall_s"].as_f64().unwrap_or(0.0)
    );
    out!(
        "| goodput | {} renders ({:.2}/s, {:.1} % of submitted) within {} ms to accept and {} s end to end |",
        r["goodput"]["renders"],
        r["goodput"]["per_s"].as_f64().unwrap_or(0.0),
        100.0
            * r["goodput"]["fraction_of_submitted"]
                .as_f64()
                .unwrap_or(0.0),
        r["goodput"]["slo_submit_ms"],
        r["goodput"]["slo_e2e_s"]
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> LoadgenArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            a: LoadgenArgs,
        }
        let mut all = vec!["x", "--coordinator", "127.0.0.1:1"];
        all.extend_from_slice(extra);
        Cli::try_parse_from(all).unwrap().a
    }

    #[test]
    fn the_seed_decides_the_load() {
        let a = args(&["--rate", "100", "--duration", "10", "--seed", "7"]);
        let x = requests(&a).unwrap();
        let y = requests(&a).unwrap();
        assert_eq!(x.len(), y.len());
        for ((ta, ra), (tb, rb)) in x.iter().zip(&y) {
            assert_eq!(ta, tb);
            assert_eq!(ra.spec, rb.spec);
            assert_eq!(ra.key, rb.key);
        }
        // About rate x duration arrivals (Poisson: 1000 ± 3 sigma = 95).
        assert!((905..=1095).contains(&x.len()), "{}", x.len());
        let other = requests(&args(&["--rate", "100", "--duration", "10", "--seed", "8"])).unwrap();
        assert_ne!(x[0].1.spec, other[0].1.spec);
        assert!(x.windows(2).all(|w| w[0].0 <= w[1].0));
    }

    #[test]
    fn bad_mixes_name_the_flag() {
        for (flag, bad) in [
            ("--lengths", "1:x"),
            ("--lengths", "0:1"),
            ("--sizes", "64:1"),
        ] {
            let e = requests(&args(&["--rate", "1", "--duration", "1", flag, bad]))
                .err()
                .unwrap();
            assert!(e.to_string().starts_with(&flag[2..]), "{e}");
        }
        let e = requests(&args(&["--rate", "0", "--duration", "1"]))
            .err()
            .unwrap();
        assert!(e.to_string().starts_with("rate:"), "{e}");
    }
}
