//! TPM 2.0 node attestation (plugin `tpm`, agent and server halves).
//!
//! Layout: [`wire`] (the messages), `device` (the agent's TPM operations over
//! tss-esapi), `credential` (the server's software MakeCredential), `verify` (the
//! server's checks of EK, AK, quote and PCR policy).

pub mod agent;
pub mod credential;
pub mod device;
pub mod server;
pub mod verify;
pub mod wire;
