//! Fuzz target `log_replay`: see `qmesh_fuzz::log_replay` (fuzz/src/log_replay.rs) for what it feeds where.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qmesh_fuzz::log_replay::run(data));
