//! Azure Blob backend, through `object_store` (tested against Azurite).
//!
//! Least privilege: opening a store never needs more than read and list on the container. An
//! open checks that the container exists with one list request (so a missing container is one
//! clear error, not "not found" for every object); only a writer's open, or `lifeboat store
//! init`, tries to create a missing one, and a credential that may not gets an error naming
//! the container and saying how to create it. Which rights each component needs is in
//! `docs/azure.md`.
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
use object_store::list::{PaginatedListOptions, PaginatedListStore};
use object_store::path::Path;
use object_store::{
    ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode, PutOptions,
    PutPayload, RetryConfig, WriteMultipart,
};
use serde::Deserialize;

use super::{Backend, ErrorKind, Init, ObjectMeta, OpenMode, StoreError, check_range};
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
    /// Container name. A writer's open creates it when missing if the credential may (the
    /// account key, or an account SAS allowing it); otherwise `lifeboat store init` does.
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

    /// Checks names and the credential's shape before any request; messages name the field,
    /// never a secret's value.
    pub fn validate(&self) -> Result<(), String> {
        let a = &self.account;
        if a.len() < 3
            || a.len() > 24
            || !a
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(format!(
                "store.account {a:?}: an Azure storage account name is 3-24 lowercase letters and digits"
            ));
        }
        let c = &self.container;
        let valid = (3..=63).contains(&c.len())
            && c.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !c.starts_with('-')
            && !c.ends_with('-')
            && !c.contains("--");
        if !valid {
            return Err(format!(
                "store.container {c:?}: a container name is 3-63 lowercase letters, digits and single hyphens, starting and ending with a letter or digit"
            ));
        }
        if let Some(e) = &self.endpoint
            && !(e.starts_with("https://") || e.starts_with("http://"))
        {
            return Err(format!(
                "store.endpoint {e:?} must start with https:// (or http:// for an emulator)"
            ));
        }
        if let Some(p) = &self.prefix
            && !p.is_empty()
            && crate::name::ObjectName::new(p.as_str()).is_err()
        {
            return Err(format!(
                "store.prefix {p:?}: use `/`-separated components of letters, digits, `.`, `_`, `-`"
            ));
        }
        match &self.credential {
            AzureCredential::SharedKey { key } => {
                base64::engine::general_purpose::STANDARD
                    .decode(key.expose())
                    .map_err(|_| "store.credential.key is not valid base64 (copy the account key as shown by the portal or `az storage account keys list`)".to_string())?;
            }
            AzureCredential::Sas { token } => {
                let t = token.expose().trim_start_matches('?');
                let pairs: Vec<&str> = t.split('&').collect();
                let has = |k: &str| pairs.iter().any(|p| p.starts_with(&format!("{k}=")));
                if t.is_empty()
                    || t.contains(|c: char| c.is_whitespace() || c == '#')
                    || !has("sig")
                    || !has("sv")
                {
                    return Err("store.credential.token is not a SAS token (a query string with `sv=` and `sig=`, as `az storage container generate-sas` prints)".into());
                }
            }
            AzureCredential::ManagedIdentity { .. } => {}
        }
        Ok(())
    }

    /// The permissions a SAS token grants (`sp=`), for error messages; `None` for other
    /// credentials or a token that defers to a stored access policy.
    fn sas_permissions(&self) -> Option<String> {
        let AzureCredential::Sas { token } = &self.credential else {
            return None;
        };
        token
            .expose()
            .trim_start_matches('?')
            .split('&')
            .find_map(|p| p.strip_prefix("sp="))
            .map(str::to_owned)
    }

    fn endpoint(&self) -> String {
        self.endpoint
            .clone()
            .unwrap_or_else(|| format!("https://{}.blob.core.windows.net", self.account))
            .trim_end_matches('/')
            .to_owned()
    }
}

/// An Azure Blob container as a [`Backend`]. `Debug` is written by hand: the client's own
/// shows the credential (a SAS token's signature in clear).
#[derive(Clone)]
pub struct AzureBackend {
    store: Arc<MicrosoftAzure>,
    prefix: Option<String>,
    container: String,
    /// What the SAS grants (`sp=`), quoted when a request is denied.
    sas_permissions: Option<String>,
}

impl std::fmt::Debug for AzureBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureBackend")
            .field("container", &self.container)
            .field("prefix", &self.prefix)
            .field("sas_permissions", &self.sas_permissions)
            .finish_non_exhaustive()
    }
}

fn map_err(op: &'static str, name: impl std::fmt::Display, e: object_store::Error) -> StoreError {
    use object_store::Error as E;
    let kind = match &e {
        E::NotFound { .. } => ErrorKind::NotFound,
        E::AlreadyExists { .. } | E::Precondition { .. } => ErrorKind::AlreadyExists,
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => ErrorKind::Denied,
        E::InvalidPath { .. } | E::NotSupported { .. } | E::NotImplemented { .. } => {
            ErrorKind::Permanent
        }
        other => classify_generic(other),
    };
    StoreError::new(kind, op, name).with_detail(e)
}

/// `object_store` hides the HTTP status of some failures inside its error text: listings
/// ("status code: 403") and deletes, which go through a batch request whose per-blob answer
/// says "(code: 403)".
fn status_of(e: &(dyn std::error::Error + 'static)) -> Option<u16> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        for marker in ["status code: ", "(code: "] {
            if let Some(pos) = text.find(marker) {
                let code = text[pos + marker.len()..]
                    .chars()
                    .take(3)
                    .collect::<String>();
                if let Ok(code) = code.parse() {
                    return Some(code);
                }
            }
        }
        cur = err.source();
    }
    None
}

/// A 403 will fail again for the same reason; any other 4xx but 408/429 too; anything else
/// (5xx, timeouts, resets) may not.
fn classify_generic(e: &(dyn std::error::Error + 'static)) -> ErrorKind {
    match status_of(e) {
        Some(401 | 403) => ErrorKind::Denied,
        Some(408 | 429) => ErrorKind::Transient,
        Some(400..=499) => ErrorKind::Permanent,
        _ => ErrorKind::Transient,
    }
}

/// The SAS permission letter an operation needs (docs/azure.md has the table).
fn permission_for(op: &str) -> &'static str {
    match op {
        // Not create (c) alone: a create-only put of an existing name is then refused (403)
        // instead of answered "already exists" (409), which a retried put relies on.
        "put" => "write (w)",
        "delete" => "delete (d)",
        "list" => "list (l)",
        _ => "read (r)",
    }
}

impl AzureBackend {
    /// Objects larger than this go up in blocks (and through a staging name).
    pub const MULTIPART_THRESHOLD: usize = 32 << 20;
    const BLOCK_SIZE: usize = 8 << 20;

    /// Connects as a writer: a missing container is created if the credential may.
    pub async fn open(config: &AzureConfig) -> Result<Self, StoreError> {
        Self::open_as(config, OpenMode::ReadWrite).await
    }

    /// Connects to the container, checking that it exists (one list request); in
    /// [`OpenMode::ReadWrite`] a missing container is created if the credential may.
    pub async fn open_as(config: &AzureConfig, mode: OpenMode) -> Result<Self, StoreError> {
        let backend = Self::connect(config)?;
        if !backend.container_exists().await? {
            match mode {
                OpenMode::ReadOnly => return Err(missing_container(config, None)),
                OpenMode::ReadWrite => {
                    create_container(config).await?;
                }
            }
        }
        Ok(backend)
    }

    /// Builds the client; no request yet.
    fn connect(config: &AzureConfig) -> Result<Self, StoreError> {
        config.validate().map_err(|e| {
            StoreError::new(ErrorKind::Permanent, "open", &config.container).with_detail(e)
        })?;
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
        Ok(Self {
            store: Arc::new(store),
            prefix: config.prefix.clone().filter(|p| !p.is_empty()),
            container: config.container.clone(),
            sas_permissions: config.sas_permissions(),
        })
    }

    /// Whether the container exists, by listing at most one blob: what every component may
    /// do (read-only SAS tokens included), unlike reading the container's properties, which
    /// a service SAS cannot.
    async fn container_exists(&self) -> Result<bool, StoreError> {
        let opts = PaginatedListOptions {
            max_keys: Some(1),
            ..Default::default()
        };
        match self
            .store
            .list_paginated(self.prefix.as_deref(), opts)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.to_string().contains("ContainerNotFound") || status_of(&e) == Some(404) => {
                Ok(false)
            }
            Err(e) => {
                let kind = classify_generic(&e);
                let hint = if kind == ErrorKind::Denied {
                    format!(
                        "the credential may not list container {} (every component needs read and list{}; or the key, token or its validity period is wrong): ",
                        self.container,
                        self.granted()
                    )
                } else {
                    String::new()
                };
                Err(StoreError::new(kind, "open", &self.container)
                    .with_detail(format!("{hint}{e}")))
            }
        }
    }

    /// ", the SAS grants `rl`" when the token says, for messages.
    fn granted(&self) -> String {
        self.sas_permissions
            .as_ref()
            .map(|p| format!("; the SAS token grants `{p}`"))
            .unwrap_or_default()
    }

    /// Adds to a denied request's error which right it needed, and what the SAS grants.
    fn explain(&self, e: StoreError) -> StoreError {
        if e.kind != ErrorKind::Denied {
            return e;
        }
        let why = format!(
            "the credential lacks the {} permission on container {}{} (docs/azure.md lists what each component needs)",
            permission_for(e.op),
            self.container,
            self.granted()
        );
        let detail = e.detail.clone().unwrap_or_default();
        StoreError { detail: None, ..e }.with_detail(format!("{why}: {detail}"))
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
        self.put_new_inner(name, data)
            .await
            .map_err(|e| self.explain(e))
    }

    async fn get(&self, name: &ObjectName) -> Result<Bytes, StoreError> {
        self.get_inner(name).await.map_err(|e| self.explain(e))
    }

    async fn get_range(&self, name: &ObjectName, range: Range<u64>) -> Result<Bytes, StoreError> {
        self.get_range_inner(name, range)
            .await
            .map_err(|e| self.explain(e))
    }

    async fn head(&self, name: &ObjectName) -> Result<ObjectMeta, StoreError> {
        self.head_inner(name).await.map_err(|e| self.explain(e))
    }

    async fn list(&self, prefix: &ObjectName) -> Result<Vec<ObjectMeta>, StoreError> {
        self.list_inner(prefix).await.map_err(|e| self.explain(e))
    }

    async fn delete(&self, name: &ObjectName) -> Result<(), StoreError> {
        self.delete_inner(name).await.map_err(|e| self.explain(e))
    }
}

/// The operations themselves; [`Backend`] adds to a denied one which right it lacked.
impl AzureBackend {
    async fn put_new_inner(&self, name: &ObjectName, data: Bytes) -> Result<(), StoreError> {
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

    async fn get_inner(&self, name: &ObjectName) -> Result<Bytes, StoreError> {
        let result = self
            .store
            .get(&self.path(name.as_str()))
            .await
            .map_err(|e| map_err("get", name, e))?;
        result.bytes().await.map_err(|e| map_err("get", name, e))
    }

    async fn get_range_inner(
        &self,
        name: &ObjectName,
        range: Range<u64>,
    ) -> Result<Bytes, StoreError> {
        let size = self.head_inner(name).await?.size;
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

    async fn head_inner(&self, name: &ObjectName) -> Result<ObjectMeta, StoreError> {
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

    async fn list_inner(&self, prefix: &ObjectName) -> Result<Vec<ObjectMeta>, StoreError> {
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

    async fn delete_inner(&self, name: &ObjectName) -> Result<(), StoreError> {
        match self.store.delete(&self.path(name.as_str())).await {
            Ok(()) => Ok(()),
            Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(map_err("delete", name, e)),
        }
    }
}

const API_VERSION: &str = "2023-11-03";

/// `lifeboat store init`: creates the container if it does not exist.
pub async fn init(config: &AzureConfig) -> Result<Init, StoreError> {
    let backend = AzureBackend::connect(config)?;
    if backend.container_exists().await? {
        return Ok(Init::Existed);
    }
    create_container(config).await
}

/// The error for a container that does not exist, with how to create it; `refused` is why a
/// writer could not create it itself.
fn missing_container(config: &AzureConfig, refused: Option<String>) -> StoreError {
    let why = match refused {
        Some(r) => format!(" and this credential may not create it ({r})"),
        None => String::new(),
    };
    StoreError::new(ErrorKind::Permanent, "open", &config.container).with_detail(format!(
        "container {} does not exist in storage account {}{why}: create it once with `lifeboat store init --store <this store's .toml>` using the account key (or an account SAS allowing container creation), or with `az storage container create --name {} --account-name {}`, then retry",
        config.container, config.account, config.container, config.account
    ))
}

/// Creates the container. `object_store` has no container API, so this is one signed REST
/// call (Create Container); 409 means it exists already.
async fn create_container(config: &AzureConfig) -> Result<Init, StoreError> {
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
        // Creating a container is a management-plane right identities rarely hold, and
        // `object_store` does not lend us its token: the admin creates it.
        AzureCredential::ManagedIdentity { .. } => {
            return Err(missing_container(
                config,
                Some("Lifeboat creates containers only with the account key or a SAS".into()),
            ));
        }
    };
    let response = request
        .header("x-ms-date", &date)
        .header("x-ms-version", API_VERSION)
        .header("Content-Length", "0")
        .send()
        .await
        .map_err(|e| {
            // Without the URL: with a SAS it carries the token.
            StoreError::new(ErrorKind::Transient, "open", &endpoint).with_detail(format!(
                "cannot reach the blob endpoint: {}",
                e.without_url()
            ))
        })?;
    match response.status().as_u16() {
        200..=299 => Ok(Init::Created),
        409 => Ok(Init::Existed),
        status @ (401 | 403) => {
            let body = response.text().await.unwrap_or_default();
            let code = azure_code(&body);
            let mut e = missing_container(config, Some(format!("HTTP {status} {code}")));
            e.kind = ErrorKind::Denied;
            Err(e)
        }
        status => {
            let body = response.text().await.unwrap_or_default();
            let kind = if status >= 500 || status == 429 {
                ErrorKind::Transient
            } else {
                ErrorKind::Permanent
            };
            Err(StoreError::new(kind, "open", &config.container).with_detail(format!(
                "cannot create container (HTTP {status} {}); check the account name and credential",
                azure_code(&body)
            )))
        }
    }
}

/// The `<Code>` of an Azure error body (e.g. `AuthorizationPermissionMismatch`).
fn azure_code(body: &str) -> &str {
    body.split_once("<Code>")
        .and_then(|(_, rest)| rest.split_once("</Code>"))
        .map(|(code, _)| code)
        .unwrap_or("")
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use crate::StoreConfig;

    const SAS: &str = "sv=2023-11-03&se=2099-01-01T00%3A00%3A00Z&sr=c&sp=rwl&sig=c2VjcmV0";

    /// Parses and validates a store description (JSON here; configs use TOML, same serde).
    fn parse(account: &str, container: &str, credential: Value) -> Result<StoreConfig, String> {
        let v = json!({
            "kind": "azure",
            "account": account,
            "container": container,
            "credential": credential,
        });
        let config: StoreConfig = serde_json::from_value(v).map_err(|e| e.to_string())?;
        config.validate()?;
        Ok(config)
    }

    fn sas(token: &str) -> Value {
        json!({ "kind": "sas", "token": token })
    }

    /// A SAS token is read from the config, never shown by `Debug`, and its shape is checked
    /// before any request, in messages that do not repeat it; unknown fields are refused.
    #[test]
    fn sas_tokens_are_validated_and_never_printed() {
        let config = parse("contosodr", "lifeboat-cache", sas(&format!("?{SAS}"))).unwrap();
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("c2VjcmV0") && !shown.contains("sig="),
            "{shown}"
        );
        let StoreConfig::Azure(azure) = &config else {
            panic!("not azure")
        };
        assert_eq!(azure.sas_permissions().as_deref(), Some("rwl"));

        for bad in ["not a token", "sv=2023-11-03&sp=rl", "sig=abc"] {
            let err = parse("contosodr", "lifeboat-cache", sas(bad)).unwrap_err();
            assert!(err.contains("store.credential.token"), "{err}");
            assert!(!err.contains(bad), "{err}");
        }
        let extra = json!({ "kind": "sas", "token": SAS, "permissions": "rl" });
        let err = parse("contosodr", "lifeboat-cache", extra).unwrap_err();
        assert!(err.contains("unknown field"), "{err}");
        let key = json!({ "kind": "shared_key", "key": "not base64!" });
        let err = parse("contosodr", "lifeboat-cache", key).unwrap_err();
        assert!(err.contains("store.credential.key"), "{err}");
    }

    #[test]
    fn names_are_checked_at_the_edge() {
        let with = |account: &str, container: &str| {
            parse(account, container, json!({ "kind": "managed_identity" }))
        };
        assert!(with("contosodr", "lifeboat-cache").is_ok());
        assert!(
            with("Contoso", "lifeboat")
                .unwrap_err()
                .contains("store.account")
        );
        for c in ["Lifeboat", "ab", "-x-y", "a--b", "a_b"] {
            assert!(
                with("contosodr", c)
                    .unwrap_err()
                    .contains("store.container"),
                "{c}"
            );
        }
    }
}
