//! The farm as separate processes on loopback: `longtake coordinator` replicas (state in a real
//! etcd), `longtake worker` processes, a real S3-compatible server (moto), and the client
//! commands. Every result is compared bit for bit with a single-process `longtake render
//! --workers 1` of the same request.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use support::{Etcd, PersistentS3, Proc, S3, first_line, spawn, wait_until};

fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_longtake"))
}

fn longtake(args: &[&str], env: &[(&str, String)]) -> Output {
    let mut cmd = Command::new(exe());
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// The request every test renders: 10 s at 16 fps = 161 frames = 41 latent frames = 3 windows.
fn request(steps: u32) -> Vec<String> {
    [
        "--prompt",
        "a lighthouse on a cliff at dusk",
        "--duration",
        "10",
        "--seed",
        "7",
        "--steps",
        &steps.to_string(),
        "--model",
        "builtin:smoke",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn f32s(file: &[u8]) -> Vec<f32> {
    longtake_model::io::read_f32_bytes(file, "latents")
        .expect("a latents.safetensors file")
        .1
}

/// The single-process result of `request(steps)`.
fn reference(dir: &Path, steps: u32) -> Vec<f32> {
    let out = dir.join("reference");
    let mut args = vec!["render".to_string(), "--workers".into(), "1".into()];
    args.extend(request(steps));
    args.extend(["--out".into(), out.to_str().unwrap().into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = longtake(&args, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let location = String::from_utf8_lossy(&o.stdout).trim().to_string();
    f32s(&std::fs::read(Path::new(&location).join("latents.safetensors")).unwrap())
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// A coordinator process listening on a free port: (process, address).
fn coordinator(dir: &Path, name: &str, args: &[&str], env: &[(&str, String)]) -> (Proc, String) {
    let mut all = vec!["coordinator", "--listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let mut p = spawn(dir, name, &exe(), &all, env);
    let line = first_line(&mut p, Duration::from_secs(30));
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("{name}: unexpected first line {line:?}"))
        .to_string();
    (p, addr)
}

fn worker(dir: &Path, name: &str, coordinators: &str, env: &[(&str, String)]) -> Proc {
    spawn(
        dir,
        name,
        &exe(),
        &[
            "worker",
            "--coordinator",
            coordinators,
            "--name",
            name,
            "--threads",
            "1",
        ],
        env,
    )
}

/// Every process log in `dir`, for failure messages.
fn logs(dir: &Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "log" || x == "out") {
            out += &format!(
                "==== {}\n{}\n",
                p.display(),
                std::fs::read_to_string(&p).unwrap_or_default()
            );
        }
    }
    out
}

/// The largest step a rollback in `log` resumed from ("rolled back to step N").
fn resumed_after(log: &str) -> u32 {
    log.split("rolled back to step ")
        .skip(1)
        .filter_map(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(0)
}

fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

/// `get --json` of a render through `coordinators`.
fn get_json(coordinators: &str, id: &str) -> serde_json::Value {
    let o = longtake(&["get", "--coordinator", coordinators, "--json", id], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Wait until the render is denoising with at least `steps` window-steps done.
fn wait_denoising(coordinators: &str, id: &str, steps: u64) {
    wait_until(
        Duration::from_secs(120),
        "the render to be denoising",
        || {
            let r = get_json(coordinators, id);
            r["state"] == "denoising"
                && r["progress"]["window_steps_done"].as_u64().unwrap_or(0) >= steps
        },
    );
}

fn submit_wait(dir: &Path, coordinators: &str, steps: u32, env: &[(&str, String)]) -> Proc {
    let mut args = vec![
        "submit".to_string(),
        "--coordinator".into(),
        coordinators.into(),
        "--wait".into(),
        "--idempotency-key".into(),
        "k-1".into(),
    ];
    args.extend(request(steps));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    spawn(dir, "submit", &exe(), &args, env)
}

/// The render id (first line) and output location (last line) `submit --wait` printed.
fn submit_outcome(p: &mut Proc) -> (String, String) {
    let status = p.wait_exit(Duration::from_secs(300));
    let mut out = String::new();
    use std::io::Read;
    p.child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(
        status.success(),
        "submit --wait failed: {status}\nstdout: {out}\nstderr: {}",
        p.log_text()
    );
    let lines: Vec<&str> = out.lines().collect();
    (
        lines.first().unwrap().trim().to_string(),
        lines.last().unwrap().trim().to_string(),
    )
}

fn manifest_workers(manifest: &serde_json::Value) -> std::collections::BTreeSet<String> {
    manifest["plan"]["windows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["worker"].as_str().unwrap_or("").to_string())
        .collect()
}

/// 1 coordinator + 3 workers + etcd + S3: the latents equal the single-process render's, and
/// the manifest shows the windows on all three workers.
#[test]
fn three_worker_processes_match_a_single_process_render() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let expected = reference(dir, 4);
    let etcd = Etcd::start(dir);
    let s3 = S3::start(dir, "farm");
    let env = s3.env();
    let (c, addr) = coordinator(
        dir,
        "coordinator",
        &["--etcd", &etcd.endpoint(), "--store", "s3://farm/renders"],
        &env,
    );
    let workers: Vec<Proc> = (0..3)
        .map(|i| worker(dir, &format!("w{i}"), &addr, &env))
        .collect();
    wait_until(Duration::from_secs(60), "3 workers to register", || {
        count(&c.log_text(), "worker registered") == 3
    });
    let mut submit = submit_wait(dir, &addr, 4, &env);
    let (id, location) = submit_outcome(&mut submit);
    assert_eq!(location, format!("s3://farm/renders/jobs/{id}"));
    let latents = f32s(&s3.get("farm", &format!("renders/jobs/{id}/latents.safetensors")));
    assert!(
        same_bits(&latents, &expected),
        "latents differ from the single-process render"
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&s3.get("farm", &format!("renders/jobs/{id}/manifest.json")))
            .unwrap();
    assert_eq!(
        manifest_workers(&manifest),
        ["w0", "w1", "w2"].iter().map(|s| s.to_string()).collect()
    );
    // The kernel family the result depends on is recorded.
    let family = manifest["kernel_family"].as_str().unwrap_or("");
    assert!(family.starts_with("cpu-"), "{manifest}");
    drop(workers);
}

/// A worker frozen (SIGSTOP) past its lease: the render rolls back onto the others; resumed
/// (SIGCONT), its late calls for the old assignment are refused and it registers again. Then a
/// worker is SIGKILLed mid-denoise: the render rolls back again and finishes. The event stream
/// shows both rollbacks and the latents are bit-identical to an undisturbed render.
#[test]
fn lost_workers_cost_steps_not_the_render() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let steps = 24;
    let expected = reference(dir, steps);
    let out = dir.join("out");
    let (c, addr) = coordinator(
        dir,
        "coordinator",
        &[
            "--store",
            out.to_str().unwrap(),
            "--lease-ttl",
            "1.5",
            "--checkpoint-every",
            "3",
        ],
        &[],
    );
    let mut w: Vec<Option<Proc>> = (0..3)
        .map(|i| Some(worker(dir, &format!("w{i}"), &addr, &[])))
        .collect();
    wait_until(Duration::from_secs(60), "3 workers to register", || {
        count(&c.log_text(), "worker registered") == 3
    });
    let mut submit = submit_wait(dir, &addr, steps, &[]);
    let id = first_line(&mut submit, Duration::from_secs(30))
        .trim()
        .to_string();
    wait_denoising(&addr, &id, 1);
    w[2].as_ref().unwrap().signal("STOP");
    wait_until(
        Duration::from_secs(30),
        "the frozen worker's lease to lapse",
        || c.log_text().contains("lost its lease"),
    );
    w[2].as_ref().unwrap().signal("CONT");
    wait_until(
        Duration::from_secs(30),
        "the resumed worker to register again",
        || count(&c.log_text(), "worker registered") == 4,
    );
    // Past the checkpoint after step 3 of the second attempt (2 workers, 3 windows).
    wait_denoising(&addr, &id, 3 * 5);
    let at_kill = get_json(&addr, &id)["progress"]["window_steps_done"]
        .as_u64()
        .unwrap();
    w[1] = None; // SIGKILL mid-denoise
    let status = submit.wait_exit(Duration::from_secs(300));
    assert!(status.success(), "submit --wait: {}", submit.log_text());
    let log = submit.log_text();
    eprintln!(
        "worker kill: {at_kill} window-steps done (3 windows) when killed; resumed after step {} \
         (checkpoint every 3): about {:.1} steps per window lost",
        resumed_after(&log),
        at_kill as f64 / 3.0 - f64::from(resumed_after(&log))
    );
    assert!(
        count(&log, "rolled back to step") >= 2,
        "the event stream shows both rollbacks:\n{log}"
    );
    assert!(
        resumed_after(&log) >= 3,
        "the second rollback resumes from a checkpoint:\n{log}"
    );
    let r = get_json(&addr, &id);
    assert_eq!(r["state"], "succeeded");
    let location = r["output_uri"].as_str().unwrap();
    let latents = f32s(&std::fs::read(Path::new(location).join("latents.safetensors")).unwrap());
    assert!(
        same_bits(&latents, &expected),
        "latents differ after the rollbacks"
    );
    // Checkpoints are deleted once the render has succeeded.
    assert!(!Path::new(location).join("checkpoints").exists());
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(Path::new(location).join("manifest.json")).unwrap())
            .unwrap();
    let used = manifest_workers(&manifest);
    assert!(
        !used.contains("w1"),
        "the killed worker is not in the final plan: {used:?}"
    );
}

/// Three replicas on one etcd; SIGKILL the leader mid-render: a standby leads within 10 s, the
/// workers and `submit --wait` carry on, the render completes exactly once, bit-identical.
#[test]
fn leader_failover_mid_render() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let steps = 24;
    let expected = reference(dir, steps);
    let etcd = Etcd::start(dir);
    let out = dir.join("out");
    let mut replicas = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..3 {
        let (p, a) = coordinator(
            dir,
            &format!("c{i}"),
            &[
                "--etcd",
                &etcd.endpoint(),
                "--store",
                out.to_str().unwrap(),
                "--leader-ttl",
                "2",
                "--lease-ttl",
                "3",
                "--checkpoint-every",
                "3",
            ],
            &[],
        );
        replicas.push(p);
        addrs.push(a);
    }
    let all = addrs.join(",");
    let leader_of = |replicas: &[Option<Proc>]| {
        replicas.iter().position(|p| {
            p.as_ref()
                .is_some_and(|p| p.log_text().contains("elected leader"))
        })
    };
    let mut replicas: Vec<Option<Proc>> = replicas.into_iter().map(Some).collect();
    wait_until(Duration::from_secs(30), "a leader", || {
        leader_of(&replicas).is_some()
    });
    let first = leader_of(&replicas).unwrap();
    let workers: Vec<Proc> = (0..2)
        .map(|i| worker(dir, &format!("w{i}"), &all, &[]))
        .collect();
    wait_until(Duration::from_secs(60), "2 workers to register", || {
        count(
            &replicas[first].as_ref().unwrap().log_text(),
            "worker registered",
        ) == 2
    });
    let mut submit = submit_wait(dir, &all, steps, &[]);
    let id = first_line(&mut submit, Duration::from_secs(30))
        .trim()
        .to_string();
    // Past the checkpoint after step 3 (2 workers, 3 windows).
    wait_denoising(&all, &id, 3 * 5);
    let killed_at = Instant::now();
    replicas[first] = None; // SIGKILL
    wait_until(Duration::from_secs(10), "a standby to lead", || {
        leader_of(&replicas).is_some()
    });
    eprintln!(
        "leader failover: a standby led {:.2} s after the leader was killed",
        killed_at.elapsed().as_secs_f64()
    );
    let status = submit.wait_exit(Duration::from_secs(300));
    assert!(status.success(), "submit --wait: {}", submit.log_text());
    assert!(
        resumed_after(&submit.log_text()) >= 3,
        "the new leader resumes from the committed checkpoint:\n{}",
        submit.log_text()
    );
    let r = get_json(&all, &id);
    assert_eq!(r["state"], "succeeded", "{r}\n{}", logs(dir));
    let location = r["output_uri"].as_str().unwrap();
    let latents = f32s(&std::fs::read(Path::new(location).join("latents.safetensors")).unwrap());
    assert!(
        same_bits(&latents, &expected),
        "latents differ after the failover"
    );
    // Exactly once: one render under the key, one manifest.
    let o = longtake(&["list", "--coordinator", &all, "--json"], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    let jobs: Vec<_> = std::fs::read_dir(out.join("jobs")).unwrap().collect();
    assert_eq!(jobs.len(), 1);
    drop(workers);
}

/// Client commands name what was wrong and exit non-zero; nothing is stored.
#[test]
fn client_commands_reject_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let out = dir.join("out");
    let (_c, addr) = coordinator(dir, "coordinator", &["--store", out.to_str().unwrap()], &[]);
    let cases: [(&[&str], &str); 5] = [
        (
            &[
                "submit",
                "--model",
                "builtin:smoke",
                "--coordinator",
                &addr,
                "--prompt",
                "x",
                "--stitching",
                "zigzag",
            ],
            "stitching",
        ),
        (
            &[
                "submit",
                "--model",
                "builtin:smoke",
                "--coordinator",
                &addr,
                "--prompt",
                "x",
                "--duration",
                "0",
            ],
            "duration_s",
        ),
        (
            &["get", "--coordinator", &addr, "nope"],
            "render_id: no render \"nope\" (NOT_FOUND; retrying will not help)",
        ),
        (
            &["list", "--coordinator", &addr, "--state", "bogus"],
            "state",
        ),
        (
            &["worker", "--coordinator", &addr, "--device", "tpu"],
            "device",
        ),
    ];
    for (args, field) in cases {
        let o = longtake(args, &[]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(err.contains(field), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    let o = longtake(&["list", "--coordinator", &addr, "--json"], &[]);
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "[]");
    // A standby-free address that nobody serves: a clear error within the timeout.
    let dead = format!("127.0.0.1:{}", support::free_port());
    let o = longtake(&["list", "--coordinator", &dead, "--timeout", "1"], &[]);
    assert!(!o.status.success());
    assert!(!String::from_utf8_lossy(&o.stderr).contains("panicked"));
}

fn list_json(coordinators: &str) -> Vec<serde_json::Value> {
    let o = longtake(&["list", "--coordinator", coordinators, "--json"], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice::<serde_json::Value>(&o.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn seconds(v: &serde_json::Value) -> f64 {
    v.as_str().and_then(|s| s.parse().ok()).unwrap_or(f64::NAN)
}

/// 20 renders queued before any worker joins, the last one at a higher priority: all succeed,
/// renders run side by side on disjoint workers, and the high-priority one starts first.
#[test]
fn twenty_renders_share_three_workers_by_priority() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let out = dir.join("out");
    let (_c, addr) = coordinator(dir, "coordinator", &["--store", out.to_str().unwrap()], &[]);
    let mut urgent = String::new();
    for i in 0..20 {
        let seed = i.to_string();
        let priority = if i == 19 { "5" } else { "0" };
        let o = longtake(
            &[
                "submit",
                "--model",
                "builtin:smoke",
                "--coordinator",
                &addr,
                "--prompt",
                "a kite",
                "--num-frames",
                "5",
                "--steps",
                "2",
                "--seed",
                &seed,
                "--priority",
                priority,
            ],
            &[],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        if i == 19 {
            urgent = String::from_utf8_lossy(&o.stdout).trim().to_string();
        }
    }
    assert_eq!(list_json(&addr).len(), 20);
    let _workers: Vec<Proc> = (0..3)
        .map(|i| worker(dir, &format!("w{i}"), &addr, &[]))
        .collect();
    wait_until(Duration::from_secs(240), "20 renders to succeed", || {
        list_json(&addr).iter().all(|r| r["state"] == "succeeded")
    });
    let all = list_json(&addr);
    let started = |r: &serde_json::Value| seconds(&r["started_at"]);
    let first = all.iter().map(started).fold(f64::INFINITY, f64::min);
    let u = all.iter().find(|r| r["id"] == urgent.as_str()).unwrap();
    assert_eq!(started(u), first, "the priority-5 render started first");
    // Renders overlapped in time: at some start, another render was still running.
    let overlapping = all.iter().any(|a| {
        all.iter().any(|b| {
            a["id"] != b["id"]
                && started(b) <= started(a)
                && seconds(&b["finished_at"]) > started(a)
        })
    });
    assert!(overlapping, "no two renders ran at the same time");
}

/// Cancel mid-denoise: CANCELLED at once, no manifest, and the freed workers start the next
/// render (the time it takes is printed).
#[test]
fn cancel_frees_the_workers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let out = dir.join("out");
    let (c, addr) = coordinator(dir, "coordinator", &["--store", out.to_str().unwrap()], &[]);
    let workers: Vec<Proc> = (0..2)
        .map(|i| worker(dir, &format!("w{i}"), &addr, &[]))
        .collect();
    wait_until(Duration::from_secs(60), "2 workers to register", || {
        count(&c.log_text(), "worker registered") == 2
    });
    let mut args = vec!["submit".to_string(), "--coordinator".into(), addr.clone()];
    args.extend(request(400));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = longtake(&args, &[]);
    assert!(o.status.success());
    let long = String::from_utf8_lossy(&o.stdout).trim().to_string();
    wait_denoising(&addr, &long, 2);
    let o = longtake(
        &[
            "submit",
            "--model",
            "builtin:smoke",
            "--coordinator",
            &addr,
            "--prompt",
            "next",
            "--num-frames",
            "5",
            "--steps",
            "2",
        ],
        &[],
    );
    assert!(o.status.success());
    let next = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let cancelled_at = Instant::now();
    let o = longtake(&["cancel", "--coordinator", &addr, "--json", &long], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["state"], "cancelled");
    // Both workers drop the denoise task (they check between steps).
    wait_until(
        Duration::from_secs(60),
        "both workers to drop the cancelled task",
        || {
            workers
                .iter()
                .all(|w| count(&w.log_text(), "task cancelled") == 1)
        },
    );
    eprintln!(
        "cancel while denoising: both workers stopped {:.2} s after the cancel",
        cancelled_at.elapsed().as_secs_f64()
    );
    wait_until(
        Duration::from_secs(60),
        "the next render to succeed",
        || get_json(&addr, &next)["state"] == "succeeded",
    );
    eprintln!(
        "cancel: the next render finished {:.2} s after the cancel",
        cancelled_at.elapsed().as_secs_f64()
    );
    let location = get_json(&addr, &long)["output_uri"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!Path::new(&location).join("manifest.json").exists());
    // The cancelled render's workers dropped it: no step of it is reported any more.
    let done = get_json(&addr, &long)["progress"]["window_steps_done"].clone();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        get_json(&addr, &long)["progress"]["window_steps_done"],
        done
    );
}

/// The object store, then etcd, restarted mid-render: the workers' and the coordinator's calls
/// wait for them (retries with backoff), and the render completes, bit-identical.
#[test]
fn s3_then_etcd_restart_mid_render() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let steps = 40;
    let expected = reference(dir, steps);
    let mut etcd = Etcd::start(dir);
    let mut s3 = PersistentS3::start(dir, "farm");
    let env = s3.env();
    let (c, addr) = coordinator(
        dir,
        "coordinator",
        &[
            "--etcd",
            &etcd.endpoint(),
            "--store",
            "s3://farm/renders",
            "--checkpoint-every",
            "2",
        ],
        &env,
    );
    let _workers: Vec<Proc> = (0..2)
        .map(|i| worker(dir, &format!("w{i}"), &addr, &env))
        .collect();
    wait_until(Duration::from_secs(60), "2 workers to register", || {
        count(&c.log_text(), "worker registered") == 2
    });
    let mut submit = submit_wait(dir, &addr, steps, &env);
    let id = first_line(&mut submit, Duration::from_secs(30))
        .trim()
        .to_string();
    wait_denoising(&addr, &id, 3 * 3);
    // Down for three seconds while checkpoints are being written, then back with its objects.
    s3.restart(Duration::from_secs(3));
    let s3_log = s3.proc.as_ref().unwrap().log_text();
    assert!(
        s3_log.contains("requests replayed") && !s3_log.contains("(0 requests"),
        "the restarted S3 server holds the render's objects: {s3_log}"
    );
    let progressed = std::panic::catch_unwind(|| wait_denoising(&addr, &id, 3 * 15));
    assert!(
        progressed.is_ok(),
        "no progress after the S3 restart:\n{}",
        logs(dir)
    );
    etcd.restart();
    let status = submit.wait_exit(Duration::from_secs(300));
    assert!(
        status.success(),
        "submit --wait: {}\n{}",
        submit.log_text(),
        logs(dir)
    );
    assert_eq!(get_json(&addr, &id)["state"], "succeeded");
    let latents = f32s(&s3.get("farm", &format!("renders/jobs/{id}/latents.safetensors")));
    assert!(same_bits(&latents, &expected), "latents differ");
    let log = submit.log_text();
    eprintln!(
        "s3 and etcd restarts: {} rollback(s)",
        count(&log, "rolled back")
    );
}

fn list_page(coordinators: &str, size: u32, token: &str) -> (Vec<String>, String) {
    let size = size.to_string();
    let mut args = vec![
        "list",
        "--coordinator",
        coordinators,
        "--json",
        "--page-size",
        &size,
    ];
    if !token.is_empty() {
        args.extend(["--page-token", token]);
    }
    let o = longtake(&args, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let ids = v["renders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    (ids, v["next_page_token"].as_str().unwrap().to_string())
}

/// ListRenders pages started on one leader continue on the next: the page token names a stored
/// record (creation time and id), so after a failover the pages neither skip nor repeat a render.
#[test]
fn list_pages_continue_across_a_failover() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let etcd = Etcd::start(dir);
    let out = dir.join("out");
    let mut replicas: Vec<Option<Proc>> = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..2 {
        let (p, a) = coordinator(
            dir,
            &format!("c{i}"),
            &[
                "--etcd",
                &etcd.endpoint(),
                "--store",
                out.to_str().unwrap(),
                "--leader-ttl",
                "2",
            ],
            &[],
        );
        replicas.push(Some(p));
        addrs.push(a);
    }
    let all = addrs.join(",");
    let leader = || {
        replicas.iter().position(|p| {
            p.as_ref()
                .is_some_and(|p| p.log_text().contains("elected leader"))
        })
    };
    wait_until(Duration::from_secs(30), "a leader", || leader().is_some());
    let first = leader().unwrap();
    // No workers: the renders stay queued.
    let mut submitted = Vec::new();
    for i in 0..5 {
        let o = longtake(
            &[
                "submit",
                "--model",
                "builtin:smoke",
                "--coordinator",
                &all,
                "--prompt",
                &format!("render {i}"),
                "--num-frames",
                "5",
            ],
            &[],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        submitted.push(String::from_utf8_lossy(&o.stdout).trim().to_string());
    }
    let (page1, token) = list_page(&all, 2, "");
    assert_eq!(page1.len(), 2);
    assert!(!token.is_empty());
    replicas[first] = None; // SIGKILL the leader
    wait_until(Duration::from_secs(10), "the standby to lead", || {
        replicas[1 - first]
            .as_ref()
            .unwrap()
            .log_text()
            .contains("elected leader")
    });
    let (page2, token) = list_page(&all, 2, &token);
    let (page3, token) = list_page(&all, 2, &token);
    assert!(token.is_empty(), "three pages hold five renders");
    let paged: Vec<String> = [page1, page2, page3].concat();
    // Newest first, each render once.
    let mut newest_first = submitted.clone();
    newest_first.reverse();
    assert_eq!(paged, newest_first);
}

/// Cancel while decoding: the decode stops between chunks, no video or manifest is written, and
/// the worker takes the next render.
#[test]
fn cancel_stops_the_decode() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let out = dir.join("out");
    let (c, addr) = coordinator(dir, "coordinator", &["--store", out.to_str().unwrap()], &[]);
    let w = worker(dir, "w0", &addr, &[]);
    wait_until(Duration::from_secs(60), "the worker to register", || {
        count(&c.log_text(), "worker registered") == 1
    });
    // A minute of frames with one step: the decode is most of the render.
    let o = longtake(
        &[
            "submit",
            "--model",
            "builtin:smoke",
            "--coordinator",
            &addr,
            "--prompt",
            "a long decode",
            "--duration",
            "60",
            "--steps",
            "1",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
    wait_until(
        Duration::from_secs(120),
        "the render to be decoding",
        || {
            let r = get_json(&addr, &id);
            r["state"] == "decoding" && r["progress"]["frames_done"].as_u64().unwrap_or(0) > 0
        },
    );
    let cancelled_at = Instant::now();
    let o = longtake(&["cancel", "--coordinator", &addr, "--json", &id], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["state"], "cancelled");
    wait_until(
        Duration::from_secs(60),
        "the worker to drop the decode",
        || count(&w.log_text(), "task cancelled") == 1,
    );
    eprintln!(
        "cancel while decoding: the worker stopped {:.2} s after the cancel, at {} of 961 frames",
        cancelled_at.elapsed().as_secs_f64(),
        get_json(&addr, &id)["progress"]["frames_done"]
    );
    let location = PathBuf::from(get_json(&addr, &id)["output_uri"].as_str().unwrap());
    assert!(!location.join("manifest.json").exists());
    assert!(!location.join("video.mp4").exists());
    assert_eq!(get_json(&addr, &id)["state"], "cancelled");
    // The worker is free: a new render runs to the end on it.
    let o = longtake(
        &[
            "submit",
            "--model",
            "builtin:smoke",
            "--coordinator",
            &addr,
            "--prompt",
            "next",
            "--num-frames",
            "5",
            "--steps",
            "1",
            "--wait",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// The worker decoding a render is killed: the decode is sent again to the other worker, the
/// denoising is not repeated, and the result is bit-identical.
#[test]
fn a_lost_decode_keeps_the_denoising() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let expected = reference(dir, 4);
    let out = dir.join("out");
    let (c, addr) = coordinator(
        dir,
        "coordinator",
        &["--store", out.to_str().unwrap(), "--lease-ttl", "1.5"],
        &[],
    );
    let mut w: Vec<Option<Proc>> = (0..2)
        .map(|i| Some(worker(dir, &format!("w{i}"), &addr, &[])))
        .collect();
    wait_until(Duration::from_secs(60), "2 workers to register", || {
        count(&c.log_text(), "worker registered") == 2
    });
    let mut submit = submit_wait(dir, &addr, 4, &[]);
    let id = first_line(&mut submit, Duration::from_secs(30))
        .trim()
        .to_string();
    let mut decoder = String::new();
    wait_until(Duration::from_secs(120), "the decode to start", || {
        let r = get_json(&addr, &id);
        // "decoding on w0" when the task is sent, then "w0: 16/161 frames" as it progresses.
        let message = r["progress"]["message"].as_str().unwrap_or("").to_string();
        let name = match message.strip_prefix("decoding on ") {
            Some(n) => n.to_string(),
            None => message.split(':').next().unwrap_or("").to_string(),
        };
        if r["state"] == "decoding" && (name == "w0" || name == "w1") {
            decoder = name;
            return true;
        }
        false
    });
    let victim = if decoder == "w0" { 0 } else { 1 };
    w[victim] = None; // SIGKILL mid-decode
    let status = submit.wait_exit(Duration::from_secs(300));
    assert!(status.success(), "submit --wait: {}", submit.log_text());
    let log = submit.log_text();
    let after = log
        .split("rolled back to the decode")
        .nth(1)
        .unwrap_or_else(|| panic!("no decode rollback in the events:\n{log}"));
    assert!(
        !after.contains("denoising"),
        "the denoising ran again after the decode was lost:\n{log}"
    );
    let r = get_json(&addr, &id);
    let location = r["output_uri"].as_str().unwrap();
    let latents = f32s(&std::fs::read(Path::new(location).join("latents.safetensors")).unwrap());
    assert!(
        same_bits(&latents, &expected),
        "latents differ after the decode rollback"
    );
    assert!(Path::new(location).join("video.mp4").exists());
}

/// etcd restarted mid-render, then a worker stopped with SIGTERM: the leader keeps its lease
/// across the restart, the worker leaves the pool at once (its render resumes on the other
/// worker from the last checkpoint) and exits cleanly, and the render completes bit-identical.
#[test]
fn etcd_restart_and_a_worker_leaving() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let steps = 200;
    let expected = reference(dir, steps);
    let mut etcd = Etcd::start(dir);
    let out = dir.join("out");
    let (c, addr) = coordinator(
        dir,
        "coordinator",
        &[
            "--etcd",
            &etcd.endpoint(),
            "--store",
            out.to_str().unwrap(),
            "--checkpoint-every",
            "5",
        ],
        &[],
    );
    let mut w: Vec<Proc> = (0..2)
        .map(|i| worker(dir, &format!("w{i}"), &addr, &[]))
        .collect();
    wait_until(Duration::from_secs(60), "2 workers to register", || {
        count(&c.log_text(), "worker registered") == 2
    });
    let mut submit = submit_wait(dir, &addr, steps, &[]);
    let id = first_line(&mut submit, Duration::from_secs(30))
        .trim()
        .to_string();
    wait_denoising(&addr, &id, 3);
    etcd.restart();
    let progressed = std::panic::catch_unwind(|| wait_denoising(&addr, &id, 3 * 20));
    assert!(
        progressed.is_ok(),
        "no progress after the etcd restart:\n{}",
        logs(dir)
    );
    w[1].signal("TERM");
    let status = w[1].wait_exit(Duration::from_secs(30));
    assert!(
        status.success(),
        "the worker exits 0 on SIGTERM: {}",
        w[1].log_text()
    );
    let status = submit.wait_exit(Duration::from_secs(300));
    assert!(status.success(), "submit --wait: {}", submit.log_text());
    let log = submit.log_text();
    assert!(log.contains("left the pool"), "{log}");
    assert!(
        resumed_after(&log) >= 20,
        "resumed from a checkpoint:\n{log}"
    );
    assert!(
        !c.log_text().contains("deposed"),
        "the leader kept its lease across the etcd restart:\n{}",
        c.log_text()
    );
    let r = get_json(&addr, &id);
    let location = r["output_uri"].as_str().unwrap();
    let latents = f32s(&std::fs::read(Path::new(location).join("latents.safetensors")).unwrap());
    assert!(same_bits(&latents, &expected), "latents differ");
}

/// A request's `--noise-file` goes to the object store, never into etcd: the render through the
/// farm equals the single-process render with the same noise, and etcd holds only small
/// records.
#[test]
fn initial_noise_stays_out_of_etcd() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // 10 s at 64×64: [1, 16, 41, 8, 8].
    let shape = [1usize, 16, 41, 8, 8];
    let n: usize = shape.iter().product();
    let noise: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let noise_file = dir.join("noise.safetensors");
    longtake_model::io::write_f32(&noise_file, &[("noise", &shape, &noise)]).unwrap();
    let noise_arg = noise_file.to_str().unwrap().to_string();
    let o = longtake(
        &[
            "render",
            "--model",
            "builtin:smoke",
            "--prompt",
            "fog",
            "--duration",
            "10",
            "--steps",
            "3",
            "--noise-file",
            &noise_arg,
            "--out",
            dir.join("reference").to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let location = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let expected = f32s(&std::fs::read(Path::new(&location).join("latents.safetensors")).unwrap());
    let etcd = Etcd::start(dir);
    let out = dir.join("out");
    let (_c, addr) = coordinator(
        dir,
        "coordinator",
        &["--etcd", &etcd.endpoint(), "--store", out.to_str().unwrap()],
        &[],
    );
    let _w = worker(dir, "w0", &addr, &[]);
    let o = longtake(
        &[
            "submit",
            "--model",
            "builtin:smoke",
            "--coordinator",
            &addr,
            "--wait",
            "--prompt",
            "fog",
            "--duration",
            "10",
            "--steps",
            "3",
            "--noise-file",
            &noise_arg,
        ],
        &[],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let location = String::from_utf8_lossy(&o.stdout)
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_string();
    let latents = f32s(&std::fs::read(Path::new(&location).join("latents.safetensors")).unwrap());
    assert!(
        same_bits(&latents, &expected),
        "latents differ from the single-process render"
    );
    assert!(
        Path::new(&location)
            .join("inputs/initial_noise.safetensors")
            .exists()
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let kvs = rt.block_on(async {
        use longtake_coordinator::store::JobStore;
        let client =
            longtake_coordinator::etcd::Etcd::connect(&[etcd.endpoint()], "longtake/").unwrap();
        longtake_coordinator::etcd::EtcdStore::new(client)
            .list("")
            .await
            .unwrap()
    });
    assert!(!kvs.is_empty());
    for (key, v) in kvs {
        assert!(key.starts_with("jobs/") || key == "leader", "{key}");
        assert!(
            v.value.len() < 64 * 1024,
            "{key} holds {} bytes",
            v.value.len()
        );
    }
}

/// A worker with `--tp 2` on CPU ranks (the transformer sharded over two threads, driven from
/// the worker's compute thread, as a GPU group is) renders the request; the latents equal the
/// single-process render's to f32 rounding (the sharded matrix products add in another order).
#[test]
fn a_tensor_parallel_worker_group_renders() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let expected = reference(dir, 4);
    let etcd = Etcd::start(dir);
    let s3 = S3::start(dir, "farm");
    let env = s3.env();
    let (c, addr) = coordinator(
        dir,
        "coordinator",
        &["--etcd", &etcd.endpoint(), "--store", "s3://farm/renders"],
        &env,
    );
    let _w = spawn(
        dir,
        "tp2",
        &exe(),
        &[
            "worker",
            "--coordinator",
            &addr,
            "--name",
            "tp2",
            "--device",
            "cpu",
            "--tp",
            "2",
            "--threads",
            "1",
        ],
        &env,
    );
    wait_until(
        Duration::from_secs(60),
        "the tp 2 worker to register",
        || count(&c.log_text(), "worker registered") == 1,
    );
    let mut submit = submit_wait(dir, &addr, 4, &env);
    let (id, _) = submit_outcome(&mut submit);
    let latents = f32s(&s3.get("farm", &format!("renders/jobs/{id}/latents.safetensors")));
    assert_eq!(latents.len(), expected.len());
    let (num, den) = latents
        .iter()
        .zip(&expected)
        .fold((0f64, 0f64), |(n, d), (a, b)| {
            (n + (*a as f64 - *b as f64).powi(2), d + (*b as f64).powi(2))
        });
    let err = (num / den).sqrt();
    eprintln!("tp 2 worker vs single-process render: relative L2 {err:.3e}");
    assert!(err <= 1e-5, "relative L2 {err:.3e}\n{}", logs(dir));
    let manifest: serde_json::Value =
        serde_json::from_slice(&s3.get("farm", &format!("renders/jobs/{id}/manifest.json")))
            .unwrap();
    assert_eq!(
        manifest_workers(&manifest),
        ["tp2".to_string()].into_iter().collect()
    );
}
