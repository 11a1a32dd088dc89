//! qmesh's wire: Rust types and tonic services generated from the `.proto` files in `proto/`.
//!
//! ```text
//!   app ──qmesh.v1 (localhost)──▶ sidecar ══qmesh.peer.v1 (pod IP)══▶ sidecar
//!                                    │
//!                                    └──qmesh.control.v1──▶ operator / `qmesh dev`
//!   KEDA ──externalscaler──▶ operator (a Subscription's backlog)
//! ```
//!
//! * [`v1`] — the app API (`Broker`): publish, pipelined publish, subscribe with acks and credits.
//! * [`peer`] — sidecar to sidecar (`Peer`): credit-based forwarding, replication, hand-over.
//! * [`control`] — sidecar to control plane (`Control`): mesh views down, stats up.
//! * [`externalscaler`] — KEDA's external scaler interface, served by the operator.
//! * [`summary`] — the mesh summary `Control/Status` answers, for the operator and `qmesh dev`.
//! * [`join`] — the server side of `Control`, over any source of views: the operator's index or
//!   `qmesh dev`'s manifest files.
//!
//! The `.proto` files are the documentation of every field; the generated code carries it over.

#![allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]

/// Generated code, in modules that mirror the protobuf packages.
pub mod qmesh {
    /// `qmesh.v1`: the app API served by each sidecar on 127.0.0.1.
    pub mod v1 {
        tonic::include_proto!("qmesh.v1");
    }

    /// `qmesh.peer.v1`: forwarding, replication and hand-over between sidecars.
    pub mod peer {
        /// Version 1 of the peer API.
        pub mod v1 {
            tonic::include_proto!("qmesh.peer.v1");
        }
    }

    /// `qmesh.control.v1`: mesh views from the control plane, stats back from sidecars.
    pub mod control {
        /// Version 1 of the control API.
        pub mod v1 {
            tonic::include_proto!("qmesh.control.v1");
        }
    }
}

/// `externalscaler`: KEDA's external scaler interface, which the operator serves so KEDA can scale
/// consumers on a Subscription's backlog.
pub mod externalscaler {
    tonic::include_proto!("externalscaler");
}

pub mod convert;
pub mod join;
pub mod summary;

pub use prost_types;
pub use qmesh::{control::v1 as control, peer::v1 as peer, v1};
