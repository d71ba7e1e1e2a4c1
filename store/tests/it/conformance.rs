//! Runs the backend conformance suite against every backend: local directory, in-memory, and
//! Azure Blob on a real Azurite (started by `scripts/test.sh`, which sets `LIFEBOAT_AZURITE`).

mod local {
    use std::sync::Arc;

    use lifeboat_store::DynBackend;
    use lifeboat_store::backend::local::LocalBackend;

    async fn fresh() -> Option<DynBackend> {
        // Leaked on purpose: the directory must outlive the test body; the OS temp dir is
        // cleaned by the test script.
        let dir = tempfile::tempdir().unwrap().keep();
        Some(Arc::new(LocalBackend::open(dir).unwrap()))
    }

    lifeboat_store::conformance_suite!(fresh());
}

mod memory {
    use std::sync::Arc;

    use lifeboat_store::DynBackend;
    use lifeboat_store::backend::memory::MemoryBackend;

    async fn fresh() -> Option<DynBackend> {
        Some(Arc::new(MemoryBackend::new()))
    }

    lifeboat_store::conformance_suite!(fresh());
}

mod azure {
    use std::sync::Arc;

    use lifeboat_store::DynBackend;
    use lifeboat_store::backend::azure::{AzureBackend, AzureConfig};

    /// A fresh name prefix in a shared container on Azurite, or `None` (skip) when Azurite is
    /// not configured outside CI. In CI, or with `LIFEBOAT_REQUIRE_AZURITE=1`, a missing
    /// Azurite fails the test instead.
    pub(crate) async fn fresh() -> Option<DynBackend> {
        let Ok(endpoint) = std::env::var("LIFEBOAT_AZURITE") else {
            let required = std::env::var_os("CI").is_some()
                || std::env::var_os("LIFEBOAT_REQUIRE_AZURITE").is_some();
            assert!(
                !required,
                "LIFEBOAT_AZURITE is not set: run the tests through scripts/test.sh, which starts Azurite"
            );
            eprintln!(
                "SKIPPED: Azure conformance case (LIFEBOAT_AZURITE unset; scripts/test.sh starts Azurite)"
            );
            return None;
        };
        let mut cfg = AzureConfig::azurite(&endpoint, "conformance");
        cfg.prefix = Some(format!("run-{:016x}", rand_prefix()));
        Some(Arc::new(
            AzureBackend::open(&cfg).await.expect("Azurite reachable"),
        ))
    }

    fn rand_prefix() -> u64 {
        use std::hash::{BuildHasher, RandomState};
        RandomState::new().hash_one(std::time::SystemTime::now())
    }

    lifeboat_store::conformance_suite!(fresh());

    /// Bad credentials are a denial naming the container, not a retry loop.
    #[tokio::test]
    async fn wrong_key_is_refused_clearly() {
        let Ok(endpoint) = std::env::var("LIFEBOAT_AZURITE") else {
            return assert!(fresh().await.is_none());
        };
        let mut cfg = AzureConfig::azurite(&endpoint, "conformance-badkey");
        cfg.credential = lifeboat_store::backend::azure::AzureCredential::SharedKey {
            key: lifeboat_store::Secret::new("AAAA"),
        };
        let err = AzureBackend::open(&cfg).await.unwrap_err();
        assert_eq!(err.kind, lifeboat_store::ErrorKind::Denied, "{err}");
        assert!(err.to_string().contains("conformance-badkey"), "{err}");
        assert!(err.to_string().contains("403"), "{err}");
    }

    /// A container that does not exist yet is created by a writer's open with the account key.
    #[tokio::test]
    async fn missing_container_is_created() {
        let Ok(endpoint) = std::env::var("LIFEBOAT_AZURITE") else {
            return assert!(fresh().await.is_none());
        };
        let container = format!("fresh{:x}", rand_prefix() & 0xffff_ffff);
        let cfg = AzureConfig::azurite(&endpoint, &container);
        let b = AzureBackend::open(&cfg).await.unwrap();
        let name = lifeboat_store::ObjectName::new("x").unwrap();
        use lifeboat_store::Backend;
        b.put_new(&name, bytes::Bytes::from_static(b"1"))
            .await
            .unwrap();
        // Opening again (container exists now) is fine too.
        AzureBackend::open(&cfg).await.unwrap();
        let _ = Arc::new(b);
    }
}
