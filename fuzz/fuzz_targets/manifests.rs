//! Fuzz target `manifests`: see `qmesh_fuzz::manifests` (fuzz/src/manifests.rs) for what it feeds where.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qmesh_fuzz::manifests::run(data));
