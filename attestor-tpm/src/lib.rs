//! TPM 2.0 node attestation (plugin `tpm`, agent and server halves).
