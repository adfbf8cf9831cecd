//! longtake-telemetry: the Prometheus metrics of longtake's processes, and (in [`traces`]) their
//! tracing subscriber, OTLP export and W3C trace context.
//!
//! A [`Registry`] holds metric families (counters, gauges, histograms, each with label sets, and
//! gauges computed when scraped), renders them in the Prometheus text exposition format
//! (version 0.0.4), and [`serve`] answers `GET /metrics` on a listener of its own.
//! Metrics are lock-free on the hot path (atomics); a family's label map is locked only the
//! first time a label set appears.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub mod traces;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A value that only goes up (an integer count, or seconds / bytes as f64).
#[derive(Debug, Default)]
pub struct Counter {
    bits: AtomicU64,
}

impl Counter {
    pub fn inc(&self) {
        self.add(1.0);
    }

    pub fn add(&self, v: f64) {
        if v.is_finite() && v > 0.0 {
            add_f64(&self.bits, v);
        }
    }

    pub fn get(&self) -> f64 {
        f64::from_bits(self.bits.load(Ordering::Relaxed))
    }
}

/// A value set from outside.
#[derive(Debug, Default)]
pub struct Gauge {
    bits: AtomicU64,
}

impl Gauge {
    pub fn set(&self, v: f64) {
        self.bits.store(v.to_bits(), Ordering::Relaxed);
    }

    pub fn get(&self) -> f64 {
        f64::from_bits(self.bits.load(Ordering::Relaxed))
    }
}

fn add_f64(bits: &AtomicU64, v: f64) {
    let mut cur = bits.load(Ordering::Relaxed);
    loop {
        let new = (f64::from_bits(cur) + v).to_bits();
        match bits.compare_exchange_weak(cur, new, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return,
            Err(c) => cur = c,
        }
    }
}

/// Observations counted in cumulative buckets (upper bounds), with their sum and count.
#[derive(Debug)]
pub struct Histogram {
    bounds: Vec<f64>,
    counts: Vec<AtomicU64>,
    sum: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &[f64]) -> Histogram {
        Histogram {
            bounds: bounds.to_vec(),
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: f64) {
        if !v.is_finite() {
            return;
        }
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        add_f64(&self.sum, v);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// Seconds from 1 ms to 10 min: step latencies, halo waits, checkpoint writes.
pub const SECONDS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 600.0,
];

type Labels = Vec<(String, String)>;

/// A metric family: one name, one kind, a metric per label set.
pub struct Family<M> {
    name: String,
    help: String,
    make: Box<dyn Fn() -> M + Send + Sync>,
    metrics: Mutex<BTreeMap<Labels, Arc<M>>>,
}

impl<M> Family<M> {
    /// The metric for these label values (created on first use).
    pub fn with(&self, labels: &[(&str, &str)]) -> Arc<M> {
        let key: Labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut m = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(m.entry(key).or_insert_with(|| Arc::new((self.make)())))
    }

    fn each(&self) -> Vec<(Labels, Arc<M>)> {
        let m = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
        m.iter().map(|(k, v)| (k.clone(), Arc::clone(v))).collect()
    }
}

/// Samples of a gauge family computed when scraped.
pub type Collect = Box<dyn Fn() -> Vec<(Labels, f64)> + Send + Sync>;

enum Entry {
    Counter(Arc<Family<Counter>>),
    Gauge(Arc<Family<Gauge>>),
    Histogram(Arc<Family<Histogram>>),
    Computed {
        name: String,
        help: String,
        collect: Collect,
    },
}

/// Every metric family of a process, in registration order.
#[derive(Default)]
pub struct Registry {
    entries: Mutex<Vec<Entry>>,
}

fn check_name(name: &str) {
    assert!(
        !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
            && !name.as_bytes()[0].is_ascii_digit(),
        "metric name {name:?}"
    );
}

impl Registry {
    pub fn new() -> Arc<Registry> {
        Arc::new(Registry::default())
    }

    fn family<M>(
        &self,
        name: &str,
        help: &str,
        make: impl Fn() -> M + Send + Sync + 'static,
    ) -> Arc<Family<M>> {
        check_name(name);
        Arc::new(Family {
            name: name.to_string(),
            help: help.to_string(),
            make: Box::new(make),
            metrics: Mutex::new(BTreeMap::new()),
        })
    }

    fn push(&self, e: Entry) {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(e);
    }

    /// A counter family (`name` should end in `_total`).
    pub fn counters(&self, name: &str, help: &str) -> Arc<Family<Counter>> {
        let f = self.family(name, help, Counter::default);
        self.push(Entry::Counter(Arc::clone(&f)));
        f
    }

    /// One counter without labels.
    pub fn counter(&self, name: &str, help: &str) -> Arc<Counter> {
        self.counters(name, help).with(&[])
    }

    pub fn gauges(&self, name: &str, help: &str) -> Arc<Family<Gauge>> {
        let f = self.family(name, help, Gauge::default);
        self.push(Entry::Gauge(Arc::clone(&f)));
        f
    }

    pub fn gauge(&self, name: &str, help: &str) -> Arc<Gauge> {
        self.gauges(name, help).with(&[])
    }

    pub fn histograms(
        &self,
        name: &str,
        help: &str,
        bounds: &'static [f64],
    ) -> Arc<Family<Histogram>> {
        let f = self.family(name, help, move || Histogram::new(bounds));
        self.push(Entry::Histogram(Arc::clone(&f)));
        f
    }

    pub fn histogram(&self, name: &str, help: &str, bounds: &'static [f64]) -> Arc<Histogram> {
        self.histograms(name, help, bounds).with(&[])
    }

    /// A gauge family whose samples `collect` computes at every scrape.
    pub fn computed(&self, name: &str, help: &str, collect: Collect) {
        check_name(name);
        self.push(Entry::Computed {
            name: name.to_string(),
            help: help.to_string(),
            collect,
        });
    }

    /// Every family in the text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for e in self
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            match e {
                Entry::Counter(f) => {
                    header(&mut out, &f.name, &f.help, "counter");
                    for (l, c) in f.each() {
                        sample(&mut out, &f.name, &l, None, c.get());
                    }
                }
                Entry::Gauge(f) => {
                    header(&mut out, &f.name, &f.help, "gauge");
                    for (l, g) in f.each() {
                        sample(&mut out, &f.name, &l, None, g.get());
                    }
                }
                Entry::Histogram(f) => {
                    header(&mut out, &f.name, &f.help, "histogram");
                    for (l, h) in f.each() {
                        let bucket = format!("{}_bucket", f.name);
                        let mut cumulative = 0u64;
                        for (b, c) in h.bounds.iter().zip(&h.counts) {
                            cumulative += c.load(Ordering::Relaxed);
                            sample(&mut out, &bucket, &l, Some(&number(*b)), cumulative as f64);
                        }
                        let count = h.count();
                        sample(&mut out, &bucket, &l, Some("+Inf"), count as f64);
                        let sum = f64::from_bits(h.sum.load(Ordering::Relaxed));
                        sample(&mut out, &format!("{}_sum", f.name), &l, None, sum);
                        sample(
                            &mut out,
                            &format!("{}_count", f.name),
                            &l,
                            None,
                            count as f64,
                        );
                    }
                }
                Entry::Computed {
                    name,
                    help,
                    collect,
                } => {
                    header(&mut out, name, help, "gauge");
                    for (l, v) in collect() {
                        sample(&mut out, name, &l, None, v);
                    }
                }
            }
        }
        out
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let help = help.replace('\\', "\\\\").replace('\n', "\\n");
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        format!("{v}")
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn sample(out: &mut String, name: &str, labels: &Labels, le: Option<&str>, v: f64) {
    out.push_str(name);
    let mut parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if !parts.is_empty() {
        let _ = write!(out, "{{{}}}", parts.join(","));
    }
    let _ = writeln!(out, " {}", number(v));
}

/// Labels from pairs, for [`Collect`] functions.
pub fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Whether a process should get traffic now (`/readyz`).
pub type Ready = Arc<dyn Fn() -> bool + Send + Sync>;

/// Answer `GET /metrics` (the registry), `GET /healthz` (`ok` while the process runs) and
/// `GET /readyz` (200 while `ready` holds, else 503: for a coordinator, while it leads) on
/// `listener` until the runtime stops; anything else is 404, a malformed request 400. One
/// request per connection.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>, ready: Ready) {
    loop {
        let (mut conn, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let registry = Arc::clone(&registry);
        let ready = Arc::clone(&ready);
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            })
            .await;
            let line = String::from_utf8_lossy(&buf);
            let first = line.lines().next().unwrap_or("");
            let mut parts = first.split_whitespace();
            let (status, ctype, body) = match (read, parts.next(), parts.next()) {
                (Ok(()), Some("GET"), Some(path)) => match path.split('?').next() {
                    Some("/metrics") => (
                        "200 OK",
                        "text/plain; version=0.0.4; charset=utf-8",
                        registry.render(),
                    ),
                    Some("/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
                    Some("/readyz") if ready() => ("200 OK", "text/plain", "ready\n".to_string()),
                    Some("/readyz") => (
                        "503 Service Unavailable",
                        "text/plain",
                        "not ready\n".to_string(),
                    ),
                    _ => (
                        "404 Not Found",
                        "text/plain",
                        "not found: try /metrics\n".into(),
                    ),
                },
                _ => ("400 Bad Request", "text/plain", "bad request\n".to_string()),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(body.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format() {
        let r = Registry::new();
        let c = r.counters("longtake_things_total", "Things.\nDone.");
        c.with(&[("kind", "a\"b")]).add(2.0);
        c.with(&[("kind", "c")]).inc();
        let h = r.histogram("longtake_wait_seconds", "Waits.", &[0.1, 1.0]);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(5.0);
        r.gauge("longtake_level", "Level.").set(-1.5);
        r.computed(
            "longtake_computed",
            "Computed.",
            Box::new(|| vec![(labels(&[("state", "queued")]), 3.0)]),
        );
        let text = r.render();
        let want = "\
# HELP longtake_things_total Things.\\nDone.
# TYPE longtake_things_total counter
longtake_things_total{kind=\"a\\\"b\"} 2
longtake_things_total{kind=\"c\"} 1
# HELP longtake_wait_seconds Waits.
# TYPE longtake_wait_seconds histogram
longtake_wait_seconds_bucket{le=\"0.1\"} 1
longtake_wait_seconds_bucket{le=\"1\"} 2
longtake_wait_seconds_bucket{le=\"+Inf\"} 3
longtake_wait_seconds_sum 5.55
longtake_wait_seconds_count 3
# HELP longtake_level Level.
# TYPE longtake_level gauge
longtake_level -1.5
# HELP longtake_computed Computed.
# TYPE longtake_computed gauge
longtake_computed{state=\"queued\"} 3
";
        assert_eq!(text, want);
    }
}
