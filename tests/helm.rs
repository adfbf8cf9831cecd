//! The Helm chart, offline: `helm/check` lints it, renders it with the default values and with
//! every file of `helm/longtake/ci/` (a GPU + TLS + autoscaling farm, a KEDA one), validates every
//! manifest strictly against the Kubernetes 1.32 schemas, and checks that bad values are refused
//! with a message naming them.

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
