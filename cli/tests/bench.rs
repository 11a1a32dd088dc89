//! `qmesh bench --json` through real sidecars: the output parses and its figures are sane.

#![allow(clippy::unwrap_used)]

use std::{path::PathBuf, process::Command};

fn qmesh(args: &[&str]) -> serde_json::Value {
    let qmesh = PathBuf::from(env!("CARGO_BIN_EXE_qmesh"));
    let out = Command::new(&qmesh)
        .args(args)
        .env("QMESH_SIDECAR_BIN", qmesh.with_file_name("qmesh-sidecar"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qmesh {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn bench_json_reports_sane_figures() {
    let r = qmesh(&["bench", "--msgs", "3000", "--size", "512", "--json"]);
    assert_eq!(r["msgs"], 3000);
    let rate = r["msgs_per_sec"].as_f64().unwrap();
    assert!(rate > 100.0, "{r}");
    let mb = r["mb_per_sec"].as_f64().unwrap();
    assert!(
        (mb - rate * 512.0 / 1e6).abs() < 1e-6 * rate.max(1.0),
        "{r}"
    );
    for key in ["publish_latency_us", "e2e_latency_us"] {
        let l = &r[key];
        let (p50, p90, p99, p999, max) = (
            l["p50"].as_u64().unwrap(),
            l["p90"].as_u64().unwrap(),
            l["p99"].as_u64().unwrap(),
            l["p999"].as_u64().unwrap(),
            l["max"].as_u64().unwrap(),
        );
        assert!(
            p50 <= p90 && p90 <= p99 && p99 <= p999 && p999 <= max,
            "{key}: {l}"
        );
        assert!(max > 0 && max < 60_000_000, "{key}: {l}");
    }
    let rss = r["sidecar_rss_bytes"].as_u64().unwrap();
    assert!(rss > 1_000_000 && rss < 200_000_000, "{r}");
    assert!(r["sidecar_cpu_seconds"].as_f64().unwrap() > 0.0, "{r}");

    let b = qmesh(&["bench", "--msgs", "3000", "--baseline", "--json"]);
    assert_eq!(b["baseline"], true);
    assert!(b["msgs_per_sec"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_scheduled_reports_every_message_fired_and_none_early() {
    let r = qmesh(&[
        "bench",
        "--scheduled",
        "2s",
        "--scheduled-after",
        "3s",
        "--msgs",
        "2000",
        "--size",
        "64",
        "--json",
    ]);
    assert_eq!(r["msgs"], 2000, "{r}");
    assert_eq!(r["early"], 0, "none may fire before its time: {r}");
    let l = &r["lateness_us"];
    let (p50, p99, max) = (
        l["p50"].as_u64().unwrap(),
        l["p99"].as_u64().unwrap(),
        l["max"].as_u64().unwrap(),
    );
    assert!(p50 <= p99 && p99 <= max, "{l}");
    assert!(r["out_of_order"].as_u64().is_some(), "{r}");
    assert!(
        r["owner_rss_peak_bytes"].as_u64().unwrap() > 1_000_000,
        "{r}"
    );
}

#[test]
fn completions_cover_every_command() {
    let out = Command::new(env!("CARGO_BIN_EXE_qmesh"))
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let script = String::from_utf8_lossy(&out.stdout);
    for command in ["demo", "pub", "sub", "bench", "completions"] {
        assert!(
            script.contains(command),
            "{command} missing from the completions"
        );
    }
}
