//! `longtake render --store s3://...` against a real S3-compatible server (moto, from PyPI,
//! installed into `target/test-tools/` on first use and started on a free port).

mod support;

use std::process::Command;

use support::S3;

#[test]
fn render_to_s3_compatible_storage() {
    let logs = tempfile::tempdir().unwrap();
    let s3 = S3::start(logs.path(), "renders");
    let port = s3.port;
    let tmp = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_longtake"))
        .args([
            "render",
            "--model",
            "builtin:smoke",
            "--prompt",
            "a harbour",
            "--num-frames",
            "33",
            "--seed",
            "4",
            "--store",
            "s3://renders/studio-a",
        ])
        .current_dir(tmp.path())
        .env("XDG_CACHE_HOME", tmp.path().join("cache"))
        .envs(s3.env())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let location = stdout.lines().last().unwrap().trim().to_string();
    assert!(
        location.starts_with("s3://renders/studio-a/jobs/"),
        "{location}"
    );
    let id = location.rsplit('/').next().unwrap();
    let (_, listing) = support::http(
        "GET",
        port,
        &format!("/renders?list-type=2&prefix=studio-a/jobs/{id}/"),
    );
    let listing = String::from_utf8_lossy(&listing);
    for key in ["manifest.json", "video.mp4", "latents.sa"] {
        assert!(
            listing.contains(&format!("studio-a/jobs/{id}/{key}")),
            "{key} missing from {listing}"
        );
    }
    // No local render directory is written when the output is S3.
    assert!(!tmp.path().join("renders").exists());
}
