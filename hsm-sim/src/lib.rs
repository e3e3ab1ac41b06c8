//! The Carapace lab: SoftHSM2, swtpm and an MIT KDC in a temporary directory.
