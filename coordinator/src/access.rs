//! Who may call the coordinator.
//!
//! - The public API: with a tenants file ([`Tenants`]), every call carries `authorization:
//!   Bearer <token>`; the token names the tenant, whose renders are the only ones the call can
//!   see, and whose limits apply to its submissions. Without one, the API is open (a single
//!   user, or a trusted network).
//! - The worker API: with a cluster token, every call carries `authorization: Bearer <cluster
//!   token>`. (Client certificates, checked by TLS on the worker listener, are the other way.)
//!
//! Both checks run as tonic interceptors ([`PublicAuth`], [`WorkerAuth`]) before any handler;
//! the public one leaves the [`Caller`] in the request's extensions.
//!
//! # The tenants file
//!
//! JSON, reloaded when it changes ([`Tenants::watch`]; a file that does not parse is reported
//! and the previous tenants stay):
//!
//! ```json
//! {"tenants": [
//!   {"name": "studio-a", "tokens": ["<at least 16 characters>"],
//!    "limits": {"concurrent_renders": 4, "queued_video_seconds": 1800, "max_request_seconds": 600}}
//! ]}
//! ```
//!
//! `name`: 1–63 characters of `a-z 0-9 - _` (it becomes part of output paths); `tokens`: one or
//! more, each at least 16 characters and used by one tenant only (several allow rotation);
//! `limits`: each optional (absent: unlimited).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::errors::{Error, Kind};

/// The shortest token accepted in a tenants file or as the cluster token.
pub const MIN_TOKEN_CHARS: usize = 16;

/// A tenant's limits; `None`: unlimited.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantLimits {
    /// Renders not yet finished (queued or running) at once.
    pub concurrent_renders: Option<u32>,
    /// Seconds of video in renders not yet finished, this request included.
    pub queued_video_seconds: Option<f64>,
    /// Seconds of video in one request.
    pub max_request_seconds: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tenant {
    pub name: String,
    pub limits: TenantLimits,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantsFile {
    tenants: Vec<TenantEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantEntry {
    name: String,
    tokens: Vec<String>,
    #[serde(default)]
    limits: TenantLimits,
}

/// One version of the tenants file: token → tenant.
#[derive(Debug, Default)]
pub struct TenantTable {
    by_token: HashMap<String, Arc<Tenant>>,
    count: usize,
}

impl TenantTable {
    /// Parses and checks a tenants file's text; the error names the tenant and field at fault.
    pub fn parse(text: &str) -> Result<TenantTable, String> {
        let file: TenantsFile = serde_json::from_str(text).map_err(|e| {
            format!(
                "{e} (expected {{\"tenants\": [{{\"name\": ..., \"tokens\": [...], \
                 \"limits\": {{...}}}}]}})"
            )
        })?;
        let mut table = TenantTable::default();
        let mut names = std::collections::HashSet::new();
        for (i, t) in file.tenants.into_iter().enumerate() {
            let at = format!("tenants[{i}]");
            check_name(&t.name).map_err(|e| format!("{at}.name: {e}"))?;
            if !names.insert(t.name.clone()) {
                return Err(format!("{at}.name: {:?} appears twice", t.name));
            }
            if t.tokens.is_empty() {
                return Err(format!("{at}.tokens: must list at least one token"));
            }
            let l = &t.limits;
            if l.concurrent_renders == Some(0) {
                return Err(format!(
                    "{at}.limits.concurrent_renders: must be at least 1 (absent: unlimited)"
                ));
            }
            for (field, v) in [
                ("queued_video_seconds", l.queued_video_seconds),
                ("max_request_seconds", l.max_request_seconds),
            ] {
                if v.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
                    return Err(format!(
                        "{at}.limits.{field}: must be a positive number of seconds (absent: \
                         unlimited)"
                    ));
                }
            }
            let tenant = Arc::new(Tenant {
                name: t.name,
                limits: t.limits,
            });
            for (j, token) in t.tokens.into_iter().enumerate() {
                check_token(&token).map_err(|e| format!("{at}.tokens[{j}]: {e}"))?;
                if let Some(other) = table.by_token.insert(token, Arc::clone(&tenant)) {
                    return Err(format!(
                        "{at}.tokens[{j}]: also a token of tenant {:?}; every token belongs to \
                         one tenant",
                        other.name
                    ));
                }
            }
            table.count += 1;
        }
        Ok(table)
    }

    pub fn lookup(&self, token: &str) -> Option<Arc<Tenant>> {
        self.by_token.get(token).cloned()
    }

    /// How many tenants the file names.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

fn check_name(name: &str) -> Result<(), String> {
    let ok = (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a tenant name; allowed: 1 to 63 characters of a-z, 0-9, '-' and '_'"
        ))
    }
}

/// A bearer token: at least [`MIN_TOKEN_CHARS`] visible ASCII characters.
pub fn check_token(token: &str) -> Result<(), String> {
    if token.len() < MIN_TOKEN_CHARS || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "a token must be at least {MIN_TOKEN_CHARS} visible ASCII characters (no spaces)"
        ));
    }
    Ok(())
}

/// The tenants file and its current contents.
#[derive(Debug)]
pub struct Tenants {
    path: PathBuf,
    table: RwLock<Arc<TenantTable>>,
    /// Modification time and length of the version loaded.
    stamp: Mutex<Option<(SystemTime, u64)>>,
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl Tenants {
    /// Reads the file; an unreadable or invalid file is an error (the coordinator does not
    /// start with it).
    pub fn load(path: &Path) -> Result<Arc<Tenants>, String> {
        let tenants = Tenants {
            path: path.to_path_buf(),
            table: RwLock::new(Arc::default()),
            stamp: Mutex::new(None),
        };
        tenants.reload()?;
        Ok(Arc::new(tenants))
    }

    fn reload(&self) -> Result<usize, String> {
        let before = stamp(&self.path);
        let text = std::fs::read_to_string(&self.path)
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        let table =
            TenantTable::parse(&text).map_err(|e| format!("{}: {e}", self.path.display()))?;
        let n = table.len();
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
        *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) = before;
        Ok(n)
    }

    /// Reloads the file if its modification time or length changed. `Ok(None)`: unchanged;
    /// an error leaves the tenants as they were.
    pub fn reload_if_changed(&self) -> Result<Option<usize>, String> {
        let now = stamp(&self.path);
        if now.is_some() && now == *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) {
            return Ok(None);
        }
        self.reload().map(Some)
    }

    /// Checks the file for changes every `every`, for as long as the runtime runs.
    pub fn watch(self: &Arc<Self>, every: Duration) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                tokio::time::sleep(every).await;
                let Some(t) = weak.upgrade() else { break };
                match t.reload_if_changed() {
                    Ok(Some(n)) => {
                        failing = false;
                        tracing::info!(path = %t.path.display(), tenants = n, "tenants reloaded");
                    }
                    Ok(None) => {}
                    Err(e) if !failing => {
                        failing = true;
                        tracing::error!(error = %e, "the tenants file changed but cannot be used; keeping the previous tenants");
                    }
                    Err(_) => {}
                }
            }
        });
    }

    pub fn table(&self) -> Arc<TenantTable> {
        Arc::clone(&self.table.read().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The authenticated caller of a public request: its tenant, or `None` on an open API.
#[derive(Debug, Clone)]
pub struct Caller(pub Option<Arc<Tenant>>);

impl Caller {
    /// The caller of a request that went through [`PublicAuth`] (an open API otherwise).
    pub fn of<T>(request: &Request<T>) -> Caller {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or(Caller(None))
    }

    /// The tenant's name; empty on an open API.
    pub fn tenant(&self) -> &str {
        self.0.as_ref().map_or("", |t| t.name.as_str())
    }
}

fn bearer<T>(request: &Request<T>, whose: &str) -> Result<String, Error> {
    let Some(value) = request.metadata().get("authorization") else {
        return Err(Error::plain(
            Kind::Unauthenticated,
            format!("no credentials: send the header `authorization: Bearer <{whose}>`"),
        ));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    match token {
        Some(t) => Ok(t.to_string()),
        None => Err(Error::plain(
            Kind::Unauthenticated,
            format!("the authorization header is not `Bearer <{whose}>`"),
        )),
    }
}

/// The public API's check: with tenants, a known bearer token; leaves the [`Caller`].
#[derive(Debug, Clone, Default)]
pub struct PublicAuth {
    pub tenants: Option<Arc<Tenants>>,
}

impl Interceptor for PublicAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = match &self.tenants {
            None => Caller(None),
            Some(tenants) => {
                let token = bearer(&request, "tenant token")?;
                match tenants.table().lookup(&token) {
                    Some(t) => Caller(Some(t)),
                    None => {
                        return Err(Error::plain(
                            Kind::PermissionDenied,
                            "the bearer token is not a tenant's token on this coordinator",
                        )
                        .into());
                    }
                }
            }
        };
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// The worker API's check: with a cluster token, the same bearer token.
#[derive(Debug, Clone, Default)]
pub struct WorkerAuth {
    pub cluster_token: Option<Arc<str>>,
}

impl Interceptor for WorkerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(expected) = &self.cluster_token {
            let token = bearer(&request, "cluster token")?;
            if !same(token.as_bytes(), expected.as_bytes()) {
                return Err(Error::plain(
                    Kind::PermissionDenied,
                    "the bearer token is not this cluster's worker token",
                )
                .into());
            }
        }
        Ok(request)
    }
}

/// Equality whose time does not depend on where the inputs differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const T1: &str = "aaaaaaaaaaaaaaaa1";
    const T2: &str = "bbbbbbbbbbbbbbbb2";

    fn file(body: &str) -> Result<TenantTable, String> {
        TenantTable::parse(body)
    }

    #[test]
    fn tokens_name_their_tenant() {
        let t = file(&format!(
            r#"{{"tenants": [
                {{"name": "a", "tokens": ["{T1}"], "limits": {{"concurrent_renders": 2}}}},
                {{"name": "b", "tokens": ["{T2}"]}}]}}"#
        ))
        .unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t.lookup(T1).unwrap().name, "a");
        assert_eq!(t.lookup(T1).unwrap().limits.concurrent_renders, Some(2));
        assert_eq!(t.lookup(T2).unwrap().limits, TenantLimits::default());
        assert!(t.lookup("cccccccccccccccccc").is_none());
    }

    #[test]
    fn bad_files_name_the_field() {
        let cases = [
            ("{", "expected"),
            (r#"{"tenant": []}"#, "unknown field"),
            (
                &format!(r#"{{"tenants": [{{"name": "A b", "tokens": ["{T1}"]}}]}}"#),
                "tenants[0].name",
            ),
            (
                r#"{"tenants": [{"name": "a", "tokens": ["short"]}]}"#,
                "tenants[0].tokens[0]: a token must be at least 16",
            ),
            (
                r#"{"tenants": [{"name": "a", "tokens": []}]}"#,
                "tenants[0].tokens: must list",
            ),
            (
                &format!(
                    r#"{{"tenants": [{{"name": "a", "tokens": ["{T1}"]}}, {{"name": "b", "tokens": ["{T1}"]}}]}}"#
                ),
                "tenants[1].tokens[0]: also a token of tenant \"a\"",
            ),
            (
                &format!(
                    r#"{{"tenants": [{{"name": "a", "tokens": ["{T1}"], "limits": {{"max_request_seconds": -1}}}}]}}"#
                ),
                "tenants[0].limits.max_request_seconds",
            ),
            (
                &format!(
                    r#"{{"tenants": [{{"name": "a", "tokens": ["{T1}"], "limits": {{"concurent_renders": 1}}}}]}}"#
                ),
                "unknown field `concurent_renders`",
            ),
        ];
        for (body, want) in cases {
            let e = file(body).err().unwrap_or_else(|| panic!("{body} parsed"));
            assert!(e.contains(want), "{body}: {e}");
        }
    }

    #[test]
    fn a_changed_file_is_reloaded_and_a_broken_one_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tenants.json");
        std::fs::write(
            &path,
            format!(r#"{{"tenants": [{{"name": "a", "tokens": ["{T1}"]}}]}}"#),
        )
        .unwrap();
        let t = Tenants::load(&path).unwrap();
        assert_eq!(t.reload_if_changed().unwrap(), None);
        std::fs::write(
            &path,
            format!(r#"{{"tenants": [{{"name": "b", "tokens": ["{T2}", "{T1}x"]}}]}}"#),
        )
        .unwrap();
        assert_eq!(t.reload_if_changed().unwrap(), Some(1));
        assert!(t.table().lookup(T1).is_none());
        assert_eq!(t.table().lookup(T2).unwrap().name, "b");
        std::fs::write(&path, "{ not json").unwrap();
        assert!(t.reload_if_changed().is_err());
        assert_eq!(t.table().lookup(T2).unwrap().name, "b");
    }

    #[test]
    fn interceptors_refuse_missing_and_wrong_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tenants.json");
        std::fs::write(
            &path,
            format!(r#"{{"tenants": [{{"name": "a", "tokens": ["{T1}"]}}]}}"#),
        )
        .unwrap();
        let mut auth = PublicAuth {
            tenants: Some(Tenants::load(&path).unwrap()),
        };
        let with = |v: &str| {
            let mut r = Request::new(());
            r.metadata_mut().insert("authorization", v.parse().unwrap());
            r
        };
        assert_eq!(
            auth.call(Request::new(())).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            auth.call(with(T1)).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            auth.call(with(&format!("Bearer {T2}"))).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        let ok = auth.call(with(&format!("Bearer {T1}"))).unwrap();
        assert_eq!(Caller::of(&ok).tenant(), "a");
        let mut open = PublicAuth::default();
        assert_eq!(
            Caller::of(&open.call(Request::new(())).unwrap()).tenant(),
            ""
        );

        let mut w = WorkerAuth {
            cluster_token: Some(T1.into()),
        };
        assert!(w.call(with(&format!("Bearer {T1}"))).is_ok());
        assert_eq!(
            w.call(with(&format!("Bearer {T2}"))).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            w.call(Request::new(())).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }
}
