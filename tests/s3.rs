//! `longtake render --store s3://...` against a real S3-compatible server (moto, from PyPI,
//! installed into `target/test-tools/` on first use and started on a free port).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The moto server binary, installed with pip into a venv under target/ when missing.
fn moto() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-tools/moto-venv");
    let bin = venv.join("bin/moto_server");
    if !bin.exists() {
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success())
            && Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet", "moto[server]==5.2.5"])
                .status()
                .is_ok_and(|s| s.success());
        assert!(
            ok && bin.exists(),
            "could not install moto[server] 5.2.5 into {} (needs python3 and PyPI)",
            venv.display()
        );
    }
    bin
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http(method: &str, port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn render_to_s3_compatible_storage() {
    let port = free_port();
    let _server = Server(
        Command::new(moto())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "moto did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        http("PUT", port, "/renders").starts_with("HTTP/1.1 200"),
        "create bucket"
    );
    let tmp = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_longtake"))
        .args([
            "render",
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
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1")
        .env("LONGTAKE_S3_ENDPOINT", format!("http://127.0.0.1:{port}"))
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
    let listing = http(
        "GET",
        port,
        &format!("/renders?list-type=2&prefix=studio-a/jobs/{id}/"),
    );
    for key in ["manifest.json", "video.mp4", "latents.sa"] {
        assert!(
            listing.contains(&format!("studio-a/jobs/{id}/{key}")),
            "{key} missing from {listing}"
        );
    }
    // No local render directory is written when the output is S3.
    assert!(!tmp.path().join("renders").exists());
}
