//! The Carapace lab: SoftHSM2 tokens, swtpm TPMs manufactured with EK certificates, and an
//! MIT Kerberos realm, each in a temporary directory on free loopback ports. Tests and the
//! `carapace-lab` binary share it. A missing package is an error naming the exact
//! `apt-get install` line, never a silent skip.

mod error;
pub mod softhsm;

pub use error::{Error, Result};
