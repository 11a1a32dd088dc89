//! `qmesh-operator` — reconciles Queue and Subscription resources, injects sidecars and serves the
//! control plane (see docs/architecture.md). Not built yet: this binary exits without doing anything.

fn main() {}
