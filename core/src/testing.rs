//! The KeyManager conformance suite: the same checks against every backend (memory,
//! disk, PKCS#11, TPM). Each backend crate calls these from its own tests; a failure
//! panics with the property that broke.
#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test suite"
)]

use std::sync::Arc;

use crate::crypto::{KeyType, SignatureAlgorithm, key_type_of_spki, verify_signature};
use crate::error::Error;
use crate::plugin::{KeyInfo, KeyManager, KeySigner};

/// Runs every backend-independent check against an empty key manager: create, get, list,
/// sign and verify with each key type, wrong algorithms, duplicate and unknown ids,
/// invalid ids, concurrent signing and deletion. Uses key ids starting with `conf-`.
pub async fn key_manager_conformance(km: &dyn KeyManager, key_types: &[KeyType]) {
    let mut created = Vec::new();
    for &kt in key_types {
        let id = format!("conf-{kt}");
        let key = km
            .generate_key(&id, kt)
            .await
            .unwrap_or_else(|e| panic!("generate {kt}: {e}"));
        assert_eq!(key.id(), id);
        assert_eq!(key.key_type(), kt);
        assert_eq!(
            key_type_of_spki(key.public_key_der()).unwrap(),
            kt,
            "public key type"
        );
        sign_and_verify(key.as_ref(), kt.x509_algorithm());
        if kt == KeyType::Rsa2048 {
            sign_and_verify(key.as_ref(), SignatureAlgorithm::RsaPssSha256);
        }
        let wrong = if kt == KeyType::EcP256 {
            SignatureAlgorithm::EcdsaP384Sha384
        } else {
            SignatureAlgorithm::EcdsaP256Sha256
        };
        assert!(
            matches!(
                key.sign(wrong, b"m"),
                Err(Error::UnsupportedAlgorithm { .. })
            ),
            "{kt} must refuse {wrong}"
        );
        let again = km.get_key(&id).await.unwrap();
        assert_eq!(
            again.public_key_der(),
            key.public_key_der(),
            "get_key returns the same key"
        );
        sign_and_verify(again.as_ref(), kt.x509_algorithm());
        assert!(
            matches!(km.generate_key(&id, kt).await, Err(Error::KeyExists(_))),
            "duplicate id must be KeyExists"
        );
        created.push(key);
    }

    let listed = km.list_keys().await.unwrap();
    let ids: Vec<&str> = listed.iter().map(|k| k.id.as_str()).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted, "list_keys is sorted by id");
    for key in &created {
        let info = listed
            .iter()
            .find(|k| k.id == key.id())
            .expect("created key is listed");
        assert_eq!(info.public_key_der, key.public_key_der());
        assert_eq!(info.key_type, key.key_type());
    }

    assert!(matches!(
        km.get_key("conf-missing").await,
        Err(Error::KeyNotFound(_))
    ));
    assert!(matches!(
        km.delete_key("conf-missing").await,
        Err(Error::KeyNotFound(_))
    ));
    for bad in ["", "../etc/passwd", "a/b", ".hidden"] {
        assert!(
            km.generate_key(bad, KeyType::EcP256).await.is_err(),
            "id {bad:?} must be refused"
        );
    }

    if let Some(key) = created.first() {
        concurrent_signing(key.clone());
    }

    for key in created {
        km.delete_key(key.id()).await.unwrap();
        assert!(matches!(
            km.get_key(key.id()).await,
            Err(Error::KeyNotFound(_))
        ));
    }
}

fn sign_and_verify(key: &dyn KeySigner, alg: SignatureAlgorithm) {
    let msg = b"carapace conformance message";
    let sig = key
        .sign(alg, msg)
        .unwrap_or_else(|e| panic!("sign {alg}: {e}"));
    verify_signature(key.public_key_der(), alg, msg, &sig)
        .unwrap_or_else(|e| panic!("signature by {} does not verify: {e}", key.id()));
    assert!(
        verify_signature(key.public_key_der(), alg, b"another message", &sig).is_err(),
        "signature must not verify for another message"
    );
}

/// Signs from 8 threads at once, 25 signatures each; every signature must verify.
pub fn concurrent_signing(key: Arc<dyn KeySigner>) {
    let alg = key.key_type().x509_algorithm();
    std::thread::scope(|s| {
        for t in 0..8 {
            let key = key.clone();
            s.spawn(move || {
                for i in 0..25 {
                    let msg = format!("thread {t} message {i}");
                    let sig = key.sign(alg, msg.as_bytes()).unwrap();
                    verify_signature(key.public_key_der(), alg, msg.as_bytes(), &sig).unwrap();
                }
            });
        }
    });
}

/// Creates keys to be found again after a restart; returns their descriptions.
pub async fn create_for_restart(km: &dyn KeyManager, key_types: &[KeyType]) -> Vec<KeyInfo> {
    let mut out = Vec::new();
    for &kt in key_types {
        let id = format!("restart-{kt}");
        let key = km.generate_key(&id, kt).await.unwrap();
        out.push(KeyInfo {
            id,
            key_type: kt,
            public_key_der: key.public_key_der().to_vec(),
        });
    }
    out
}

/// Checks, on a key manager reopened over the same storage, that every key made by
/// [`create_for_restart`] is found again with the same public key and still signs.
pub async fn check_after_restart(km: &dyn KeyManager, before: &[KeyInfo]) {
    for info in before {
        let key = km
            .get_key(&info.id)
            .await
            .unwrap_or_else(|e| panic!("key {} lost across restart: {e}", info.id));
        assert_eq!(
            key.public_key_der(),
            info.public_key_der,
            "same key after restart"
        );
        sign_and_verify(key.as_ref(), info.key_type.x509_algorithm());
    }
}
