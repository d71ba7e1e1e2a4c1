//! The group's private PKI: a CA created by `init`, the coordinator's server certificate, the
//! admin credential, and signing of agents' certificate requests at enrolment.
//!
//! Layout under the state directory (keys are mode 0600):
//! `pki/{ca.pem,ca.key,server.pem,server.key}` — the coordinator's own;
//! `admin/{ca.pem,admin.pem,admin.key}` — what the `lifeboat` CLI needs (`--credentials`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use lifeboat_proto::tls::{ADMIN_PREFIX, SERVER_NAME};
use lifeboat_store::VmId;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

/// How long issued certificates are valid.
const CA_DAYS: i64 = 3650;
const SERVER_DAYS: i64 = 825;
const ADMIN_DAYS: i64 = 365;

pub fn pki_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("pki")
}
pub fn admin_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("admin")
}

fn validity(p: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    // A little backdating absorbs clock skew between coordinator and agents.
    p.not_before = now - Duration::hours(1);
    p.not_after = now + Duration::days(days);
}

pub(crate) fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    let mut f = o
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

fn write_public(path: &Path, text: &str) -> Result<()> {
    lifeboat_store::durable::replace(path, text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn leaf_params(cn: &str, sans: Vec<String>, days: i64) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(sans)?;
    p.distinguished_name.push(DnType::CommonName, cn);
    p.use_authority_key_identifier_extension = true;
    p.key_usages.push(KeyUsagePurpose::DigitalSignature);
    validity(&mut p, days);
    Ok(p)
}

/// Creates the group's CA, server certificate and admin credential. Refuses to overwrite an
/// existing PKI: a new CA would orphan every enrolled agent.
pub fn init(state_dir: &Path, group: &str, extra_names: &[String]) -> Result<String> {
    let dir = pki_dir(state_dir);
    if dir.join("ca.pem").exists() {
        bail!(
            "{} already holds a CA; refusing to replace it (every enrolled agent trusts it)",
            dir.display()
        );
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let admin = admin_dir(state_dir);
    std::fs::create_dir_all(&admin)?;

    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, format!("Lifeboat group {group} CA"));
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca, CA_DAYS);
    let ca_cert = ca.self_signed(&ca_key)?;
    let ca_pem = ca_cert.pem();
    let issuer = Issuer::new(ca, ca_key);

    let mut names = vec![SERVER_NAME.to_string()];
    names.extend(extra_names.iter().cloned());
    let server_key = KeyPair::generate()?;
    let mut sp = leaf_params(SERVER_NAME, names, SERVER_DAYS)?;
    sp.extended_key_usages
        .push(ExtendedKeyUsagePurpose::ServerAuth);
    let server = sp.signed_by(&server_key, &issuer)?;

    let admin_key = KeyPair::generate()?;
    let mut ap = leaf_params(&format!("{ADMIN_PREFIX}default"), vec![], ADMIN_DAYS)?;
    ap.extended_key_usages
        .push(ExtendedKeyUsagePurpose::ClientAuth);
    let admin_cert = ap.signed_by(&admin_key, &issuer)?;

    write_private(&dir.join("ca.key"), &issuer.key().serialize_pem())?;
    write_private(&dir.join("server.key"), &server_key.serialize_pem())?;
    write_public(&dir.join("server.pem"), &server.pem())?;
    write_private(&admin.join("admin.key"), &admin_key.serialize_pem())?;
    write_public(&admin.join("admin.pem"), &admin_cert.pem())?;
    write_public(&admin.join("ca.pem"), &ca_pem)?;
    // Written last: its presence means the PKI is complete.
    write_public(&dir.join("ca.pem"), &ca_pem)?;
    let der = lifeboat_proto::tls::certs("CA", &ca_pem)?;
    Ok(lifeboat_proto::tls::fingerprint(&der[0]))
}

/// The loaded CA: signs agents' requests.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub ca_pem: String,
    pub fingerprint: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read {} (run `lifeboat-coordinator init` first)",
            path.display()
        )
    })
}

impl Ca {
    pub fn load(state_dir: &Path) -> Result<Self> {
        let dir = pki_dir(state_dir);
        let ca_pem = read(&dir.join("ca.pem"))?;
        let key = KeyPair::from_pem(&read(&dir.join("ca.key"))?).context("ca.key")?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, key).context("ca.pem")?;
        let der = lifeboat_proto::tls::certs("CA", &ca_pem)?;
        Ok(Ca {
            issuer,
            fingerprint: lifeboat_proto::tls::fingerprint(&der[0]),
            ca_pem,
        })
    }

    /// Signs an agent's request for `vm`. Only the request's public key is used: the subject,
    /// names and extensions are the coordinator's choice, never the requester's.
    pub fn sign_agent(&self, csr_pem: &str, vm: &VmId, lifetime_days: i64) -> Result<String> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| anyhow::anyhow!("malformed certificate signing request: {e}"))?;
        let mut p = leaf_params(vm.as_str(), vec![], lifetime_days)?;
        p.extended_key_usages
            .push(ExtendedKeyUsagePurpose::ClientAuth);
        csr.params = p;
        Ok(csr.signed_by(&self.issuer)?.pem())
    }
}

/// The coordinator's certificate chain (server, then CA — enrolling agents pin the CA from the
/// chain) and key.
pub fn server_identity(state_dir: &Path) -> Result<(String, String)> {
    let dir = pki_dir(state_dir);
    let chain = read(&dir.join("server.pem"))? + &read(&dir.join("ca.pem"))?;
    Ok((chain, read(&dir.join("server.key"))?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_then_sign_uses_only_the_requesters_key() {
        let dir = tempfile::tempdir().unwrap();
        let fp = init(dir.path(), "g", &[]).unwrap();
        assert!(
            init(dir.path(), "g", &[])
                .unwrap_err()
                .to_string()
                .contains("refusing")
        );
        let ca = Ca::load(dir.path()).unwrap();
        assert_eq!(ca.fingerprint, fp);
        let key = KeyPair::generate().unwrap();
        let mut req = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
        req.distinguished_name.push(DnType::CommonName, "other-vm");
        let csr = req.serialize_request(&key).unwrap().pem().unwrap();
        let pem = ca
            .sign_agent(&csr, &VmId::new("vm1").unwrap(), 365)
            .unwrap();
        let der = lifeboat_proto::tls::certs("c", &pem).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der[0]).unwrap();
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap();
        assert_eq!(cn, "vm1");
        assert!(cert.subject_alternative_name().unwrap().is_none());
        assert!(
            ca.sign_agent("garbage", &VmId::new("vm1").unwrap(), 365)
                .is_err()
        );
    }
}
