//! Fuzz target `peer_frames`: see `qmesh_fuzz::peer_frames` (fuzz/src/peer_frames.rs) for what it feeds where.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qmesh_fuzz::peer_frames::run(data));
