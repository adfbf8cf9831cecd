//! A render's output location (a local directory or an S3 prefix) as an `object_store`, shared by
//! the coordinator and the workers: opening it, object keys under its prefix, write-once objects
//! (conditional creates: a retried or stale writer never replaces what is there), and retries
//! that wait out an outage of the store (an S3 server restarting) instead of failing the render.
//!
//! Two layers of retry: `object_store`'s own (configured in [`open_store`]: up to
//! [`RETRY_TIMEOUT`] with backoff, for the requests it knows to be safe to repeat), and
//! [`retry`], which repeats a whole operation on a transient error (a conditional create whose
//! connection broke, for one) until [`RETRY_TIMEOUT`] has passed. Conditional creates make that
//! safe: a create repeated after it landed finds the object there and changes nothing.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{BackoffConfig, ObjectStore, ObjectStoreExt, PutMode, PutPayload, RetryConfig};

/// How long an operation on the store keeps being retried while the store is unreachable.
pub const RETRY_TIMEOUT: Duration = Duration::from_secs(120);

fn retry_config() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            base: 2.0,
        },
        max_retries: 40,
        retry_timeout: RETRY_TIMEOUT,
    }
}

/// Whether an error can go away by itself (the store unreachable or overloaded), as opposed to an
/// answer (not found, already exists, a precondition, a bad request).
pub fn is_transient(e: &object_store::Error) -> bool {
    matches!(
        e,
        object_store::Error::Generic { .. } | object_store::Error::JoinError { .. }
    )
}

/// Run `op` until it succeeds, fails with a non-transient error, or [`RETRY_TIMEOUT`] has
/// passed since the first try; `what` names the operation in the log.
pub async fn retry<T, F, Fut>(what: &str, mut op: F) -> Result<T, object_store::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, object_store::Error>>,
{
    let started = Instant::now();
    let mut backoff = Duration::from_millis(200);
    loop {
        match op().await {
            Err(e) if is_transient(&e) && started.elapsed() < RETRY_TIMEOUT => {
                tracing::warn!(operation = what, error = %e, "object store unavailable; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            other => return other,
        }
    }
}

/// Read a whole object, retrying over outages.
pub async fn read(store: &dyn ObjectStore, path: &Path) -> Result<Vec<u8>, object_store::Error> {
    retry(&format!("read {path}"), || async {
        Ok(store.get(path).await?.bytes().await?.to_vec())
    })
    .await
}

/// Write (or replace) an object, retrying over outages.
pub async fn put(
    store: &dyn ObjectStore,
    path: &Path,
    bytes: Vec<u8>,
) -> Result<(), object_store::Error> {
    let payload = PutPayload::from(bytes);
    retry(&format!("write {path}"), || async {
        store.put(path, payload.clone()).await.map(|_| ())
    })
    .await
}

/// The environment variable naming a non-AWS S3 endpoint (MinIO, Ceph, ...), for example
/// `http://127.0.0.1:9000`. Credentials and region come from the standard `AWS_*` variables.
pub const S3_ENDPOINT_ENV: &str = "LONGTAKE_S3_ENDPOINT";

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("cannot create output directory {path}: {source}")]
    CreateDir {
        path: String,
        source: std::io::Error,
    },
    #[error("output {url:?} is not a directory path or s3://bucket[/prefix]")]
    BadUrl { url: String },
    #[error("object store error at {url}: {source}")]
    Store {
        url: String,
        source: object_store::Error,
    },
}

/// Open `url` (a local directory path or `s3://bucket[/prefix]`): the store and the key prefix
/// under which the location's objects live. A local directory is created if missing and becomes
/// the store's root (empty prefix).
pub fn open_store(url: &str) -> Result<(Arc<dyn ObjectStore>, Path), OutputError> {
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(OutputError::BadUrl {
                url: url.to_string(),
            });
        }
        // reqwest is built without a default TLS crypto provider; install ring's once per process
        // (an error means another provider is already installed, which is fine).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_retry(retry_config());
        if let Ok(endpoint) = std::env::var(S3_ENDPOINT_ENV)
            && !endpoint.is_empty()
        {
            builder = builder
                .with_allow_http(endpoint.starts_with("http://"))
                .with_endpoint(endpoint);
        }
        let store = builder.build().map_err(|source| OutputError::Store {
            url: url.to_string(),
            source,
        })?;
        return Ok((Arc::new(store), Path::from(prefix)));
    }
    if url.is_empty() || url.contains("://") {
        return Err(OutputError::BadUrl {
            url: url.to_string(),
        });
    }
    std::fs::create_dir_all(url).map_err(|source| OutputError::CreateDir {
        path: url.to_string(),
        source,
    })?;
    // Deleting the last object of a directory removes the directory (finished renders' checkpoints
    // leave nothing behind).
    let store = LocalFileSystem::new_with_prefix(url)
        .map_err(|source| OutputError::Store {
            url: url.to_string(),
            source,
        })?
        .with_automatic_cleanup(true);
    Ok((Arc::new(store), Path::default()))
}

/// `base` joined with a relative key like `jobs/<id>` (a URL for S3, a path otherwise).
pub fn join_uri(base: &str, rel: &str) -> String {
    let rel = rel.trim_matches('/');
    if rel.is_empty() {
        return base.to_string();
    }
    if base.ends_with('/') {
        format!("{base}{rel}")
    } else {
        format!("{base}/{rel}")
    }
}

/// The key of a render's manifest under its output prefix.
pub fn manifest_path(prefix: &Path) -> Path {
    prefix.clone().join("manifest.json")
}

/// Write `manifest` as `<prefix>/manifest.json` in one put of the complete object (atomic on S3;
/// the local store writes a temporary file and renames it), so a reader sees either no manifest
/// or the whole of it.
pub async fn write_manifest(
    store: &dyn ObjectStore,
    prefix: &Path,
    manifest: &serde_json::Value,
) -> Result<(), object_store::Error> {
    let mut body = serde_json::to_vec_pretty(manifest).expect("a JSON value serialises");
    body.push(b'\n');
    // Write-once: a finished render's manifest is never replaced (a retried or stale writer
    // finds it there and changes nothing).
    write_once(store, &manifest_path(prefix), body).await
}

/// `rel` (a relative key such as `windows/e3/w0.f32`) under the key prefix `prefix`.
pub fn object_path(prefix: &Path, rel: &str) -> Path {
    if prefix.as_ref().is_empty() {
        Path::from(rel)
    } else {
        Path::from(format!("{}/{rel}", prefix.as_ref()))
    }
}

/// Create `path` with `bytes` unless it exists (then it is left as it is: a retried writer of
/// the same render writes the same bytes), retrying over outages.
pub async fn write_once(
    store: &dyn ObjectStore,
    path: &Path,
    bytes: Vec<u8>,
) -> Result<(), object_store::Error> {
    let payload = PutPayload::from(bytes);
    retry(&format!("create {path}"), || async {
        match store
            .put_opts(path, payload.clone(), PutMode::Create.into())
            .await
        {
            Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    })
    .await
}

/// Delete every object under `prefix` (a finished render's checkpoints).
pub async fn delete_prefix(
    store: &dyn ObjectStore,
    prefix: &Path,
) -> Result<usize, object_store::Error> {
    use futures::TryStreamExt;
    let keys: Vec<Path> = store
        .list(Some(prefix))
        .map_ok(|m| m.location)
        .try_collect()
        .await?;
    for k in &keys {
        retry(&format!("delete {k}"), || store.delete(k)).await?;
    }
    Ok(keys.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join() {
        assert_eq!(join_uri("s3://b/p", "jobs/x"), "s3://b/p/jobs/x");
        assert_eq!(join_uri("s3://b", "jobs/x"), "s3://b/jobs/x");
        assert_eq!(join_uri("/out/", "jobs/x"), "/out/jobs/x");
        assert_eq!(join_uri("/out", ""), "/out");
    }

    #[tokio::test]
    async fn local_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a/b");
        let (store, prefix) = open_store(target.to_str().unwrap()).unwrap();
        write_manifest(&*store, &prefix, &serde_json::json!({"ok": true}))
            .await
            .unwrap();
        let text = std::fs::read_to_string(target.join("manifest.json")).unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&text).unwrap(),
            serde_json::json!({"ok": true})
        );
        assert!(matches!(
            open_store("ftp://x/y"),
            Err(OutputError::BadUrl { .. })
        ));
    }

    #[test]
    fn s3_prefix() {
        let (_store, prefix) = open_store("s3://bucket-name/some/prefix").unwrap();
        assert_eq!(prefix.as_ref(), "some/prefix");
        assert_eq!(manifest_path(&prefix).as_ref(), "some/prefix/manifest.json");
    }
}
