//! Signing the CAs of downstream servers (nested servers) with the active CA.
