//! The `carapace` upstream authority: the CA of this server is an intermediate certified
//! by a Carapace server of the same trust domain above it (nested servers). This server
//! is a workload of the upstream tier: an agent of the upstream servers runs beside it,
//! and its Workload API gives this server the X509-SVID it presents (mutual TLS) to the
//! upstream server's `carapace.upstream.v1.Upstream` service.
