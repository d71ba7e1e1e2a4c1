//! Transport security of the contract: rustls configurations for both sides, the pinned-CA
//! verifier used during enrolment, identity helpers, and the one way clients dial port 20004.
//!
//! The group CA is private to the group and pinned by every client, so clients verify the
//! coordinator's certificate for the fixed name [`SERVER_NAME`] whatever address they dial; the
//! address can change (NAT, failover of the coordinator) without reissuing certificates.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tonic::transport::{Channel, Endpoint};

/// The name in the coordinator's certificate that clients verify.
pub const SERVER_NAME: &str = "coordinator.lifeboat";

/// Prefix of an admin certificate's common name; `:` can never appear in a VM id.
pub const ADMIN_PREFIX: &str = "admin:";

/// A TLS set-up problem, with the file or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what}: {why}")]
    Bad { what: String, why: String },
    #[error("cannot connect to the coordinator at {addr}: {why}")]
    Connect { addr: String, why: String },
}

fn bad(what: impl Into<String>, why: impl ToString) -> TlsError {
    TlsError::Bad {
        what: what.into(),
        why: why.to_string(),
    }
}

/// The crypto provider every Lifeboat TLS configuration uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses every certificate of a PEM text.
pub fn certs(what: &str, pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(what, e))?;
    if certs.is_empty() {
        return Err(bad(what, "no certificate in PEM text"));
    }
    Ok(certs)
}

/// Parses a private key from PEM text.
pub fn key(what: &str, pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| bad(what, e))
}

/// SHA-256 of a certificate's DER, lowercase hex: what join tokens carry and what
/// `openssl x509 -noout -fingerprint -sha256` shows (without the colons).
pub fn fingerprint(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn roots(ca_pem: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs("CA certificate", ca_pem)? {
        roots.add(c).map_err(|e| bad("CA certificate", e))?;
    }
    Ok(roots)
}

/// A client configuration trusting only the group CA, optionally presenting a client identity
/// (certificate chain PEM, private key PEM).
pub fn client_config(
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("TLS", e))?
        .with_root_certificates(roots(ca_pem)?);
    let mut config = match identity {
        Some((cert, k)) => builder
            .with_client_auth_cert(certs("client certificate", cert)?, key("client key", k)?)
            .map_err(|e| bad("client certificate", e))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A client configuration for enrolment: no CA is known yet, only the fingerprint from the join
/// token. The server must present its CA in the chain; the CA must match the fingerprint and the
/// server certificate must verify against it.
pub fn pinned_client_config(ca_fingerprint: &str) -> Result<rustls::ClientConfig, TlsError> {
    let verifier = PinnedCa {
        fingerprint: ca_fingerprint.to_ascii_lowercase(),
        provider: provider(),
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("TLS", e))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

#[derive(Debug)]
struct PinnedCa {
    fingerprint: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| fingerprint(c) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the coordinator's CA does not match the fingerprint in the join token".into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Dials the coordinator at `addr` (`host:port`) over TLS with `config`, verifying the server
/// as [`SERVER_NAME`]. The connection is made now, so a wrong address or a refused certificate
/// fails here with a clear message; HTTP/2 keepalives detect a peer cut off later.
pub async fn connect(addr: &str, config: rustls::ClientConfig) -> Result<Channel, TlsError> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let target = addr.to_string();
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| bad("coordinator address", e))?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(2))
        .keep_alive_timeout(Duration::from_secs(4))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    let svc = tower::service_fn(move |_uri: http::Uri| {
        let connector = connector.clone();
        let target = target.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(&target).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(SERVER_NAME).expect("valid name");
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    endpoint
        .connect_with_connector(svc)
        .await
        .map_err(|e| TlsError::Connect {
            addr: addr.to_string(),
            why: error_chain(&e),
        })
}

/// An error and its sources on one line (tonic's transport errors hide the cause otherwise).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
