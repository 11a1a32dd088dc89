//! The app API (bound to loopback): gRPC `qmesh.v1.Broker` and its HTTP/JSON mirror.

pub mod grpc;
pub mod http;
