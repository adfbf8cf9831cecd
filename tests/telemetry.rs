//! Metrics of real processes: a coordinator and two workers with `--metrics-listen`, scraped
//! before and after a co-denoised render with checkpoints; every scrape is parsed by
//! prometheus_client's own text-format parser, and the counters must have moved by what the
//! render did.

mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{first_line, free_port, http, prometheus_python, spawn};

fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_longtake"))
}

/// Samples of a scrape as prometheus_client parses it: `name{k="v",...}` → value (labels
/// sorted). Panics if the text does not parse.
fn parse(python: &Path, text: &str) -> BTreeMap<String, f64> {
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        out[f"{s.name}{{{labels}}}"] = s.value
print(json.dumps(out))
"#;
    let mut child = Command::new(python)
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client could not parse:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn scrape(python: &Path, port: u16) -> BTreeMap<String, f64> {
    let (status, body) = http("GET", port, "/metrics");
    assert!(status.contains("200"), "{status}");
    parse(python, &String::from_utf8(body).unwrap())
}

fn get(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("no sample {key}; have: {:?}", m.keys().collect::<Vec<_>>()))
}

#[test]
fn metrics_parse_and_move_with_a_render() {
    let python = prometheus_python();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let store = dir.join("out").display().to_string();
    let cm = free_port();
    let cm_addr = format!("127.0.0.1:{cm}");
    let mut coord = spawn(
        dir,
        "coordinator",
        &exe(),
        &[
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--store",
            &store,
            "--checkpoint-every",
            "1",
            "--metrics-listen",
            &cm_addr,
        ],
        &[],
    );
    let addr = first_line(&mut coord, Duration::from_secs(30))
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_string();
    let before = scrape(&python, cm);
    assert_eq!(get(&before, "longtake_leader{}"), 1.0);
    assert_eq!(get(&before, "longtake_queued_window_steps{}"), 0.0);
    let mut worker_ports = Vec::new();
    let mut workers = Vec::new();
    for i in 0..2 {
        let port = free_port();
        let m = format!("127.0.0.1:{port}");
        workers.push(spawn(
            dir,
            &format!("w{i}"),
            &exe(),
            &[
                "worker",
                "--coordinator",
                &addr,
                "--name",
                &format!("w{i}"),
                "--threads",
                "1",
                "--metrics-listen",
                &m,
            ],
            &[],
        ));
        worker_ports.push(port);
    }
    support::wait_until(Duration::from_secs(60), "two workers registered", || {
        http_ok(cm) && {
            let m = scrape(&python, cm);
            m.get("longtake_workers{state=\"idle\"}") == Some(&2.0)
        }
    });
    // 10 s at 16 fps: 3 windows of 21 latent frames over 2 workers, 2 steps, co-denoised.
    let o = Command::new(exe())
        .args([
            "submit",
            "--coordinator",
            &addr,
            "--wait",
            "--prompt",
            "a lighthouse",
            "--duration",
            "10",
            "--steps",
            "2",
            "--model",
            "builtin:smoke",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let after = scrape(&python, cm);
    assert_eq!(
        get(&after, "longtake_renders_submitted_total{tenant=\"\"}"),
        1.0
    );
    assert_eq!(
        get(
            &after,
            "longtake_renders_finished_total{state=\"succeeded\"}"
        ),
        1.0
    );
    assert_eq!(
        get(&after, "longtake_renders{state=\"succeeded\",tenant=\"\"}"),
        1.0
    );
    assert_eq!(
        get(&after, "longtake_window_steps_total{}"),
        6.0,
        "3 windows x 2 steps"
    );
    assert_eq!(
        get(&after, "longtake_checkpoints_committed_total{}"),
        1.0,
        "after step 1 of 2"
    );
    assert!(get(&after, "longtake_halo_bytes_total{}") > 0.0);
    assert!(get(&after, "longtake_halo_exchange_seconds_count{}") >= 2.0);
    assert_eq!(get(&after, "longtake_queued_window_steps{}"), 0.0);
    assert_eq!(get(&after, "longtake_rollbacks_total{}"), 0.0);
    // The workers: 6 window-steps between them, checkpoints written, tasks counted.
    let mut steps = 0.0;
    let mut tasks = 0.0;
    for port in &worker_ports {
        let m = scrape(&python, *port);
        steps += get(&m, "longtake_worker_window_steps_total{}");
        tasks += m
            .iter()
            .filter(|(k, _)| {
                k.starts_with("longtake_worker_tasks_total{kind=\"denoise\",outcome=\"done\"")
            })
            .map(|(_, v)| v)
            .sum::<f64>();
        assert!(get(&m, "longtake_worker_step_seconds_count{}") >= 2.0);
        assert!(get(&m, "longtake_worker_checkpoint_bytes_total{}") > 0.0);
    }
    assert_eq!(steps, 6.0);
    assert_eq!(tasks, 2.0);
    // Not found and bad requests.
    assert!(http("GET", cm, "/nope").0.contains("404"));
    assert!(http("GET", cm, "/healthz").0.contains("200"));
    assert!(
        http("GET", cm, "/readyz").0.contains("200"),
        "the only replica leads"
    );
    assert!(coord.child.try_wait().unwrap().is_none());
}

fn http_ok(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}
