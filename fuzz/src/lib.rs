//! The bodies of qmesh's fuzz targets (`fuzz_targets/*.rs` are one-line wrappers around these), so
//! the seed generator and the corpus replay test (`tests/corpus.rs`) run exactly the same code
//! without libFuzzer.
//!
//! Every `run` must return normally for every input: a panic (including a failed `assert!`) is a
//! finding. The asserts check properties of project code (round trips, invariants), never of the
//! harness itself.

#![allow(clippy::unwrap_used)]

pub mod amqp_frames;
pub mod http_bodies;
pub mod log_record;
pub mod log_replay;
pub mod manifests;
pub mod peer_frames;

use qmesh_sidecar::store::record::{HEADER, MAX_RECORD};

/// Rewrites the `len` and `crc` of each record in `data` so that it frames and checksums correctly
/// (a last record whose `len` runs past the end is cut to what is there). Lets the fuzzer reach the
/// record bodies instead of spending its time on CRC-32C: the result is still a byte string a log
/// segment could hold, since the writer frames records exactly like this.
pub fn reseal(data: &[u8]) -> Vec<u8> {
    let mut buf = data.to_vec();
    let mut pos = 0usize;
    while buf.len() - pos >= HEADER + 9 {
        let declared =
            u32::from_le_bytes([buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]]) as usize;
        let available = (buf.len() - pos - HEADER).min(MAX_RECORD);
        let len = if (9..=available).contains(&declared) {
            declared
        } else {
            available
        };
        let crc = crc32c::crc32c(&buf[pos + HEADER..pos + HEADER + len]);
        buf[pos..pos + 4].copy_from_slice(&(len as u32).to_le_bytes());
        buf[pos + 4..pos + 8].copy_from_slice(&crc.to_le_bytes());
        pos += HEADER + len;
    }
    buf
}

/// Where the log targets make their temporary directories: `QMESH_FUZZ_TMPDIR`, else `/dev/shm`
/// (tmpfs: fsync costs nothing) when it is there, else the system temp dir.
pub fn scratch_root() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("QMESH_FUZZ_TMPDIR") {
        return dir.into();
    }
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}
