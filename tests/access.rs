//! Access to the farm, with real processes on loopback: TLS with a CA made by the test, tenants'
//! bearer tokens (each tenant sees only its renders; limits; reloads), the cluster token and
//! client certificates for workers, the public listener serving only the public API, models
//! only from the catalogue, outputs per tenant, and DeleteRender.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use support::{Proc, first_line, free_port, spawn, wait_until};

const TOKEN_A: &str = "tenant-a-token-0123456789";
const TOKEN_B: &str = "tenant-b-token-0123456789";
const TOKEN_C: &str = "tenant-c-token-0123456789";
const CLUSTER: &str = "cluster-token-0123456789";

fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_longtake"))
}

/// Run `longtake args`; no inherited token or CA.
fn longtake(args: &[&str]) -> Output {
    Command::new(exe())
        .args(args)
        .env_remove("LONGTAKE_TOKEN")
        .env_remove("LONGTAKE_CA_CERT")
        .env_remove("LONGTAKE_CLUSTER_TOKEN")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A CA, and certificates it signed for 127.0.0.1 (server) and for a worker (client): PEM files
/// in `dir` (`ca.pem`, `server.pem`, `server.key`, `worker.pem`, `worker.key`), plus a second,
/// unrelated CA (`other-ca.pem`).
fn make_pki(dir: &Path) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "longtake test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    for (name, sans) in [
        ("server", vec!["127.0.0.1".to_string(), "localhost".into()]),
        ("worker", vec!["worker-1".to_string()]),
    ] {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(sans).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        let cert = p.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
    let other_key = KeyPair::generate().unwrap();
    let mut other = CertificateParams::new(Vec::<String>::new()).unwrap();
    other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let other_cert = other.self_signed(&other_key).unwrap();
    std::fs::write(dir.join("other-ca.pem"), other_cert.pem()).unwrap();
}

fn tenants_file(path: &Path, with_c: bool) {
    let mut tenants = vec![
        serde_json::json!({"name": "studio-a", "tokens": [TOKEN_A],
            "limits": {"concurrent_renders": 1, "max_request_seconds": 30}}),
        serde_json::json!({"name": "studio-b", "tokens": [TOKEN_B]}),
    ];
    if with_c {
        tenants.push(serde_json::json!({"name": "studio-c", "tokens": [TOKEN_C]}));
    }
    // Written whole, then renamed: the coordinator never reads half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::json!({ "tenants": tenants }).to_string()).unwrap();
    std::fs::rename(tmp, path).unwrap();
}

/// A coordinator with TLS, tenants, the cluster token and a separate worker listener:
/// (process, public address, worker address).
fn secure_coordinator(dir: &Path, extra: &[&str]) -> (Proc, String, String) {
    let worker_addr = format!("127.0.0.1:{}", free_port());
    let d = |f: &str| dir.join(f).display().to_string();
    let (cert, key, tenants, store) = (
        d("server.pem"),
        d("server.key"),
        d("tenants.json"),
        d("out"),
    );
    let mut args = vec![
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--worker-listen",
        &worker_addr,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tenants",
        &tenants,
        "--store",
        &store,
    ];
    args.extend_from_slice(extra);
    let mut p = spawn(
        dir,
        "coordinator",
        &exe(),
        &args,
        &[("LONGTAKE_CLUSTER_TOKEN", CLUSTER.to_string())],
    );
    let line = first_line(&mut p, Duration::from_secs(30));
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}; log:\n{}", p.log_text()))
        .to_string();
    (p, addr, worker_addr)
}

fn worker(
    dir: &Path,
    name: &str,
    coordinator: &str,
    args: &[&str],
    env: &[(&str, String)],
) -> Proc {
    let mut all = vec![
        "worker",
        "--coordinator",
        coordinator,
        "--name",
        name,
        "--threads",
        "1",
    ];
    all.extend_from_slice(args);
    spawn(dir, name, &exe(), &all, env)
}

/// A client command against `addr` with the test CA and `token` (none: no token).
fn client(addr: &str, ca: &Path, token: Option<&str>, args: &[&str]) -> Output {
    let ca = ca.display().to_string();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--coordinator", addr, "--ca-cert", &ca, "--timeout", "10"]);
    if let Some(t) = token {
        all.extend(["--token", t]);
    }
    longtake(&all)
}

/// The request every render here makes (10 s unless the caller gives --duration).
const REQUEST: &[&str] = &[
    "--prompt",
    "a lighthouse on a cliff at dusk",
    "--steps",
    "2",
    "--model",
    "builtin:smoke",
];

fn submit(addr: &str, ca: &Path, token: &str, extra: &[&str]) -> Output {
    let mut args = vec!["submit"];
    args.extend_from_slice(REQUEST);
    args.extend_from_slice(extra);
    if !extra.contains(&"--duration") {
        args.extend(["--duration", "10"]);
    }
    client(addr, ca, Some(token), &args)
}

fn refused(o: &Output, reason: &str, text: &str) {
    let e = stderr(o);
    assert!(
        !o.status.success(),
        "expected {reason}, got success: {}",
        stdout(o)
    );
    assert!(
        e.contains(reason) && e.contains(text),
        "expected {reason} with {text:?}, got: {e}"
    );
}

/// Wait until the process's log contains `needle` (at most 60 s).
fn wait_log(p: &Proc, needle: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !p.log_text().contains(needle) {
        assert!(
            std::time::Instant::now() < deadline,
            "{} never logged {needle:?}; its log:\n{}",
            p.name,
            p.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_alive(p: &mut Proc) {
    assert!(
        p.child.try_wait().unwrap().is_none(),
        "{} exited; its log:\n{}",
        p.name,
        p.log_text()
    );
    assert!(!p.log_text().contains("panicked"), "{}", p.log_text());
}

#[test]
fn tenants_tokens_tls_and_the_worker_credential() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_pki(dir);
    tenants_file(&dir.join("tenants.json"), false);
    let ca = dir.join("ca.pem");
    let (mut coord, addr, worker_addr) = secure_coordinator(dir, &[]);

    // Workers without the cluster token, with a wrong one, or at the public listener are
    // refused; none of them registers.
    let ca_arg = ca.display().to_string();
    let tls = ["--ca-cert", ca_arg.as_str()];
    let mut no_token = worker(dir, "w-none", &worker_addr, &tls, &[]);
    let mut wrong = worker(
        dir,
        "w-wrong",
        &worker_addr,
        &tls,
        &[("LONGTAKE_CLUSTER_TOKEN", "not-the-cluster-token-000".into())],
    );
    let mut public = worker(
        dir,
        "w-public",
        &addr,
        &tls,
        &[("LONGTAKE_CLUSTER_TOKEN", CLUSTER.into())],
    );
    wait_log(&no_token, "no credentials");
    wait_log(&wrong, "not this cluster's worker token");
    wait_log(&public, "serves no worker API");
    assert!(
        !coord.log_text().contains("worker registered"),
        "{}",
        coord.log_text()
    );
    for w in [&mut no_token, &mut wrong, &mut public] {
        w.signal("KILL");
    }

    // The public API: no token, a token nobody has, and bad requests.
    let mut args = vec!["submit"];
    args.extend_from_slice(REQUEST);
    refused(
        &client(&addr, &ca, None, &args),
        "UNAUTHENTICATED",
        "no credentials",
    );
    let no_token = client(&addr, &ca, None, &["list"]);
    refused(&no_token, "UNAUTHENTICATED", "Bearer");
    refused(
        &client(&addr, &ca, Some("nobody-has-this-token-00"), &["list"]),
        "PERMISSION_DENIED",
        "not a tenant's token",
    );
    let model_dir = dir.display().to_string();
    let with_path = [
        "submit",
        "--prompt",
        "x",
        "--duration",
        "1",
        "--model",
        &model_dir,
    ];
    refused(
        &client(&addr, &ca, Some(TOKEN_A), &with_path),
        "INVALID_FIELD",
        "not a model of this coordinator's catalogue; allowed: builtin:demo, builtin:smoke",
    );
    refused(
        &submit(&addr, &ca, TOKEN_A, &["--duration", "40"]),
        "LIMIT_REACHED",
        "max_request_seconds",
    );
    // Without the CA the server's certificate is not trusted.
    let untrusted = longtake(&[
        "list",
        "--coordinator",
        &format!("https://{addr}"),
        "--token",
        TOKEN_A,
        "--timeout",
        "2",
    ]);
    assert!(!untrusted.status.success(), "{}", stdout(&untrusted));

    // Tenant a's render waits for a worker; its limit of one open render holds.
    let first = submit(&addr, &ca, TOKEN_A, &["--idempotency-key", "k1"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let id_a = stdout(&first).lines().next().unwrap().trim().to_string();
    refused(
        &submit(&addr, &ca, TOKEN_A, &[]),
        "LIMIT_REACHED",
        "concurrent_renders",
    );
    refused(
        &client(&addr, &ca, Some(TOKEN_A), &["delete", &id_a]),
        "NOT_FINISHED",
        "only a finished render can be deleted",
    );
    // Tenant b cannot see, watch, cancel or delete it, and its own key k1 is its own.
    for cmd in ["get", "watch", "cancel", "delete"] {
        refused(
            &client(&addr, &ca, Some(TOKEN_B), &[cmd, &id_a]),
            "NOT_FOUND",
            &id_a,
        );
    }
    let listed = client(&addr, &ca, Some(TOKEN_B), &["list", "--json"]);
    assert!(listed.status.success(), "{}", stderr(&listed));
    assert_eq!(stdout(&listed).trim(), "[]");
    let b = submit(&addr, &ca, TOKEN_B, &["--idempotency-key", "k1"]);
    assert!(b.status.success(), "{}", stderr(&b));
    let id_b = stdout(&b).lines().next().unwrap().trim().to_string();
    assert_ne!(id_a, id_b);
    let cancelled = client(&addr, &ca, Some(TOKEN_B), &["cancel", &id_b]);
    assert!(cancelled.status.success(), "{}", stderr(&cancelled));

    // A worker with the cluster token, over TLS, renders a's video under a's prefix.
    let _good = worker(
        dir,
        "w-good",
        &worker_addr,
        &tls,
        &[("LONGTAKE_CLUSTER_TOKEN", CLUSTER.into())],
    );
    let watched = client(&addr, &ca, Some(TOKEN_A), &["watch", &id_a]);
    assert!(
        watched.status.success(),
        "{}\n{}",
        stderr(&watched),
        coord.log_text()
    );
    let got = client(&addr, &ca, Some(TOKEN_A), &["get", "--json", &id_a]);
    let render: serde_json::Value = serde_json::from_slice(&got.stdout).unwrap();
    assert_eq!(render["state"], "succeeded", "{render}");
    let output = PathBuf::from(render["output_uri"].as_str().unwrap());
    assert!(
        output.starts_with(dir.join("out/tenants/studio-a/jobs")),
        "{}",
        output.display()
    );
    assert!(output.join("video.mp4").is_file());

    // Deleting removes the outputs and the state.
    let deleted = client(&addr, &ca, Some(TOKEN_A), &["delete", "--json", &id_a]);
    assert!(deleted.status.success(), "{}", stderr(&deleted));
    let d: serde_json::Value = serde_json::from_slice(&deleted.stdout).unwrap();
    assert!(d["objects_deleted"].as_u64().unwrap() >= 2, "{d}");
    assert!(!output.join("video.mp4").exists());
    refused(
        &client(&addr, &ca, Some(TOKEN_A), &["get", &id_a]),
        "NOT_FOUND",
        &id_a,
    );
    // With the render gone, a's limit has room again.
    let again = submit(&addr, &ca, TOKEN_A, &["--idempotency-key", "k2"]);
    assert!(again.status.success(), "{}", stderr(&again));

    // A tenant added to the file is let in without a restart.
    refused(
        &client(&addr, &ca, Some(TOKEN_C), &["list"]),
        "PERMISSION_DENIED",
        "not a tenant's token",
    );
    tenants_file(&dir.join("tenants.json"), true);
    wait_until(Duration::from_secs(20), "tenant c to be let in", || {
        client(&addr, &ca, Some(TOKEN_C), &["list"])
            .status
            .success()
    });
    // A broken file keeps the tenants as they were.
    std::fs::write(dir.join("tenants.json"), "{ broken").unwrap();
    wait_until(
        Duration::from_secs(20),
        "the broken file to be reported",
        || {
            coord
                .log_text()
                .contains("cannot be used; keeping the previous tenants")
        },
    );
    assert!(
        client(&addr, &ca, Some(TOKEN_C), &["list"])
            .status
            .success()
    );
    assert_alive(&mut coord);
}

#[test]
fn workers_with_client_certificates() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_pki(dir);
    tenants_file(&dir.join("tenants.json"), false);
    let ca = dir.join("ca.pem").display().to_string();
    let (mut coord, addr, worker_addr) = secure_coordinator(dir, &["--worker-client-ca", &ca]);
    let d = |f: &str| dir.join(f).display().to_string();
    let env = [("LONGTAKE_CLUSTER_TOKEN", CLUSTER.to_string())];
    // No client certificate: the TLS handshake fails, the worker never registers.
    let bare = worker(dir, "w-bare", &worker_addr, &["--ca-cert", &ca], &env);
    wait_until(
        Duration::from_secs(60),
        "the worker without a certificate to be refused",
        || {
            bare.log_text().contains("cannot reach the coordinator")
                || bare.log_text().contains("not accepted")
        },
    );
    bare.signal("KILL");
    assert!(!coord.log_text().contains("worker registered"));
    // A certificate from the CA: registered, and it renders.
    let (wc, wk) = (d("worker.pem"), d("worker.key"));
    let _w = worker(
        dir,
        "w-cert",
        &worker_addr,
        &["--ca-cert", &ca, "--tls-cert", &wc, "--tls-key", &wk],
        &env,
    );
    let caf = PathBuf::from(&ca);
    let mut args = vec!["submit", "--wait", "--duration", "10"];
    args.extend_from_slice(REQUEST);
    let done = client(&addr, &caf, Some(TOKEN_B), &args);
    assert!(
        done.status.success(),
        "{}\n{}",
        stderr(&done),
        coord.log_text()
    );
    assert!(coord.log_text().contains("worker registered"));
    assert_alive(&mut coord);
}

#[test]
fn finished_renders_expire_after_the_retention_time() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let store = dir.join("out").display().to_string();
    // 0.0005 h = 1.8 s.
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
            "--retention-hours",
            "0.0005",
        ],
        &[],
    );
    let addr = first_line(&mut coord, Duration::from_secs(30))
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_string();
    let _w = worker(dir, "w", &addr, &[], &[]);
    let mut args = vec![
        "submit",
        "--wait",
        "--duration",
        "2",
        "--coordinator",
        &addr,
    ];
    args.extend_from_slice(REQUEST);
    let done = longtake(&args);
    assert!(done.status.success(), "{}", stderr(&done));
    let out = stdout(&done);
    let id = out.lines().next().unwrap().trim().to_string();
    let output = PathBuf::from(out.lines().last().unwrap().trim());
    assert!(
        output.join("manifest.json").is_file(),
        "{}",
        output.display()
    );
    wait_until(Duration::from_secs(30), "the render to expire", || {
        !longtake(&["get", &id, "--coordinator", &addr])
            .status
            .success()
    });
    refused(
        &longtake(&["get", &id, "--coordinator", &addr]),
        "NOT_FOUND",
        &id,
    );
    assert!(!output.join("manifest.json").exists());
    assert!(!output.join("video.mp4").exists());
    assert_alive(&mut coord);
}
