//! The client half of enrolment, shared by the agent and the load generator: make a key pair
//! here (it never leaves), authenticate the coordinator by the CA fingerprint in the join token,
//! exchange token and CSR for a certificate; and renewal, the same exchange authenticated by the
//! current certificate instead of a token.

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

/// A new key pair and a certificate request for it naming `vm`: (key PEM, CSR PEM).
fn key_and_csr(vm: &str) -> Result<(String, String), EnrollError> {
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
    Ok((key.serialize_pem(), csr))
}

/// Enrols `vm` with the coordinator at `addr` using `token`.
pub async fn enroll(addr: &str, token: &str, vm: &str) -> Result<Enrolled, EnrollError> {
    let fp = token_fingerprint(token)?;
    let (key_pem, csr) = key_and_csr(vm)?;
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
        key_pem,
        group: r.group,
    })
}

/// Renews `current` (an enrolment of `vm`) with the coordinator at `addr`: a new key pair here,
/// a new certificate for it there. The answer is checked to be for `vm` and for the new key, so
/// a confused coordinator cannot leave the agent with a certificate it cannot use.
pub async fn renew(addr: &str, current: &Enrolled, vm: &str) -> Result<Enrolled, EnrollError> {
    let (key_pem, csr) = key_and_csr(vm)?;
    let config = tls::client_config(&current.ca_pem, Some((&current.cert_pem, &current.key_pem)))?;
    let channel = tls::connect(addr, config).await?;
    let r = crate::pb::session_client::SessionClient::new(channel)
        .renew(pb::RenewRequest { csr_pem: csr })
        .await
        .map_err(|s| EnrollError::Refused(s.message().to_string()))?
        .into_inner();
    let cert = tls::certs("renewed certificate", &r.certificate_pem)?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&cert[0])
        .map_err(|e| EnrollError::Refused(format!("the renewed certificate is malformed: {e}")))?;
    let names_vm = parsed
        .subject()
        .iter_common_name()
        .any(|cn| cn.as_str() == Ok(vm));
    let key = rcgen::KeyPair::from_pem(&key_pem).map_err(|e| EnrollError::Key(e.to_string()))?;
    if !names_vm || *parsed.public_key().subject_public_key.data != *key.public_key_raw() {
        return Err(EnrollError::Refused(
            "the coordinator returned a certificate for another VM or key".into(),
        ));
    }
    // Usable with the pinned CA, or refuse it here rather than at the next connection.
    tls::client_config(&current.ca_pem, Some((&r.certificate_pem, &key_pem)))?;
    Ok(Enrolled {
        ca_pem: current.ca_pem.clone(),
        cert_pem: r.certificate_pem,
        key_pem,
        group: current.group.clone(),
    })
}
