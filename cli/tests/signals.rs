//! `qmesh pub` and `qmesh sub` as a container's main process (PID 1, as in the example image):
//! the kernel gives PID 1 no default action for SIGTERM, so a command that does not handle it
//! ignores the kubelet's SIGTERM and the pod takes its whole grace period to go. Each runs here as
//! PID 1 of a PID namespace of its own (`unshare`, root) against a sidecar address that accepts
//! connections and never answers, and must end soon after SIGTERM.

#![allow(clippy::unwrap_used)]

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Waits up to `within` for `child` to end.
fn ended(child: &mut Child, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The host PID of the namespace's PID 1: `unshare --fork`'s only child.
fn pid_one(unshare: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let children = std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children"))
            .unwrap_or_default();
        if let Some(pid) = children.split_whitespace().next() {
            return pid.parse().unwrap();
        }
        assert!(Instant::now() < deadline, "unshare started no child");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigterm_ends(args: &[&str]) {
    // A "sidecar" that takes connections and never says a word.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let (connected, accepted) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        for conn in silent.incoming() {
            kept.push(conn);
            let _ = connected.send(());
        }
    });
    let mut child = Command::new("unshare")
        .args(["--pid", "--fork", "--kill-child"])
        .arg(env!("CARGO_BIN_EXE_qmesh"))
        .args(args)
        .args(["--addr", &addr])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("unshare (util-linux) runs, as root");
    let pid = pid_one(child.id());
    accepted
        .recv_timeout(Duration::from_secs(10))
        .expect("qmesh connects to the sidecar address");
    assert!(
        child.try_wait().unwrap().is_none(),
        "still waiting on the silent sidecar"
    );
    let killed = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let stopped = ended(&mut child, Duration::from_secs(5));
    if !stopped {
        let _ = child.kill();
    }
    assert!(
        stopped,
        "qmesh {} as PID 1 ignored SIGTERM (a pod would wait out its grace period)",
        args.join(" ")
    );
}

#[test]
fn qmesh_pub_as_pid_1_ends_on_sigterm() {
    sigterm_ends(&["pub", "orders", "hello", "--count", "0", "--rate", "5"]);
}

#[test]
fn qmesh_sub_as_pid_1_ends_on_sigterm() {
    sigterm_ends(&["sub", "billing"]);
}
