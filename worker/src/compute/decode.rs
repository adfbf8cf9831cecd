//! A decode task: the windows' final latents fused into one sequence (or taken whole), decoded
//! by the VAE as a stream, and written as the video, the latents and optionally PNG frames.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use longtake_model::io::read_f32_bytes;
use longtake_model::pipeline::PipelineBackend;
use longtake_model::window::{self, Part};
use longtake_proto::v1 as pb;
use object_store::ObjectStore;
use object_store::path::Path as StorePath;

use super::{
    CANCELLED, Compute, TaskResult, f32_from_le, geometry, object_key, open_store, window_specs,
};
use crate::media::{Mp4Writer, png, to_rgb8};
use crate::runtime::flag;

impl<B: PipelineBackend> Compute<B> {
    /// Read the windows' final latents named by a decode task and fuse them into the whole
    /// sequence with the plan's weights (the function that fuses halos): a safetensors file with
    /// `latents` [1, C, T, h, w].
    fn fuse_windows(
        &self,
        t: &pb::DecodeTask,
        store: &dyn ObjectStore,
        prefix: &StorePath,
    ) -> TaskResult<Vec<u8>> {
        let shape = t
            .latent_shape
            .as_ref()
            .ok_or("decode task without a latent shape")?;
        let plan_pb = t.plan.as_ref().ok_or("decode task without a plan")?;
        let geo = geometry(shape);
        let plan = window_specs(plan_pb);
        if t.window_keys.len() != plan.len() {
            return Err(format!(
                "{} window keys for a plan of {} windows",
                t.window_keys.len(),
                plan.len()
            ));
        }
        let mut parts = Vec::new();
        for (i, (key, w)) in t.window_keys.iter().zip(&plan).enumerate() {
            let bytes = self
                .read_object(store, &object_key(prefix, key))
                .map_err(|e| format!("reading {key} under {}: {e}", t.output_uri))?;
            let data = f32_from_le(&bytes);
            let want = geo.channels * w.len * geo.height * geo.width;
            if data.len() != want || bytes.len() % 4 != 0 {
                return Err(format!(
                    "{key}: {} bytes; window {i} needs {want} f32 values",
                    bytes.len()
                ));
            }
            parts.push(Part {
                window: i,
                start: w.start,
                len: w.len,
                data,
            });
        }
        let refs: Vec<&Part> = parts.iter().collect();
        let fused = window::fuse(&geo, &plan, 0..geo.frames, &refs).map_err(|e| e.to_string())?;
        let dims = [1, geo.channels, geo.frames, geo.height, geo.width];
        longtake_model::io::f32_safetensors(&[("latents", &dims, &fused)], Default::default())
            .map_err(|e| e.to_string())
    }

    pub(super) fn decode(
        &mut self,
        task_id: &str,
        t: &pb::DecodeTask,
        timings: &mut HashMap<String, f64>,
    ) -> TaskResult<pb::DecodeResult> {
        let spec = t.spec.as_ref().ok_or("decode task without a spec")?;
        let pipe = self.pipeline(&spec.model)?;
        let cancel = flag(&self.cancelled, &t.render_id, t.epoch);
        let cancel_all = Arc::clone(&self.cancel_all);
        let backend = self.backend.clone();
        let (store, prefix) = open_store(&t.output_uri)?;
        // Inline latents are written as `latents.safetensors` here; a key names the file the
        // coordinator has written already.
        let (latents_file, inline) = match &t.latents {
            Some(pb::decode_task::Latents::LatentsSafetensors(b)) => (b.clone(), true),
            Some(pb::decode_task::Latents::LatentsKey(key)) => {
                let path = object_key(&prefix, key);
                let bytes = self
                    .read_object(&*store, &path)
                    .map_err(|e| format!("reading {key} under {}: {e}", t.output_uri))?;
                (bytes, false)
            }
            None if !t.window_keys.is_empty() => {
                let clock = Instant::now();
                let file = self.fuse_windows(t, &*store, &prefix)?;
                let path = object_key(&prefix, "latents.safetensors");
                // Written once: a decode sent again finds it there (the same bytes).
                self.create_object(&*store, &path, file.clone())
                    .map_err(|e| format!("writing latents.safetensors: {e}"))?;
                timings.insert("fuse".into(), clock.elapsed().as_secs_f64());
                (file, false)
            }
            None => return Err("decode task without latents".into()),
        };
        let (shape, latents) =
            read_f32_bytes(&latents_file, "latents").map_err(|e| e.to_string())?;
        let [_, c, tt, h, w] = <[usize; 5]>::try_from(shape.as_slice())
            .map_err(|_| format!("latents shape {shape:?}"))?;
        // Every output is created once: a decode sent again (its first worker lost) or a stale
        // decoder finds the same bytes there and leaves them; a finished render never changes.
        let put = |name: &str, bytes: Vec<u8>| -> TaskResult<String> {
            let key = object_key(&prefix, name);
            self.create_object(&*store, &key, bytes)
                .map_err(|e| format!("writing {name} to {}: {e}", t.output_uri))?;
            Ok(name.to_string())
        };
        let mut objects = vec![if inline {
            put("latents.safetensors", latents_file.clone())?
        } else {
            "latents.safetensors".to_string()
        }];
        let clock = Instant::now();
        let z = pipe.denormalize(&latents, tt * h * w);
        let sf = pipe.dir.vae.spatial_factor();
        let (ph, pw) = (h * sf, w * sf);
        let fps = spec.fps.unwrap_or(16);
        let mut mp4 = Mp4Writer::new(pw, ph, fps).map_err(|e| e.to_string())?;
        let mut frame_no = 0usize;
        let mut encode_s = 0.0;
        let total = pipe.dir.vae.frames_for(tt);
        pipe.vae()
            .decode_stream(&z, [c, tt, h, w], 1, |px| {
                if cancel.load(Ordering::SeqCst) || cancel_all.load(Ordering::SeqCst) {
                    return Err(longtake_model::Error::Cancelled("decode".into()));
                }
                let data = backend.download(&px)?;
                let e = Instant::now();
                let plane = 3 * ph * pw;
                for f in data.chunks_exact(plane) {
                    let rgb = to_rgb8(f, ph, pw);
                    mp4.push_rgb(&rgb)
                        .map_err(|e| longtake_model::Error::external("video", e.to_string()))?;
                    if spec.png_frames {
                        let bytes = png(&rgb, pw, ph)
                            .map_err(|e| longtake_model::Error::external("png", e.to_string()))?;
                        objects.push(
                            put(&format!("frames/{frame_no:06}.png"), bytes)
                                .map_err(|e| longtake_model::Error::external("png", e))?,
                        );
                    }
                    frame_no += 1;
                }
                encode_s += e.elapsed().as_secs_f64();
                self.progress(
                    (task_id, &t.render_id, t.epoch),
                    pb::RenderState::Decoding,
                    0,
                    frame_no as u64,
                    format!("{frame_no}/{total} frames"),
                );
                Ok(())
            })
            .map_err(|e| match e {
                longtake_model::Error::Cancelled(_) => CANCELLED.to_string(),
                e => e.to_string(),
            })?;
        let video = mp4.finish().map_err(|e| e.to_string())?;
        timings.insert("decode".into(), clock.elapsed().as_secs_f64() - encode_s);
        timings.insert("video_encode".into(), encode_s);
        let clock = Instant::now();
        objects.push(put("video.mp4", video)?);
        timings.insert("write".into(), clock.elapsed().as_secs_f64());
        Ok(pb::DecodeResult {
            objects,
            frame_count: frame_no as u32,
        })
    }
}
