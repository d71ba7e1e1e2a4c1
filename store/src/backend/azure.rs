//! Azure Blob backend, through `object_store` (tested against Azurite).
//!
//! Create-only puts use `If-None-Match: *`. `object_store` cannot attach that condition to a
//! block-list commit, so objects above [`AzureBackend::MULTIPART_THRESHOLD`] are uploaded in
//! blocks to a staging name under `.staging/` (which no valid object name can start with) and
//! then server-side copied to their final name with `If-None-Match: *`; the staging blob is
//! deleted either way. Azure completes same-account copies of committed block blobs
//! synchronously; readers verify every object anyway.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use bytes::Bytes;
use futures::TryStreamExt;
use hmac::{Hmac, Mac};
use object_store::azure::{AzureConfigKey, MicrosoftAzure, MicrosoftAzureBuilder};
use object_store::path::Path;
use object_store::{
    ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode, PutOptions,
    PutPayload, RetryConfig, WriteMultipart,
};
use serde::Deserialize;

use super::{Backend, ErrorKind, ObjectMeta, StoreError, check_range};
use crate::name::ObjectName;
use crate::secret::Secret;

/// The well-known Azurite / storage-emulator account and key (public, not a secret).
pub const EMULATOR_ACCOUNT: &str = "devstoreaccount1";
/// The well-known Azurite account key.
pub const EMULATOR_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// How the backend authenticates.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields, tag = "kind")]
pub enum AzureCredential {
    /// Storage account shared key.
    SharedKey { key: Secret },
    /// A SAS token (query string, with or without the leading `?`).
    Sas { token: Secret },
    /// Azure managed identity (IMDS); `client_id` picks a user-assigned identity.
    ManagedIdentity {
        #[serde(default)]
        client_id: Option<String>,
    },
}

/// Where and how to reach a container.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureConfig {
    /// Storage account name.
    pub account: String,
    /// Container name; created when missing (shared key or account SAS).
    pub container: String,
    /// Blob endpoint override, e.g. `http://127.0.0.1:10000/devstoreaccount1` for Azurite.
    /// Defaults to `https://<account>.blob.core.windows.net`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Optional name prefix inside the container, so stores can share one.
    #[serde(default)]
    pub prefix: Option<String>,
    pub credential: AzureCredential,
}

impl AzureConfig {
    /// A config for Azurite on `endpoint` with the emulator account.
    pub fn azurite(endpoint: &str, container: &str) -> Self {
        Self {
            account: EMULATOR_ACCOUNT.into(),
            container: container.into(),
            endpoint: Some(endpoint.trim_end_matches('/').into()),
            prefix: None,
            credential: AzureCredential::SharedKey {
                key: Secret::new(EMULATOR_KEY),
            },
        }
    }

    fn endpoint(&self) -> String {
        self.endpoint
            .clone()
            .unwrap_or_else(|| format!("https://{}.blob.core.windows.net", self.account))
            .trim_end_matches('/')
            .to_owned()
    }
}

/// An Azure Blob container as a [`Backend`].
#[derive(Debug, Clone)]
pub struct AzureBackend {
    store: Arc<MicrosoftAzure>,
    prefix: Option<String>,
}

fn map_err(op: &'static str, name: impl std::fmt::Display, e: object_store::Error) -> StoreError {
    use object_store::Error as E;
    let kind = match &e {
        E::NotFound { .. } => ErrorKind::NotFound,
        E::AlreadyExists { .. } | E::Precondition { .. } => ErrorKind::AlreadyExists,
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => ErrorKind::Permanent,
        E::InvalidPath { .. } | E::NotSupported { .. } | E::NotImplemented { .. } => {
            ErrorKind::Permanent
        }
        other => classify_generic(other),
    };
    StoreError::new(kind, op, name).with_detail(e)
}

/// `object_store` hides the HTTP status of other failures inside its error text; a 4xx other
/// than 408/429 will fail again, anything else (5xx, timeouts, resets) may not.
fn classify_generic(e: &(dyn std::error::Error + 'static)) -> ErrorKind {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if let Some(pos) = text.find("status code: ") {
            let code: u16 = text[pos + 13..]
                .chars()
                .take(3)
                .collect::<String>()
                .parse()
                .unwrap_or(0);
            return match code {
                408 | 429 => ErrorKind::Transient,
                400..=499 => ErrorKind::Permanent,
                _ => ErrorKind::Transient,
            };
        }
        cur = err.source();
    }
    ErrorKind::Transient
}

impl AzureBackend {
    /// Objects larger than this go up in blocks (and through a staging name).
    pub const MULTIPART_THRESHOLD: usize = 32 << 20;
    const BLOCK_SIZE: usize = 8 << 20;

    /// Connects, creating the container if the credential allows and it is missing.
    pub async fn open(config: &AzureConfig) -> Result<Self, StoreError> {
        let endpoint = config.endpoint();
        let mut builder = MicrosoftAzureBuilder::new()
            .with_account(&config.account)
            .with_container_name(&config.container)
            .with_endpoint(endpoint.clone())
            .with_allow_http(endpoint.starts_with("http://"))
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(endpoint.starts_with("http://"))
                    .with_connect_timeout(Duration::from_secs(10))
                    .with_timeout(Duration::from_secs(120)),
            )
            // Our own `Retrying` wrapper owns the retry policy; a couple of quick inner retries
            // smooth over single dropped connections.
            .with_retry(RetryConfig {
                max_retries: 2,
                retry_timeout: Duration::from_secs(30),
                ..Default::default()
            });
        builder = match &config.credential {
            AzureCredential::SharedKey { key } => builder.with_access_key(key.expose()),
            AzureCredential::Sas { token } => builder.with_config(
                AzureConfigKey::SasKey,
                token.expose().trim_start_matches('?'),
            ),
            AzureCredential::ManagedIdentity { client_id } => match client_id {
                Some(id) => builder.with_client_id(id),
                None => builder,
            },
        };
        let store = builder.build().map_err(|e| {
            StoreError::new(ErrorKind::Permanent, "open", &config.container).with_detail(e)
        })?;
        ensure_container(config).await?;
        Ok(Self {
            store: Arc::new(store),
            prefix: config.prefix.clone().filter(|p| !p.is_empty()),
        })
    }

    fn path(&self, name: &str) -> Path {
        match &self.prefix {
            Some(p) => Path::from(format!("{p}/{name}")),
            None => Path::from(name),
        }
    }

    async fn put_multipart_create(&self, name: &ObjectName, data: Bytes) -> Result<(), StoreError> {
        let staging = self.path(&format!(
            ".staging/{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        ));
        let upload = self
            .store
            .put_multipart(&staging)
            .await
            .map_err(|e| map_err("put", name, e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, Self::BLOCK_SIZE);
        let mut offset = 0;
        while offset < data.len() {
            let end = (offset + Self::BLOCK_SIZE).min(data.len());
            writer
                .wait_for_capacity(4)
                .await
                .map_err(|e| map_err("put", name, e))?;
            writer.put(data.slice(offset..end));
            offset = end;
        }
        let result = match writer.finish().await {
            Ok(_) => self
                .store
                .copy_if_not_exists(&staging, &self.path(name.as_str()))
                .await
                .map_err(|e| map_err("put", name, e)),
            Err(e) => Err(map_err("put", name, e)),
        };
        let _ = self.store.delete(&staging).await;
        result
    }
}

#[async_trait]
impl Backend for AzureBackend {
    async fn put_new(&self, name: &ObjectName, data: Bytes) -> Result<(), StoreError> {
        if data.len() > Self::MULTIPART_THRESHOLD {
            return self.put_multipart_create(name, data).await;
        }
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        self.store
            .put_opts(&self.path(name.as_str()), PutPayload::from(data), opts)
            .await
            .map(|_| ())
            .map_err(|e| match map_err("put", name, e) {
                // On a put, "not found" can only mean the container is gone.
                e if e.kind == ErrorKind::NotFound => StoreError {
                    kind: ErrorKind::Permanent,
                    ..e
                },
                e => e,
            })
    }

    async fn get(&self, name: &ObjectName) -> Result<Bytes, StoreError> {
        let result = self
            .store
            .get(&self.path(name.as_str()))
            .await
            .map_err(|e| map_err("get", name, e))?;
        result.bytes().await.map_err(|e| map_err("get", name, e))
    }

    async fn get_range(&self, name: &ObjectName, range: Range<u64>) -> Result<Bytes, StoreError> {
        let size = self.head(name).await?.size;
        check_range(name, &range, size)?;
        if range.is_empty() {
            return Ok(Bytes::new());
        }
        let opts = GetOptions {
            range: Some(GetRange::Bounded(range)),
            ..Default::default()
        };
        let result = self
            .store
            .get_opts(&self.path(name.as_str()), opts)
            .await
            .map_err(|e| map_err("get_range", name, e))?;
        result
            .bytes()
            .await
            .map_err(|e| map_err("get_range", name, e))
    }

    async fn head(&self, name: &ObjectName) -> Result<ObjectMeta, StoreError> {
        let meta = self
            .store
            .head(&self.path(name.as_str()))
            .await
            .map_err(|e| map_err("head", name, e))?;
        Ok(ObjectMeta {
            name: name.clone(),
            size: meta.size,
        })
    }

    async fn list(&self, prefix: &ObjectName) -> Result<Vec<ObjectMeta>, StoreError> {
        let full = self.path(prefix.as_str());
        let strip = self.prefix.as_ref().map(|p| p.len() + 1).unwrap_or(0);
        let metas: Vec<_> = self
            .store
            .list(Some(&full))
            .try_collect()
            .await
            .map_err(|e| map_err("list", prefix, e))?;
        let mut out = Vec::with_capacity(metas.len());
        for m in metas {
            let Some(rel) = m.location.as_ref().get(strip..) else {
                continue;
            };
            // Anything that is not a valid object name (e.g. `.staging/`) is not ours to list.
            if let Ok(name) = ObjectName::new(rel) {
                out.push(ObjectMeta { name, size: m.size });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn delete(&self, name: &ObjectName) -> Result<(), StoreError> {
        match self.store.delete(&self.path(name.as_str())).await {
            Ok(()) => Ok(()),
            Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(map_err("delete", name, e)),
        }
    }
}

const API_VERSION: &str = "2023-11-03";

/// Creates the container if it does not exist. `object_store` has no container API, so this is
/// one signed REST call (Create Container); 409 means it already exists.
async fn ensure_container(config: &AzureConfig) -> Result<(), StoreError> {
    let endpoint = config.endpoint();
    let url = format!("{endpoint}/{}?restype=container", config.container);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| StoreError::new(ErrorKind::Permanent, "open", &url).with_detail(e))?;
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    let request = match &config.credential {
        AzureCredential::SharedKey { key } => {
            let path = url
                .split("://")
                .nth(1)
                .and_then(|rest| rest.find('/').map(|i| &rest[i..]))
                .and_then(|p| p.split('?').next())
                .unwrap_or("/");
            let to_sign = format!(
                "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{API_VERSION}\n/{}{path}\nrestype:container",
                config.account
            );
            let key_bytes = base64::engine::general_purpose::STANDARD
                .decode(key.expose())
                .map_err(|e| {
                    StoreError::new(ErrorKind::Permanent, "open", &config.account)
                        .with_detail(format!("shared key is not valid base64: {e}"))
                })?;
            let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key_bytes)
                .expect("HMAC accepts keys of any length");
            mac.update(to_sign.as_bytes());
            let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
            client.put(&url).header(
                "Authorization",
                format!("SharedKey {}:{sig}", config.account),
            )
        }
        AzureCredential::Sas { token } => {
            client.put(format!("{url}&{}", token.expose().trim_start_matches('?')))
        }
        // Managed identities normally hold data-plane roles only; the container must exist.
        AzureCredential::ManagedIdentity { .. } => return Ok(()),
    };
    let response = request
        .header("x-ms-date", &date)
        .header("x-ms-version", API_VERSION)
        .header("Content-Length", "0")
        .send()
        .await
        .map_err(|e| {
            StoreError::new(ErrorKind::Transient, "open", &endpoint)
                .with_detail(format!("cannot reach the blob endpoint: {e}"))
        })?;
    match response.status().as_u16() {
        200..=299 | 409 => Ok(()),
        status => {
            let body = response.text().await.unwrap_or_default();
            let kind = if status >= 500 || status == 429 {
                ErrorKind::Transient
            } else {
                ErrorKind::Permanent
            };
            Err(StoreError::new(kind, "open", &config.container).with_detail(format!(
                "cannot create container (HTTP {status}); check the account name and credential: {}",
                body.chars().take(300).collect::<String>()
            )))
        }
    }
}
