//! The client half of enrolment, shared by the agent and the load generator: make a key pair
//! here (it never leaves), authenticate the coordinator by the CA fingerprint in the join token,
//! exchange token and CSR for a certificate.

use crate::pb;
use crate::pb::enrollment_client::EnrollmentClient;
use crate::tls::{self, TlsError};

/// What enrolment returns: the pinned CA, this client's certificate and private key, the group.
#[derive(Clone)]
pub struct Enrolled {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub group: String,
}

impl std::fmt::Debug for Enrolled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrolled")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

/// Why enrolment failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(
        "the join token is malformed (expected lifeboat1:…, as printed by `lifeboat-coordinator join-token`)"
    )]
    Token,
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot make a key pair: {0}")]
    Key(String),
    #[error("enrolment refused: {0}")]
    Refused(String),
    #[error("the coordinator returned a CA that does not match the join token")]
    CaMismatch,
}

/// The CA fingerprint a join token carries (`lifeboat1:<id>:<secret>:<sha256>`).
pub fn token_fingerprint(token: &str) -> Result<&str, EnrollError> {
    let parts: Vec<&str> = token.trim().split(':').collect();
    match parts.as_slice() {
        ["lifeboat1", _, _, fp] if fp.len() == 64 && fp.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(fp)
        }
        _ => Err(EnrollError::Token),
    }
}

/// Enrols `vm` with the coordinator at `addr` using `token`.
pub async fn enroll(addr: &str, token: &str, vm: &str) -> Result<Enrolled, EnrollError> {
    let fp = token_fingerprint(token)?;
    let key = rcgen::KeyPair::generate().map_err(|e| EnrollError::Key(e.to_string()))?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| EnrollError::Key(e.to_string()))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, vm);
    let csr = params
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(|e| EnrollError::Key(e.to_string()))?;
    let channel = tls::connect(addr, tls::pinned_client_config(fp)?).await?;
    let r = EnrollmentClient::new(channel)
        .enroll(pb::EnrollRequest {
            token: token.trim().to_string(),
            vm: vm.to_string(),
            csr_pem: csr,
        })
        .await
        .map_err(|s| EnrollError::Refused(s.message().to_string()))?
        .into_inner();
    let ca = tls::certs("CA from the coordinator", &r.ca_pem)?;
    if tls::fingerprint(&ca[0]) != fp.to_ascii_lowercase() {
        return Err(EnrollError::CaMismatch);
    }
    Ok(Enrolled {
        ca_pem: r.ca_pem,
        cert_pem: r.certificate_pem,
        key_pem: key.serialize_pem(),
        group: r.group,
    })
}
