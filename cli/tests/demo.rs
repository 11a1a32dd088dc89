//! `qmesh demo` end to end: real sidecar processes; the summary's counts must add up.

#![allow(clippy::unwrap_used)]

use std::{path::PathBuf, process::Command};

fn sidecar_binary() -> PathBuf {
    let qmesh = PathBuf::from(env!("CARGO_BIN_EXE_qmesh"));
    let sidecar = qmesh.with_file_name("qmesh-sidecar");
    assert!(
        sidecar.is_file(),
        "{} is missing: build it with `cargo build --bin qmesh-sidecar` (the workspace test run does)",
        sidecar.display()
    );
    sidecar
}

#[test]
fn demo_shows_fan_out_competing_consumers_the_rate_limit_and_a_dead_letter() {
    let out = Command::new(env!("CARGO_BIN_EXE_qmesh"))
        .args(["demo", "--orders", "120", "--billing-rate", "60"])
        .env("QMESH_SIDECAR_BIN", sidecar_binary())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "demo failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |prefix: &str| -> Vec<String> {
        stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting with {prefix:?}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    // Fan-out: analytics got every message once.
    assert_eq!(line("analytics")[2], "121");
    // Competing consumers: the two billing consumers share 120 good orders + 3 poison deliveries.
    let (b1, b2): (u32, u32) = (
        line("billing         billing-1")[2].parse().unwrap(),
        line("billing         billing-2")[2].parse().unwrap(),
    );
    assert_eq!(b1 + b2, 123, "billing deliveries: {b1} + {b2}");
    assert!(b1 >= 30 && b2 >= 30, "fair share: {b1} / {b2}");
    // The poison message reached the dead-letter queue with its reason.
    assert_eq!(line("dlq-inspector")[2], "1");
    let dead = line("dead letter").join(" ");
    assert!(
        dead.contains("order-60 from orders/billing after 3 deliveries"),
        "{dead}"
    );
    // The rate limit held within ±10%.
    let rate: f64 = line("billing rate")[2].parse().unwrap();
    assert!((54.0..=66.0).contains(&rate), "billing rate {rate}");
}
