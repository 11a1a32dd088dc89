//! Fuzz target `http_bodies`: see `qmesh_fuzz::http_bodies` (fuzz/src/http_bodies.rs) for what it feeds where.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qmesh_fuzz::http_bodies::run(data));
