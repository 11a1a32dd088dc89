//! `qmesh-sidecar` — the broker injected beside each app pod (see docs/architecture.md).
//! Not built yet: this binary exits without doing anything.

fn main() {}
