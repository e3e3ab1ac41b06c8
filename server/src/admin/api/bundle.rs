//! `GetBundle`: the trust domain's current bundle.

use carapace_proto::types;

use super::AdminApi;

impl AdminApi {
    pub(super) fn get_bundle_inner(&self) -> types::Bundle {
        let bundle = self.ca.bundle().borrow().clone();
        types::Bundle::from(bundle.as_ref())
    }
}
