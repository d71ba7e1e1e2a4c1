//! The agent ↔ coordinator contract: the generated gRPC code ([`pb`], kept at the edges) and
//! the validated domain types both sides work with ([`model`]). `lifeboat/v1/coordinator.proto`
//! is the documentation of record.

pub mod enroll;
pub mod model;
pub mod tls;

/// Generated prost/tonic code for `lifeboat.v1`. Only the edges of the agent and the
/// coordinator touch these types; everything inside uses [`model`].
#[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("lifeboat.v1");
}

/// The descriptor set of the `.proto`, for gRPC server reflection.
pub const DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("lifeboat_v1_descriptor");

/// The coordinator's well-known port.
pub const PORT: u16 = 20004;

/// The protocol version this build speaks (`Register.protocol_version`).
pub const PROTOCOL_VERSION: u32 = 1;
