//! One process per log directory: a second open of a log in use fails with a message that names
//! the directory, whether in one process or from a second `qmesh-sidecar` on the same `--data-dir`;
//! the lock goes with the log (and with the process, even on `kill -9`).

#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};

use qmesh_sidecar::store::{DiskLog, StoreConfig};

#[tokio::test]
async fn a_log_in_use_cannot_be_opened_twice() {
    let dir = tempfile::tempdir().unwrap();
    let first = DiskLog::open(StoreConfig::new(dir.path())).unwrap();
    let err = DiskLog::open(StoreConfig::new(dir.path())).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
    assert!(
        err.to_string().contains("in use by another process"),
        "{err}"
    );
    drop(first);
    DiskLog::open(StoreConfig::new(dir.path())).unwrap();
}

#[test]
fn a_second_sidecar_on_the_same_data_dir_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh,
        "apiVersion: qmesh.io/v1alpha1\nkind: Queue\nmetadata: {name: q}\nspec: {}\n---\n\
         apiVersion: qmesh.io/v1alpha1\nkind: Sidecar\nmetadata: {name: a}\n\
         spec: {peerAddress: \"127.0.0.1:1\", grpcAddress: \"127.0.0.1:2\", httpAddress: \"127.0.0.1:3\", adminAddress: \"127.0.0.1:4\"}\n",
    )
    .unwrap();
    let identity = dir.path().join("identity");
    qmesh_tests::mesh::issue_identity(&qmesh_tests::mesh::test_ca().unwrap(), "a", &identity)
        .unwrap();
    let sidecar = |ports: [u16; 4]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_qmesh-sidecar"));
        c.arg("--mesh-file")
            .arg(&mesh)
            .arg("--identity-dir")
            .arg(&identity)
            .args(["--name", "a", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--peer-addr", &format!("127.0.0.1:{}", ports[0])])
            .args(["--grpc-addr", &format!("127.0.0.1:{}", ports[1])])
            .args(["--http-addr", &format!("127.0.0.1:{}", ports[2])])
            .args(["--admin-addr", &format!("127.0.0.1:{}", ports[3])]);
        c
    };
    let mut first = sidecar([0, 0, 0, 0])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the first holds the lock: its log directory and LOCK exist and a probe open fails.
    let log_dir = dir.path().join("data").join("log");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if log_dir.join("LOCK").exists()
            && std::fs::File::open(log_dir.join("LOCK"))
                .unwrap()
                .try_lock()
                .is_err()
        {
            break;
        }
        if let Some(status) = first.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(first.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("the first sidecar exited ({status}): {err}");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the first sidecar never locked its log"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let second = sidecar([0, 0, 0, 0]).output().unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("in use by another process"), "{stderr}");
    let _ = first.kill();
    let _ = first.wait();
}
