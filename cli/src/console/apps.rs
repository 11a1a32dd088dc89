//! Where the console finds the app API of a `qmesh run` sidecar. A sidecar's `Hello` names only its
//! peer address, so `qmesh run` leaves a small record beside the local CA it trusts —
//! `<ca dir>/sidecars/<namespace>.<name>.json` with the addresses its sidecar bound — and removes it
//! when it stops. `qmesh dev` reads these records and believes one only while a sidecar of that
//! namespace and name is in its mesh with that very peer address (a stale record, or one of a
//! sidecar joined to another local control plane sharing the CA, is ignored).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// Most records read from the registry (a local mesh has far fewer).
const MAX_RECORDS: usize = 10_000;
/// Largest record file read.
const MAX_RECORD_BYTES: u64 = 4096;

/// The addresses of one `qmesh run` sidecar.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct AppRecord {
    /// Namespace it joined.
    pub namespace: String,
    /// Its name (the app id).
    pub name: String,
    /// Peer API, as announced to the control plane.
    pub peer: SocketAddr,
    /// App gRPC API (Browse / Redrive).
    pub grpc: SocketAddr,
    /// App HTTP API.
    pub http: SocketAddr,
    /// The `qmesh run` process that wrote the record.
    pub pid: u32,
}

/// The registry of a local CA kept in `ca_dir`.
pub fn registry_dir(ca_dir: &Path) -> PathBuf {
    ca_dir.join("sidecars")
}

/// The file of one sidecar's record.
fn record_path(dir: &Path, namespace: &str, name: &str) -> PathBuf {
    let safe = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    dir.join(format!("{}.{}.json", safe(namespace), safe(name)))
}

/// Writes `record` (atomically: a reader never sees half of it); returns its path.
pub fn write(dir: &Path, record: &AppRecord) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = record_path(dir, &record.namespace, &record.name);
    let tmp = dir.join(format!(".{}.tmp", record.pid));
    std::fs::write(&tmp, serde_json::to_vec_pretty(record)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Removes the record at `path` if it is still the one `pid` wrote (another `qmesh run` of the same
/// app id may have replaced it since).
pub fn remove(path: &Path, pid: u32) {
    let ours = std::fs::read(path)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<AppRecord>(&bytes).ok())
        .is_some_and(|r| r.pid == pid);
    if ours {
        let _ = std::fs::remove_file(path);
    }
}

/// Every readable record in `dir`; unreadable or malformed files are skipped.
pub fn read(dir: &Path) -> Vec<AppRecord> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "json")
                && std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.len() <= MAX_RECORD_BYTES)
        })
        .take(MAX_RECORDS)
        .filter_map(|p| serde_json::from_slice(&std::fs::read(&p).ok()?).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_written_read_and_removed_by_their_writer_only() {
        let dir = tempfile::tempdir().unwrap();
        let registry = registry_dir(dir.path());
        let record = AppRecord {
            namespace: "default".into(),
            name: "shop/../1".into(),
            peer: "127.0.0.1:9001".parse().unwrap(),
            grpc: "127.0.0.1:9002".parse().unwrap(),
            http: "127.0.0.1:9003".parse().unwrap(),
            pid: 42,
        };
        let path = write(&registry, &record).unwrap();
        assert_eq!(path.parent(), Some(registry.as_path()), "{path:?}");
        std::fs::write(registry.join("junk.json"), "{not json").unwrap();
        assert_eq!(read(&registry), std::slice::from_ref(&record));
        remove(&path, 7);
        assert_eq!(read(&registry).len(), 1, "another pid's record stays");
        remove(&path, 42);
        assert!(read(&registry).is_empty());
        assert!(read(&dir.path().join("missing")).is_empty());
    }
}
