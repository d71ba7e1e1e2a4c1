//! The agent replicating to Azure Blob (a real Azurite, started by `scripts/test.sh`), and the
//! restore reading it back from there: the same bytes as the source.

use std::sync::Arc;

use crate::common::*;
use lifeboat_store::backend::azure::{AzureBackend, AzureConfig};
use lifeboat_store::layout::Layout;
use lifeboat_store::restore::StoreReader;
use lifeboat_store::{DynBackend, GroupId};

#[test]
fn replicate_to_azurite_and_restore_from_it() {
    let Ok(endpoint) = std::env::var("LIFEBOAT_AZURITE") else {
        assert!(
            std::env::var_os("CI").is_none()
                && std::env::var_os("LIFEBOAT_REQUIRE_AZURITE").is_none(),
            "LIFEBOAT_AZURITE is not set: run the tests through scripts/test.sh"
        );
        eprintln!(
            "SKIPPED replicate_to_azurite_and_restore_from_it: no Azurite (scripts/test.sh starts one)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let mut data = random_bytes(20 << 20, 9);
    data[..(4 << 20)].fill(0);
    std::fs::write(&image, &data).unwrap();
    let container = format!("agent{}", std::process::id());
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"vm = "vm1"
group = "g"
state_dir = {state:?}

[store]
kind = "azure"
account = "devstoreaccount1"
container = "{container}"
endpoint = "{endpoint}"
credential = {{ kind = "shared_key", key = "{key}" }}

[replication]
segment_size = "1MiB"
memory_cap = "8MiB"

[[disk]]
id = "img"
kind = "image"
path = {image:?}
"#,
            state = dir.path().join("state"),
            key = lifeboat_store::backend::azure::EMULATOR_KEY,
        ),
    )
    .unwrap();
    agent_ok(&config, &["sync"]);
    data[10 << 20] ^= 1;
    std::fs::write(&image, &data).unwrap();
    let out = agent_ok(&config, &["sync"]);
    assert!(out.contains("1 changed blocks"), "{out}");

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let backend: DynBackend = Arc::new(
            AzureBackend::open(&AzureConfig::azurite(&endpoint, &container))
                .await
                .unwrap(),
        );
        let reader = StoreReader::new(backend, Layout::new(GroupId::new("g").unwrap()));
        let points = reader.points().await.unwrap();
        assert_eq!(points.len(), 2);
        let restored = dir.path().join("restored");
        restore_point(&reader, points.last().unwrap(), &restored).await;
        assert!(std::fs::read(restored.join("img")).unwrap() == data);
    });
}
