//! The Carapace server: the identity authority of a SPIFFE trust domain.
#![forbid(unsafe_code)]

pub mod datastore;
mod error;

pub use error::{Error, Result};
