//! The Helm chart, offline: `helm/check` lints it, renders it with the default values and with
//! every file of `helm/longtake/ci/` (a GPU + TLS + autoscaling farm, a KEDA one), validates every
//! manifest strictly against the Kubernetes 1.32 schemas, and checks that bad values are refused
//! with a message naming them. `deploy/compose.yaml` is validated by Docker Compose's own
//! `config` (no daemon needed).

mod support;

use std::path::Path;
use std::process::Command;

#[test]
fn the_chart_lints_renders_and_validates() {
    let python = support::helm_python();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let o = Command::new(python)
        .arg(root.join("helm/check"))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    eprintln!("{out}{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "helm/check failed");
    assert!(out.contains("every check holds"));
}

#[test]
fn the_compose_file_validates() {
    let compose = support::docker_compose();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let o = Command::new(&compose)
        .arg("-f")
        .arg(root.join("deploy/compose.yaml"))
        .args(["config", "-q"])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "docker compose config: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Both profiles, so Grafana and the collector are checked too.
    let o = Command::new(&compose)
        .arg("-f")
        .arg(root.join("deploy/compose.yaml"))
        .args(["--profile", "observability", "config", "--services"])
        .output()
        .unwrap();
    let services = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for s in [
        "etcd",
        "s3",
        "coordinator-a",
        "coordinator-b",
        "worker-1",
        "worker-2",
        "prometheus",
        "grafana",
        "otel-collector",
    ] {
        assert!(services.lines().any(|l| l == s), "{s} missing: {services}");
    }
    // A broken file is refused.
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("compose.yaml");
    std::fs::write(
        &bad,
        "services:\n  x:\n    image: a\n    network_mode: [host]\n",
    )
    .unwrap();
    let o = Command::new(&compose)
        .arg("-f")
        .arg(&bad)
        .args(["config", "-q"])
        .output()
        .unwrap();
    assert!(!o.status.success());
}
