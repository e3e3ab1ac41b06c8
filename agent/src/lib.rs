//! The Carapace agent: attests its node to the server, keeps the SVIDs of the workloads
//! registered on it, and serves them over the SPIFFE Workload API.
#![deny(unsafe_code)]

mod error;

pub use error::{Error, Result};
