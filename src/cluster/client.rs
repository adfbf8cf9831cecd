//! The client commands: `submit`, `get`, `watch`, `cancel`, `delete` and `list`, each calling
//! the coordinators through [`Coordinators`].

use std::future::Future;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Args;
use longtake_proto::AuthedChannel;
use longtake_proto::v1 as pb;
use longtake_proto::v1::render_service_client::RenderServiceClient;
use serde_json::json;

use super::{Coordinators, Target, retryable, runtime};
use crate::render::{ProgressDisplay, RequestArgs};

#[derive(Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    request: RequestArgs,
    /// Among queued renders a higher priority starts first (then the older one).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i32,
    /// Makes the submission safe to repeat: the same key and request give the same render
    /// (default: a fresh key, so that the command's own retries never submit twice).
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Follow the render until it ends; exit 0 only if it succeeded, printing its output
    /// location.
    #[arg(long)]
    wait: bool,
    /// Print the render as JSON (with --wait: the final state) instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct IdArgs {
    #[command(flatten)]
    target: Target,
    /// The render's id (the first line `submit` prints).
    render_id: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    target: Target,
    /// Only renders in these states (comma-separated): queued, planning, encoding_text,
    /// denoising, decoding, succeeded, failed, cancelled.
    #[arg(long, value_delimiter = ',')]
    state: Vec<String>,
    /// Print JSON instead of text: an array of renders, or with --page-size an object
    /// `{"renders": [...], "next_page_token": "..."}`.
    #[arg(long)]
    json: bool,
    /// Print one page of at most N renders (1..=1000), newest first, instead of every render;
    /// the token for the next page follows (text: a last line `next page: TOKEN`).
    #[arg(long)]
    page_size: Option<u32>,
    /// Continue after the page that returned TOKEN (tokens stay valid on any replica).
    #[arg(long, requires = "page_size")]
    page_token: Option<String>,
}

/// A coordinator's error for people: the message, then the machine-readable reason and whether
/// a retry can help (from the rich error details, when the server sent them).
fn status_error(s: tonic::Status) -> anyhow::Error {
    use tonic_types::StatusExt;
    match s.get_error_details().error_info() {
        Some(info) => {
            let retry = if info.metadata.get("retryable").is_some_and(|r| r == "true") {
                "retrying may help"
            } else {
                "retrying will not help"
            };
            anyhow::anyhow!("{} ({}; {retry})", s.message(), info.reason)
        }
        None => anyhow::anyhow!("{} ({:?})", s.message(), s.code()),
    }
}

pub(crate) fn state_name(state: i32) -> String {
    pb::RenderState::try_from(state)
        .unwrap_or(pb::RenderState::Unspecified)
        .as_str_name()
        .trim_start_matches("RENDER_STATE_")
        .to_lowercase()
}

fn parse_state(s: &str) -> Result<pb::RenderState> {
    let name = format!("RENDER_STATE_{}", s.trim().to_uppercase());
    match pb::RenderState::from_str_name(&name) {
        Some(st) if st != pb::RenderState::Unspecified => Ok(st),
        _ => bail!(
            "state: {s:?} is not a render state; allowed: queued, planning, encoding_text, \
             denoising, decoding, succeeded, failed, cancelled"
        ),
    }
}

fn rfc3339(t: &Option<prost_types::Timestamp>) -> serde_json::Value {
    match t {
        Some(t) => json!(format!("{}.{:03}", t.seconds, t.nanos / 1_000_000)),
        None => serde_json::Value::Null,
    }
}

/// A render as JSON for scripts (the proto's field names; timestamps as Unix seconds).
fn render_json(r: &pb::Render) -> serde_json::Value {
    let spec = r.spec.clone().unwrap_or_default();
    let p = r.progress.clone().unwrap_or_default();
    let length = match spec.length {
        Some(pb::render_spec::Length::DurationS(d)) => json!({ "duration_s": d }),
        Some(pb::render_spec::Length::NumFrames(n)) => json!({ "num_frames": n }),
        None => json!({}),
    };
    json!({
        "id": r.id,
        "state": state_name(r.state),
        "error": r.error,
        "output_uri": r.output_uri,
        "idempotency_key": r.idempotency_key,
        "spec": {
            "prompt": spec.prompt,
            "negative_prompt": spec.negative_prompt,
            "length": length,
            "fps": spec.fps,
            "width": spec.width,
            "height": spec.height,
            "seed": spec.seed,
            "steps": spec.steps,
            "guidance": spec.guidance,
            "flow_shift": spec.flow_shift,
            "model": spec.model,
            "stitching": pb::Stitching::try_from(spec.stitching)
                .unwrap_or(pb::Stitching::Unspecified)
                .as_str_name()
                .trim_start_matches("STITCHING_")
                .to_lowercase(),
            "window": spec.window,
            "overlap": spec.overlap,
            "noise_layout": pb::NoiseLayout::try_from(spec.noise_layout)
                .unwrap_or(pb::NoiseLayout::Unspecified)
                .as_str_name()
                .trim_start_matches("NOISE_LAYOUT_")
                .to_lowercase(),
            "hold_noise": spec.hold_noise,
            "hold_release": spec.hold_release,
            "output": spec.output,
            "png_frames": spec.png_frames,
            "priority": spec.priority,
            "has_initial_noise": r.has_initial_noise,
        },
        "plan": r.plan.as_ref().map(|p| json!({
            "num_frames": p.num_frames,
            "latent_frames": p.latent_frames,
            "windows": p.windows.iter().map(|w| [w.start, w.len]).collect::<Vec<_>>(),
        })),
        "progress": {
            "phase": state_name(p.phase),
            "window_steps_done": p.window_steps_done,
            "window_steps_total": p.window_steps_total,
            "frames_done": p.frames_done,
            "frames_total": p.frames_total,
            "message": p.message,
        },
        "created_at": rfc3339(&r.created_at),
        "started_at": rfc3339(&r.started_at),
        "finished_at": rfc3339(&r.finished_at),
    })
}

fn print_render(r: &pb::Render, as_json: bool) {
    if as_json {
        out!("{}", render_json(r));
        return;
    }
    let p = r.progress.clone().unwrap_or_default();
    out!("{}", r.id);
    out!("state:    {}", state_name(r.state));
    out!(
        "prompt:   {}",
        r.spec.as_ref().map(|s| s.prompt.as_str()).unwrap_or("")
    );
    out!(
        "progress: {}/{} window-steps, {}/{} frames",
        p.window_steps_done,
        p.window_steps_total,
        p.frames_done,
        p.frames_total
    );
    if !p.message.is_empty() {
        out!("message:  {}", p.message);
    }
    if !r.error.is_empty() {
        out!("error:    {}", r.error);
    }
    out!("output:   {}", r.output_uri);
}

pub(crate) fn terminal(state: i32) -> bool {
    matches!(
        pb::RenderState::try_from(state),
        Ok(pb::RenderState::Succeeded | pb::RenderState::Failed | pb::RenderState::Cancelled)
    )
}

/// Follow render `id` until it ends, across dropped streams and coordinator failovers; each
/// snapshot goes to `on_event`. Returns the final state.
async fn follow(
    coords: &mut Coordinators,
    id: &str,
    mut on_event: impl FnMut(&pb::Render),
) -> Result<pb::Render> {
    let mut last: Option<pb::Render> = None;
    let mut after = 0u64;
    loop {
        let mut stream = coords
            .call(|mut c| {
                let req = pb::WatchRenderRequest {
                    render_id: id.to_string(),
                    after_sequence: after,
                };
                async move { c.watch_render(req).await }
            })
            .await
            .map_err(status_error)?;
        loop {
            match stream.message().await {
                Ok(Some(ev)) => {
                    after = after.max(ev.sequence);
                    if let Some(r) = ev.render {
                        on_event(&r);
                        let done = terminal(r.state);
                        last = Some(r);
                        if done {
                            return Ok(last.expect("just set"));
                        }
                    }
                }
                Ok(None) => break,
                Err(s) if retryable(&s) => {
                    tracing::debug!(error = %s.message(), "watch interrupted; resuming");
                    break;
                }
                Err(s) => return Err(status_error(s)),
            }
        }
        if let Some(r) = &last
            && terminal(r.state)
        {
            return Ok(r.clone());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn submit(a: &SubmitArgs) -> Result<()> {
    let mut spec = a.request.spec(false)?;
    spec.priority = a.priority;
    let key = a
        .idempotency_key
        .clone()
        .unwrap_or_else(|| format!("cli-{}", uuid_like()));
    let mut coords = Coordinators::new(&a.target)?;
    runtime()?.block_on(async {
        let resp = coords
            .call(|mut c| {
                let req = pb::SubmitRenderRequest {
                    spec: Some(spec.clone()),
                    idempotency_key: key.clone(),
                };
                async move { c.submit_render(req).await }
            })
            .await
            .map_err(status_error)?;
        let id = resp.render_id;
        if !a.json || !a.wait {
            if a.json {
                out!("{}", json!({ "render_id": id, "created": resp.created }));
            } else {
                out!("{id}");
            }
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
        if !a.wait {
            return Ok(());
        }
        let mut display = ProgressDisplay::new();
        let last = follow(&mut coords, &id, |r| display.show(r)).await?;
        display.finish();
        if a.json {
            out!("{}", render_json(&last));
        }
        if last.state != pb::RenderState::Succeeded as i32 {
            bail!("render {id} {}: {}", state_name(last.state), last.error);
        }
        if !a.json {
            out!("{}", last.output_uri);
        }
        Ok(())
    })
}

fn uuid_like() -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

pub fn get(a: &IdArgs) -> Result<()> {
    let r = by_id(a, |mut c, render_id| async move {
        c.get_render(pb::GetRenderRequest { render_id }).await
    })?;
    print_render(&r, a.json);
    Ok(())
}

pub fn watch(a: &IdArgs) -> Result<()> {
    let mut coords = Coordinators::new(&a.target)?;
    runtime()?.block_on(async {
        let mut display = ProgressDisplay::new();
        let last = follow(&mut coords, &a.render_id, |r| {
            if a.json {
                out!("{}", render_json(r));
            } else {
                display.show(r);
            }
        })
        .await?;
        display.finish();
        if !a.json {
            print_render(&last, false);
        }
        if last.state != pb::RenderState::Succeeded as i32 {
            bail!(
                "render {} {}: {}",
                last.id,
                state_name(last.state),
                last.error
            );
        }
        Ok(())
    })
}

pub fn cancel(a: &IdArgs) -> Result<()> {
    let r = by_id(a, |mut c, render_id| async move {
        c.cancel_render(pb::CancelRenderRequest { render_id }).await
    })?;
    print_render(&r, a.json);
    Ok(())
}

pub fn delete(a: &IdArgs) -> Result<()> {
    let r = by_id(a, |mut c, render_id| async move {
        c.delete_render(pb::DeleteRenderRequest { render_id }).await
    })?;
    if a.json {
        out!(
            "{}",
            json!({"render_id": a.render_id, "objects_deleted": r.objects_deleted})
        );
    } else {
        out!("deleted {} ({} objects)", a.render_id, r.objects_deleted);
    }
    Ok(())
}

/// One call about the render `a` names, through whichever listed coordinator leads (retried
/// on the next one as [`Coordinators::call`] does); `f` gets a client and the render id.
fn by_id<T, F, Fut>(a: &IdArgs, f: F) -> Result<T>
where
    F: Fn(RenderServiceClient<AuthedChannel>, String) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut coords = Coordinators::new(&a.target)?;
    runtime()?.block_on(async {
        coords
            .call(|c| f(c, a.render_id.clone()))
            .await
            .map_err(status_error)
    })
}

pub fn list(a: &ListArgs) -> Result<()> {
    let states: Vec<i32> = a
        .state
        .iter()
        .map(|s| parse_state(s).map(|st| st as i32))
        .collect::<Result<_>>()?;
    let mut coords = Coordinators::new(&a.target)?;
    runtime()?.block_on(async {
        let mut all = Vec::new();
        let mut token = a.page_token.clone().unwrap_or_default();
        let next = loop {
            let page = coords
                .call(|mut c| {
                    let req = pb::ListRendersRequest {
                        page_size: a.page_size.unwrap_or(500),
                        page_token: token.clone(),
                        states: states.clone(),
                    };
                    async move { c.list_renders(req).await }
                })
                .await
                .map_err(status_error)?;
            all.extend(page.renders);
            if page.next_page_token.is_empty() || a.page_size.is_some() {
                break page.next_page_token;
            }
            token = page.next_page_token;
        };
        if a.json {
            let v: Vec<serde_json::Value> = all.iter().map(render_json).collect();
            if a.page_size.is_some() {
                out!(
                    "{}",
                    serde_json::json!({"renders": v, "next_page_token": next})
                );
            } else {
                out!("{}", serde_json::Value::Array(v));
            }
        } else {
            for r in &all {
                let p = r.progress.clone().unwrap_or_default();
                out!(
                    "{}  {:<13} {:>6}/{:<6} {}",
                    r.id,
                    state_name(r.state),
                    p.window_steps_done,
                    p.window_steps_total,
                    r.spec.as_ref().map(|s| s.prompt.as_str()).unwrap_or("")
                );
            }
            if a.page_size.is_some() && !next.is_empty() {
                out!("next page: {next}");
            }
        }
        Ok(())
    })
}
