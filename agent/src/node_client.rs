//! The agent's side of the node API: connections over TLS 1.3 to the server, node
//! attestation, renewal, the sync stream and batch signing.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use carapace_core::plugin::{AttestationContext, NodeAttestorClient};
use carapace_proto::node::{
    AttestParams, AttestRequest, AttestResult, attest_request, attest_response,
    node_client::NodeClient,
};

use crate::{Error, Result};

/// Largest node API message.
pub const MAX_MESSAGE_SIZE: usize = 32 * 1024 * 1024;

/// A lazily connecting channel to the server over TLS with `tls`.
pub fn channel(
    server_address: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<NodeClient<Channel>> {
    let endpoint = Endpoint::from_shared(format!("http://{server_address}"))
        .map_err(|e| Error::Config(format!("server_address {server_address:?}: {e}")))?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    let connector = tokio_rustls::TlsConnector::from(tls);
    let addr = server_address.to_owned();
    let channel = endpoint.connect_with_connector_lazy(tower::service_fn(move |_uri| {
        let connector = connector.clone();
        let addr = addr.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(&addr).await?;
            tcp.set_nodelay(true)?;
            // The name is not checked: the verifier checks the server's SPIFFE ID.
            let name = ServerName::try_from("carapace-server")
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    }));
    Ok(NodeClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE))
}

/// Whether a gRPC status means the server refused the agent (as opposed to being away).
pub fn is_refusal(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated | tonic::Code::InvalidArgument
    )
}

fn status_error(what: &str, s: tonic::Status) -> Error {
    if is_refusal(&s) {
        Error::Refused(format!("{what}: {}", s.message()))
    } else {
        Error::Server(format!("{what}: {} ({:?})", s.message(), s.code()))
    }
}

/// Runs node attestation with `attestor`, sending `csr` for the agent's key.
pub async fn attest(
    client: &mut NodeClient<Channel>,
    attestor: &dyn NodeAttestorClient,
    csr: Vec<u8>,
    agent_public_key: &[u8],
) -> Result<AttestResult> {
    let (tx, rx) = mpsc::channel(4);
    let payload = attestor
        .payload(&AttestationContext {
            agent_public_key: agent_public_key.to_vec(),
        })
        .await?;
    tx.send(AttestRequest {
        step: Some(attest_request::Step::Params(AttestParams {
            attestor: attestor.name().to_owned(),
            payload,
            csr,
        })),
    })
    .await
    .map_err(|_| Error::Server("attestation stream closed".into()))?;
    let mut responses = client
        .attest(ReceiverStream::new(rx))
        .await
        .map_err(|s| status_error("attestation", s))?
        .into_inner();
    loop {
        let msg = responses
            .message()
            .await
            .map_err(|s| status_error("attestation", s))?
            .ok_or_else(|| {
                Error::Server("attestation: the server closed the stream without a result".into())
            })?;
        match msg.step {
            Some(attest_response::Step::Result(r)) => return Ok(r),
            Some(attest_response::Step::Challenge(c)) => {
                let answer = attestor.answer(&c).await?;
                tx.send(AttestRequest {
                    step: Some(attest_request::Step::ChallengeResponse(answer)),
                })
                .await
                .map_err(|_| Error::Server("attestation stream closed".into()))?;
            }
            None => return Err(Error::Server("attestation: empty response".into())),
        }
    }
}

/// Maps a status from a node API call to the agent's error.
pub fn call_error(what: &str, s: tonic::Status) -> Error {
    status_error(what, s)
}
