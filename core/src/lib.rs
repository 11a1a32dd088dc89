//! qmesh's pure logic, shared by the operator, the sidecar and the CLI so that "what the operator
//! would send" and "what a mesh file gives" cannot drift. No I/O, no Kubernetes client, no protobuf.
//!
//! ```text
//!   Queues, Subscriptions, sidecars (pods or mesh-file documents)
//!        │  MeshState::apply_* / delete_*
//!        ▼
//!   MeshState ──view_for(sidecar)──▶ MeshView  (queues it may own + routes, subscriptions it serves)
//! ```

pub mod backoff;
pub mod mesh;
pub mod meshfile;

pub use mesh::{
    MeshState, MeshView, PeerEndpoint, QueueView, Route, ServedSubscription, SidecarInfo,
    SidecarKey,
};
pub use meshfile::{MeshFile, MeshFileError};
