//! Carapace's wire formats, generated at build time from the `.proto` files in
//! `proto/proto/` (protox + tonic-prost-build; no system `protoc` needed).
//!
//! - [`workload`]: the SPIFFE Workload API (`SpiffeWorkloadAPI`, no proto package), written
//!   from the SPIFFE Workload API standard so that every SPIFFE client (go-spiffe, the Rust
//!   `spiffe` crate, py-spiffe, Envoy) speaks to the agent unchanged;
//! - [`carapace::node::v1`]: agent ↔ server (attestation, sync, SVID signing);
//! - [`carapace::admin::v1`]: CLI ↔ server, over the admin Unix socket;
//! - [`carapace::upstream::v1`]: downstream server ↔ upstream server (nested servers);
//! - [`carapace::types::v1`]: messages both share;
//! - [`sds`]: Envoy's Secret Discovery Service v3 (`envoy.service.secret.v3`) and the
//!   messages it carries, from the vendored Envoy API protos in `proto/proto/envoy-api/`.
//!
//! [`workload_client`]: a small Workload API client (security header, `FetchX509SVID`
//! converted to core types), for a Carapace process that is a workload of an agent.
//!
//! Generated types stop at the API layer: the server and agent convert them to the core
//! types at the edge.
#![forbid(unsafe_code)]
#![allow(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    clippy::all,
    clippy::allow_attributes_without_reason,
    reason = "generated code"
)]

/// The SPIFFE Workload API.
pub mod workload {
    include!(concat!(env!("OUT_DIR"), "/_.rs"));
}

/// Carapace's own APIs.
pub mod carapace {
    /// Shared messages.
    pub mod types {
        /// Version 1.
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/carapace.types.v1.rs"));
        }
    }
    /// The node API (agent ↔ server).
    pub mod node {
        /// Version 1.
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/carapace.node.v1.rs"));
        }
    }
    /// The admin API (CLI ↔ server).
    pub mod admin {
        /// Version 1.
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/carapace.admin.v1.rs"));
        }
    }
    /// The upstream API (downstream server ↔ upstream server, nested servers).
    pub mod upstream {
        /// Version 1.
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/carapace.upstream.v1.rs"));
        }
    }
}

/// Envoy's Secret Discovery Service (v3) with every package its messages need, nested as
/// their proto packages (`sds::envoy::service::secret::v3`, `sds::envoy::extensions::
/// transport_sockets::tls::v3`, ...): the generated code refers to its sibling packages
/// with `super::`, so they sit together. Messages implement `prost::Name` with
/// `type.googleapis.com/` type URLs, so they pack into `prost_types::Any` with
/// `Any::from_msg`.
pub mod sds {
    include!(concat!(env!("OUT_DIR"), "/envoy_sds.rs"));
}

pub mod convert;
pub mod sync;
pub mod workload_client;

pub use carapace::admin::v1 as admin;
pub use carapace::node::v1 as node;
pub use carapace::types::v1 as types;
