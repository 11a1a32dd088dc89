//! `qmesh` — the command line (see docs/architecture.md). Not built yet: this binary exits without
//! doing anything.

fn main() {}
