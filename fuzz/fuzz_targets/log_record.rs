//! Fuzz target `log_record`: see `qmesh_fuzz::log_record` (fuzz/src/log_record.rs) for what it feeds where.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qmesh_fuzz::log_record::run(data));
