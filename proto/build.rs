//! Compiles the `.proto` files with `protox` (a pure-Rust protobuf compiler), so no build needs `protoc`.

const PROTOS: &[&str] = &[
    "proto/qmesh/v1/broker.proto",
    "proto/qmesh/peer/v1/peer.proto",
    "proto/qmesh/control/v1/control.proto",
    "proto/externalscaler/externalscaler.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Payloads are shared, not copied, between the log, peers and apps.
        .bytes(".qmesh")
        .compile_fds(descriptors)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
