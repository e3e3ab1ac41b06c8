//! `GetBundle`: the trust domain's current bundle, or a foreign trust domain's stored
//! one (the other bundle RPCs are in `federation`).

use carapace_proto::admin::GetBundleRequest;
use carapace_proto::types;

use super::AdminApi;
use crate::Result;

impl AdminApi {
    pub(super) async fn get_bundle_inner(&self, req: GetBundleRequest) -> Result<types::Bundle> {
        if let Some(foreign) = self.foreign_bundle_wire(&req.trust_domain).await? {
            return Ok(foreign);
        }
        let bundle = self.ca.bundle().borrow().clone();
        Ok(types::Bundle::from(bundle.as_ref()))
    }
}
