//! `longtake loadgen` against a local farm of real processes: etcd, an S3-compatible server
//! (moto), two coordinator replicas and two CPU workers. The leader is killed in the middle of
//! the load; every render loadgen saw accepted must be in etcd afterwards, counted straight from
//! etcd's own HTTP gateway, with none twice.
//!
//! Two loads of the same rate and length, with different idempotency-key prefixes: one
//! undisturbed (its submit latencies are the farm's), then one through a leader kill. Default:
//! 50 submissions/s for 10 s each. `LONGTAKE_LOADGEN_FULL=1` runs the full check, 100/s for 60 s
//! each (`LONGTAKE_LOADGEN_FULL=1 cargo test --release --test loadgen -- --nocapture` prints both
//! reports).

mod support;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use support::{Etcd, Proc, S3, first_line, spawn, wait_until};

fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_longtake"))
}

fn b64(bytes: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// How many keys start with `prefix`, asked of etcd's JSON gateway (`/v3/kv/range`,
/// count_only), independently of longtake's own client.
fn etcd_count(port: u16, prefix: &str) -> u64 {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().unwrap() += 1;
    let body = format!(
        r#"{{"key":"{}","range_end":"{}","count_only":true}}"#,
        b64(prefix.as_bytes()),
        b64(&end)
    );
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "POST /v3/kv/range HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let json = &out[out.find("\r\n\r\n").expect("an HTTP response") + 4..];
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    // int64 fields come as strings; an empty range leaves "count" out.
    v["count"].as_str().map(|c| c.parse().unwrap()).unwrap_or(0)
}

#[test]
fn loadgen_through_a_leader_kill_loses_no_render() {
    let full = std::env::var("LONGTAKE_LOADGEN_FULL").is_ok_and(|v| v == "1");
    let (rate, seconds) = if full { ("100", "60") } else { ("50", "10") };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let etcd = Etcd::start(dir);
    let s3 = S3::start(dir, "farm");
    let env = s3.env();
    let mut coords: Vec<Option<Proc>> = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..2 {
        let mut p = spawn(
            dir,
            &format!("c{i}"),
            &exe(),
            &[
                "coordinator",
                "--listen",
                "127.0.0.1:0",
                "--etcd",
                &etcd.endpoint(),
                "--store",
                "s3://farm/renders",
                "--leader-ttl",
                "2",
            ],
            &env,
        );
        let line = first_line(&mut p, Duration::from_secs(30));
        addrs.push(
            line.trim()
                .strip_prefix("listening on ")
                .unwrap()
                .to_string(),
        );
        coords.push(Some(p));
        if i == 0 {
            wait_until(Duration::from_secs(30), "the first replica to lead", || {
                coords[0]
                    .as_ref()
                    .unwrap()
                    .log_text()
                    .contains("elected leader")
            });
        }
    }
    let all = addrs.join(",");
    // The workers run at a lower CPU priority: on one machine they would otherwise take both
    // cores from the control plane being measured (on a farm they have machines of their own).
    let exe_path = exe().display().to_string();
    let mut workers: Vec<Proc> = (0..2)
        .map(|i| {
            spawn(
                dir,
                &format!("w{i}"),
                std::path::Path::new("nice"),
                &[
                    "-n",
                    "10",
                    &exe_path,
                    "worker",
                    "--coordinator",
                    &all,
                    "--name",
                    &format!("w{i}"),
                    "--threads",
                    "1",
                ],
                &env,
            )
        })
        .collect();
    let run_load = |name: &str, prefix: &str, kill: Option<&mut Option<Proc>>| -> u64 {
        let mut load = spawn(
            dir,
            name,
            &exe(),
            &[
                "loadgen",
                "--coordinator",
                &all,
                "--rate",
                rate,
                "--duration",
                seconds,
                "--seed",
                "3",
                "--key-prefix",
                prefix,
                "--model",
                "builtin:smoke",
                "--steps",
                "1",
                "--lengths",
                "1:1",
                "--json",
            ],
            &env,
        );
        if let Some(leader) = kill {
            // The leader dies in the middle of the arrivals.
            std::thread::sleep(Duration::from_secs(seconds.parse::<u64>().unwrap() / 2));
            leader.as_ref().unwrap().signal("KILL");
            *leader = None;
        }
        let status = load.wait_exit(Duration::from_secs(seconds.parse::<u64>().unwrap() + 120));
        let mut out = String::new();
        load.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        assert!(status.success(), "{name}: {}\n{out}", load.log_text());
        let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        eprintln!("{name}: {}", serde_json::to_string_pretty(&report).unwrap());
        let submitted = report["submitted"].as_u64().unwrap();
        let accepted = report["accepted"].as_u64().unwrap();
        assert_eq!(accepted, submitted, "every submission accepted: {report}");
        assert_eq!(
            report["found_afterwards"].as_u64().unwrap(),
            accepted,
            "{report}"
        );
        accepted
    };
    // First undisturbed (its submit latencies are the farm's), then through a leader kill.
    let steady = run_load("loadgen-steady", "steady", None);
    let (first, rest) = coords.split_at_mut(1);
    let through_kill = run_load("loadgen-kill", "kill", Some(&mut first[0]));
    let accepted = steady + through_kill;
    let _ = rest;
    // Counted in etcd: every accepted render once, nothing else.
    let stored = etcd_count(etcd.client_port, "longtake/jobs/");
    assert_eq!(stored, accepted, "job records in etcd vs accepted renders");
    // No process restarted or died besides the one killed.
    let survivor = coords[1].as_mut().unwrap();
    assert!(
        survivor.child.try_wait().unwrap().is_none(),
        "{}",
        survivor.log_text()
    );
    assert!(survivor.log_text().contains("elected leader"));
    for w in &mut workers {
        assert!(w.child.try_wait().unwrap().is_none(), "{}", w.log_text());
    }
    // Also the same count through longtake's own API (all pages).
    let o = Command::new(exe())
        .args(["list", "--coordinator", &all, "--json"])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(listed.len() as u64, accepted);
}
