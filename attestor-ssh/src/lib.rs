//! SSH host-certificate node attestation (`sshpop`).
