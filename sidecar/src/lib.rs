//! The qmesh sidecar broker, as a library so its parts can be tested on their own; `main.rs` runs it.
