//! The agent half of `join_token` node attestation: presents the token once.

use zeroize::Zeroizing;

use carapace_core::Error;
use carapace_core::plugin::{AttestationContext, NodeAttestorClient};

/// Presents an operator-issued join token. The token is never logged (Debug redacts it).
pub struct JoinTokenClient {
    token: Zeroizing<String>,
}

impl JoinTokenClient {
    /// A client for `token`.
    pub fn new(token: Zeroizing<String>) -> Self {
        JoinTokenClient { token }
    }
}

impl std::fmt::Debug for JoinTokenClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinTokenClient")
            .field("token", &"<redacted>")
            .finish()
    }
}

#[async_trait::async_trait]
impl NodeAttestorClient for JoinTokenClient {
    fn name(&self) -> &str {
        "join_token"
    }

    async fn payload(&self, _ctx: &AttestationContext) -> Result<Vec<u8>, Error> {
        Ok(self.token.trim().as_bytes().to_vec())
    }

    async fn answer(&self, _challenge: &[u8], _ctx: &AttestationContext) -> Result<Vec<u8>, Error> {
        Err(Error::AttestationRejected(
            "join_token attestation has no challenges".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_token() {
        let c = JoinTokenClient::new(Zeroizing::new("0123.secret".into()));
        assert!(!format!("{c:?}").contains("secret"));
    }
}
