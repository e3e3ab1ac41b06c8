//! PKCS#11 key manager (plugin `pkcs11`): keys generated inside a token, never exported.
