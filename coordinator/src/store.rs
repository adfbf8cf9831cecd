//! Job state storage: the [`JobStore`] trait (a small revisioned key-value interface that etcd
//! and an embedded map can both provide) and the versioned JSON job record kept in it.
//!
//! Keys: `jobs/<render id>` holds a [`JobRecord`]. Bulk data (a render's `initial_noise`, its
//! checkpoints and latents) lives in the object store under the render's output, never here. The coordinator keeps live state in memory and writes every
//! state change through to the store, in order.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::validate::ValidSpec;

/// A stored value and the store-wide revision of its last write (like etcd's `mod_revision`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub revision: u64,
    pub value: Vec<u8>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("revision conflict on {key}: expected {expected:?}, found {found:?} (None: no value)")]
    Conflict {
        key: String,
        expected: Option<u64>,
        found: Option<u64>,
    },
    /// The write was refused because this coordinator no longer leads.
    #[error("fenced off: {0}")]
    Fenced(String),
    /// The store refused the request itself (too large, malformed); retrying cannot help.
    #[error("job store refused the request: {0}")]
    Rejected(String),
    #[error("job store unavailable: {0}")]
    Unavailable(String),
    #[error("corrupt record {key}: {reason}")]
    Corrupt { key: String, reason: String },
}

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A revisioned key-value store. Revisions increase store-wide with every write.
pub trait JobStore: Send + Sync + 'static {
    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Versioned>>;
    /// Write unconditionally; returns the new revision.
    fn put<'a>(&'a self, key: &'a str, value: Vec<u8>) -> StoreFuture<'a, u64>;
    /// Write only if the key's current revision is `expected` (`None`: the key must not exist);
    /// otherwise [`StoreError::Conflict`]. Returns the new revision.
    fn compare_and_set<'a>(
        &'a self,
        key: &'a str,
        expected: Option<u64>,
        value: Vec<u8>,
    ) -> StoreFuture<'a, u64>;
    /// Every key starting with `prefix`, in key order.
    fn list<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, Vec<(String, Versioned)>>;
    /// Remove the key (nothing happens when it does not exist).
    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()>;

    /// Apply several unconditional writes (`None`: delete) to distinct keys; all or none where
    /// the store can (etcd: one transaction, fenced like every write). At most [`MAX_BATCH`].
    fn write_batch<'a>(&'a self, ops: &'a [(String, Option<Vec<u8>>)]) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            for (key, value) in ops {
                match value {
                    Some(v) => {
                        self.put(key, v.clone()).await?;
                    }
                    None => self.delete(key).await?,
                }
            }
            Ok(())
        })
    }
}

/// The most writes [`JobStore::write_batch`] takes at once (etcd refuses transactions of more
/// than 128 operations by default).
pub const MAX_BATCH: usize = 100;

/// The embedded store: a map in memory, for a single machine and for tests.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<MemoryInner>,
}

#[derive(Debug, Default)]
struct MemoryInner {
    revision: u64,
    entries: BTreeMap<String, Versioned>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn write(
        &self,
        key: &str,
        expected: Option<Option<u64>>,
        value: Vec<u8>,
    ) -> Result<u64, StoreError> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(expected) = expected {
            let found = inner.entries.get(key).map(|v| v.revision);
            if found != expected {
                return Err(StoreError::Conflict {
                    key: key.to_string(),
                    expected,
                    found,
                });
            }
        }
        inner.revision += 1;
        let revision = inner.revision;
        inner
            .entries
            .insert(key.to_string(), Versioned { revision, value });
        Ok(revision)
    }
}

impl JobStore for MemoryStore {
    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Versioned>> {
        let found = self
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entries
            .get(key)
            .cloned();
        Box::pin(async move { Ok(found) })
    }

    fn put<'a>(&'a self, key: &'a str, value: Vec<u8>) -> StoreFuture<'a, u64> {
        let result = self.write(key, None, value);
        Box::pin(async move { result })
    }

    fn compare_and_set<'a>(
        &'a self,
        key: &'a str,
        expected: Option<u64>,
        value: Vec<u8>,
    ) -> StoreFuture<'a, u64> {
        let result = self.write(key, Some(expected), value);
        Box::pin(async move { result })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, Vec<(String, Versioned)>> {
        let found = self
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entries
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Box::pin(async move { Ok(found) })
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.entries.remove(key).is_some() {
            inner.revision += 1;
        }
        Box::pin(async move { Ok(()) })
    }
}

/// The conformance suite every [`JobStore`] implementation must pass, on an empty store (keys
/// `jobs/a`, `jobs/b`, `noise/a` and `jobsx`). Panics on the first violation.
pub async fn conformance(store: &dyn JobStore) {
    assert_eq!(store.get("jobs/a").await.unwrap(), None);
    let r1 = store.put("jobs/a", b"1".to_vec()).await.unwrap();
    let got = store.get("jobs/a").await.unwrap().unwrap();
    assert_eq!(
        got,
        Versioned {
            revision: r1,
            value: b"1".to_vec()
        }
    );

    // Create-only fails on an existing key, succeeds on a new one.
    assert!(matches!(
        store.compare_and_set("jobs/a", None, b"x".to_vec()).await,
        Err(StoreError::Conflict { found: Some(_), .. })
    ));
    let r2 = store
        .compare_and_set("jobs/b", None, b"2".to_vec())
        .await
        .unwrap();
    assert!(r2 > r1);

    // Update with the current revision succeeds; with a stale one it fails.
    let r3 = store
        .compare_and_set("jobs/a", Some(r1), b"3".to_vec())
        .await
        .unwrap();
    assert!(r3 > r2);
    assert!(matches!(
        store
            .compare_and_set("jobs/a", Some(r1), b"4".to_vec())
            .await,
        Err(StoreError::Conflict { .. })
    ));
    assert_eq!(store.get("jobs/a").await.unwrap().unwrap().value, b"3");

    store.put("noise/a", b"n".to_vec()).await.unwrap();
    store.put("jobsx", b"n".to_vec()).await.unwrap();
    let listed: Vec<String> = store
        .list("jobs/")
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(listed, ["jobs/a", "jobs/b"]);

    // Delete removes one key; deleting a missing key is not an error; a deleted key can be
    // created again.
    store.delete("jobs/a").await.unwrap();
    store.delete("jobs/a").await.unwrap();
    assert_eq!(store.get("jobs/a").await.unwrap(), None);
    let listed: Vec<String> = store
        .list("jobs/")
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(listed, ["jobs/b"]);
    store
        .compare_and_set("jobs/a", None, b"5".to_vec())
        .await
        .unwrap();

    // A batch puts and deletes together.
    store
        .write_batch(&[
            ("jobs/c".to_string(), Some(b"6".to_vec())),
            ("jobs/b".to_string(), None),
            ("jobs/d".to_string(), Some(b"7".to_vec())),
        ])
        .await
        .unwrap();
    let listed: Vec<(String, Vec<u8>)> = store
        .list("jobs/")
        .await
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.value))
        .collect();
    assert_eq!(
        listed,
        [
            ("jobs/a".to_string(), b"5".to_vec()),
            ("jobs/c".to_string(), b"6".to_vec()),
            ("jobs/d".to_string(), b"7".to_vec())
        ]
    );
}

/// The life of a render (the proto `RenderState` without `UNSPECIFIED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Planning,
    EncodingText,
    Denoising,
    Decoding,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    /// The state's name as users see it (`denoising`, `succeeded`, ...).
    pub fn name(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Planning => "planning",
            JobState::EncodingText => "encoding_text",
            JobState::Denoising => "denoising",
            JobState::Decoding => "decoding",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn to_proto(self) -> longtake_proto::v1::RenderState {
        use longtake_proto::v1::RenderState as S;
        match self {
            JobState::Queued => S::Queued,
            JobState::Planning => S::Planning,
            JobState::EncodingText => S::EncodingText,
            JobState::Denoising => S::Denoising,
            JobState::Decoding => S::Decoding,
            JobState::Succeeded => S::Succeeded,
            JobState::Failed => S::Failed,
            JobState::Cancelled => S::Cancelled,
        }
    }

    pub fn from_proto(state: longtake_proto::v1::RenderState) -> Option<Self> {
        use longtake_proto::v1::RenderState as S;
        Some(match state {
            S::Unspecified => return None,
            S::Queued => JobState::Queued,
            S::Planning => JobState::Planning,
            S::EncodingText => JobState::EncodingText,
            S::Denoising => JobState::Denoising,
            S::Decoding => JobState::Decoding,
            S::Succeeded => JobState::Succeeded,
            S::Failed => JobState::Failed,
            S::Cancelled => JobState::Cancelled,
        })
    }
}

/// The window plan as recorded for a job: enough to report it, not the weights.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanRecord {
    pub num_frames: u32,
    pub latent_frames: u32,
    /// `[start, len]` per window, in latent frames.
    pub windows: Vec<[u32; 2]>,
}

/// One render as stored under `jobs/<id>` (format version 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    /// The tenant that submitted the render; empty on an open API (and in records written
    /// before tenants existed).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tenant: String,
    pub spec: ValidSpec,
    /// Empty when the client gave none.
    pub idempotency_key: String,
    /// A hash of the request's spec as sent (before defaults): a repeat with the same key must
    /// match it.
    pub request_fingerprint: String,
    pub state: JobState,
    /// Why the render failed; empty otherwise.
    pub error: String,
    /// `<output>/<jobs prefix>/<id>`: where the render's objects are written.
    pub output_uri: String,
    pub plan: Option<PlanRecord>,
    pub created_at_ms: u64,
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
    /// How many times the render was rolled back and started again (a worker lost, a new
    /// leader). Absent in records written before it existed: 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempts: u32,
    /// The last committed checkpoint (every window's state after the same step), where a
    /// rollback resumes. Absent: none yet (or in records written before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<CheckpointRecord>,
    /// Set once every window's final latents are stored: the denoising is done, and a rollback
    /// only decodes again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denoised: Option<DenoisedRecord>,
    /// The kernel family of the workers that started the render: its windows only ever move
    /// between workers of this family (results are bit-identical only within one). Absent: not
    /// started yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_family: Option<String>,
    /// The render's trace: the W3C `traceparent` of the span that accepted it. Absent in
    /// records written before traces were kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// The stored final latents of every window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DenoisedRecord {
    /// Object keys under the output, one per plan window in order.
    pub keys: Vec<String>,
    /// The worker that denoised each window, for the manifest.
    pub workers: Vec<String>,
}

/// A committed checkpoint: every window's state after `step` steps, as objects
/// `<output_uri>/<dir>/w<window>.safetensors`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub step: u32,
    pub dir: String,
    /// The epoch whose workers wrote it.
    pub epoch: u64,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The stored form: the record tagged with its format version, so that a later format can still
/// read old records.
#[derive(Serialize, Deserialize)]
#[serde(tag = "version")]
enum StoredJob {
    #[serde(rename = "1")]
    V1(JobRecord),
}

pub fn job_key(id: &str) -> String {
    format!("jobs/{id}")
}

pub fn encode_job(record: &JobRecord) -> Vec<u8> {
    serde_json::to_vec(&StoredJob::V1(record.clone())).expect("a job record serialises")
}

pub fn decode_job(key: &str, bytes: &[u8]) -> Result<JobRecord, StoreError> {
    match serde_json::from_slice::<StoredJob>(bytes) {
        Ok(StoredJob::V1(r)) => Ok(r),
        Err(e) => Err(StoreError::Corrupt {
            key: key.to_string(),
            reason: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::{NoiseMode, StitchingMode};

    #[test]
    fn memory_store_conforms() {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(conformance(&MemoryStore::new()));
    }

    /// A version-1 record written by hand (another writer's key order and layout, every optional
    /// field present, a non-Wan latent geometry): every field reads as written.
    #[test]
    fn v1_record_written_independently() {
        let text = r#"
        {
          "state": "decoding",
          "version": "1",
          "id": "r9",
          "created_at_ms": 10, "started_at_ms": 11, "finished_at_ms": null,
          "idempotency_key": "", "request_fingerprint": "abc", "error": "",
          "output_uri": "s3://farm/renders/jobs/r9",
          "plan": {"windows": [[0, 9]], "latent_frames": 9, "num_frames": 17},
          "attempts": 2,
          "checkpoint": {"epoch": 7, "dir": "checkpoints/e7/s4", "step": 4},
          "denoised": {"workers": ["w0"], "keys": ["windows/e7/w0.f32"]},
          "kernel_family": "cpu-x86_64-avx2-fma",
          "spec": {
            "model": "/models/m", "prompt": "p", "negative_prompt": "n", "duration_s": null,
            "num_frames": 17, "fps": 8, "width": 96, "height": 72, "seed": 3, "steps": 7,
            "guidance": 3.5, "flow_shift": 2.0, "stitching": "independent", "window": 9,
            "overlap": 2, "output": "s3://farm/renders", "png_frames": true, "priority": -1,
            "has_initial_noise": true,
            "latent": {"channels": 8, "spatial_factor": 4, "temporal_factor": 2, "size_multiple": 8}
          }
        }"#;
        let r = decode_job("jobs/r9", text.as_bytes()).unwrap();
        assert_eq!((r.id.as_str(), r.state), ("r9", JobState::Decoding));
        assert_eq!(
            (r.created_at_ms, r.started_at_ms, r.finished_at_ms),
            (10, Some(11), None)
        );
        assert_eq!(r.attempts, 2);
        assert_eq!(
            r.checkpoint,
            Some(CheckpointRecord {
                step: 4,
                dir: "checkpoints/e7/s4".into(),
                epoch: 7
            })
        );
        assert_eq!(r.denoised.as_ref().unwrap().keys, ["windows/e7/w0.f32"]);
        assert_eq!(r.kernel_family.as_deref(), Some("cpu-x86_64-avx2-fma"));
        let p = r.plan.as_ref().unwrap();
        assert_eq!(
            (p.num_frames, p.latent_frames, p.windows.clone()),
            (17, 9, vec![[0, 9]])
        );
        let s = &r.spec;
        assert_eq!((s.num_frames, s.fps, s.width, s.height), (17, 8, 96, 72));
        assert_eq!(
            (s.seed, s.steps, s.guidance, s.flow_shift),
            (3, 7, 3.5, Some(2.0))
        );
        assert_eq!(s.stitching, StitchingMode::Independent);
        assert_eq!((s.window, s.overlap, s.priority), (9, 2, -1));
        assert!(s.png_frames && s.has_initial_noise);
        assert_eq!(s.latent_shape(), [8, 9, 18, 24]);
        // Written back and read again: the same record.
        assert_eq!(decode_job("jobs/r9", &encode_job(&r)).unwrap(), r);
    }

    /// A version-1 record as written by this code: reading it must keep working.
    const V1_GOLDEN: &str = r#"{"version":"1","id":"r1","spec":{"prompt":"a lighthouse","negative_prompt":"","duration_s":60.0,"num_frames":961,"fps":16,"width":64,"height":64,"seed":7,"steps":4,"guidance":5.0,"flow_shift":null,"model":"","stitching":"codenoise","window":21,"overlap":4,"output":"renders","png_frames":false,"priority":0,"has_initial_noise":false},"idempotency_key":"k","request_fingerprint":"00ff","state":"denoising","error":"","output_uri":"/tmp/renders/jobs/r1","plan":{"num_frames":961,"latent_frames":241,"windows":[[0,21],[17,21]]},"created_at_ms":1,"started_at_ms":2,"finished_at_ms":null}"#;

    #[test]
    fn v1_record_golden() {
        let r = decode_job("jobs/r1", V1_GOLDEN.as_bytes()).unwrap();
        assert_eq!(r.state, JobState::Denoising);
        assert_eq!(r.spec.stitching, StitchingMode::Codenoise);
        assert_eq!(r.plan.as_ref().unwrap().windows[1], [17, 21]);
        assert_eq!(String::from_utf8(encode_job(&r)).unwrap(), V1_GOLDEN);
        assert_eq!(r.spec.noise_layout, NoiseMode::Independent);
        assert_eq!((r.spec.hold_noise, r.spec.hold_release), (1.0, 0.0));
        // A rescheduled layout is written and read back.
        let mut r2 = r.clone();
        r2.spec.noise_layout = NoiseMode::Rescheduled;
        let bytes = encode_job(&r2);
        assert!(String::from_utf8_lossy(&bytes).contains(r#""noise_layout":"rescheduled""#));
        assert_eq!(decode_job("jobs/r1", &bytes).unwrap(), r2);
        // So is a hold_noise below 1.
        r2.spec.hold_noise = 0.5;
        let bytes = encode_job(&r2);
        assert!(String::from_utf8_lossy(&bytes).contains(r#""hold_noise":0.5"#));
        assert_eq!(decode_job("jobs/r1", &bytes).unwrap(), r2);
        // And a hold_release above 0.
        r2.spec.hold_release = 0.4;
        let bytes = encode_job(&r2);
        assert!(String::from_utf8_lossy(&bytes).contains(r#""hold_release":0.4"#));
        assert_eq!(decode_job("jobs/r1", &bytes).unwrap(), r2);
        assert!(matches!(
            decode_job("jobs/x", br#"{"version":"9"}"#),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
