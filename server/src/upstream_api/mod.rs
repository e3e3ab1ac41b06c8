//! The upstream API (`carapace.upstream.v1.Upstream`), served on the node API port to
//! downstream servers (nested servers): each call is authorized on its own, for a caller
//! whose X509-SVID verifies against the current bundle and whose SPIFFE ID has a
//! registration entry marked `downstream`.
