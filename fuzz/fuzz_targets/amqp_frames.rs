//! Fuzz target `amqp_frames`: see `qmesh_fuzz::amqp_frames` (fuzz/src/amqp_frames.rs) for what it feeds where.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qmesh_fuzz::amqp_frames::run(data));
