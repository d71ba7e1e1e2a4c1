//! The agent's identity in its group: enrolment (key generated here and never sent, the
//! coordinator authenticated by the CA fingerprint in the join token) and the files it leaves in
//! `<state_dir>/identity/`: `ca.pem` (pinned), `agent.pem`, `agent.key` (0600), `coordinator`;
//! and renewal of the certificate before it expires.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use lifeboat_proto::tls;
use lifeboat_store::{GroupId, Secret, VmId};

/// What the agent needs to open its session.
#[derive(Debug, Clone)]
pub struct Identity {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: Secret,
    pub coordinator: String,
}

pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("identity")
}

impl Identity {
    /// Loads the identity `enroll` saved; `coordinator` overrides the address saved with it.
    pub fn load(state_dir: &Path, coordinator: Option<&str>) -> Result<Self> {
        let d = dir(state_dir);
        finish_renewal(&d)?;
        let read = |f: &str| {
            std::fs::read_to_string(d.join(f)).with_context(|| {
                format!(
                    "this agent is not enrolled in a group ({} missing); run `lifeboat-agent enroll --coordinator HOST:20004 --token TOKEN`",
                    d.join(f).display()
                )
            })
        };
        Ok(Identity {
            ca_pem: read("ca.pem")?,
            cert_pem: read("agent.pem")?,
            key_pem: Secret::new(read("agent.key")?),
            coordinator: match coordinator {
                Some(c) => c.to_string(),
                None => read("coordinator")?.trim().to_string(),
            },
        })
    }

    /// The TLS configuration of the session: the pinned CA, this agent's certificate.
    pub fn tls(&self) -> Result<rustls::ClientConfig> {
        Ok(tls::client_config(
            &self.ca_pem,
            Some((&self.cert_pem, self.key_pem.expose())),
        )?)
    }

    /// When the certificate stops being valid.
    pub fn not_after(&self) -> Result<SystemTime> {
        Ok(self.validity()?.1)
    }

    /// When the agent renews the certificate: once less than a third of its lifetime is left,
    /// so an agent that is down or cut off for a while still has months to come back in.
    pub fn renew_at(&self) -> Result<SystemTime> {
        let (from, until) = self.validity()?;
        let life = until.duration_since(from).unwrap_or_default();
        Ok(until - life / 3)
    }

    fn validity(&self) -> Result<(SystemTime, SystemTime)> {
        let der = tls::certs("agent certificate", &self.cert_pem)?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der[0])
            .map_err(|e| anyhow::anyhow!("agent certificate: {e}"))?;
        let at = |t: x509_parser::time::ASN1Time| {
            UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
        };
        Ok((
            at(cert.validity().not_before),
            at(cert.validity().not_after),
        ))
    }
}

/// Renews this agent's certificate with its coordinator (a new key pair, made here) and saves
/// it; from then on the coordinator refuses the old one.
pub async fn renew(state_dir: &Path, identity: &Identity, vm: &VmId) -> Result<Identity> {
    let current = lifeboat_proto::enroll::Enrolled {
        ca_pem: identity.ca_pem.clone(),
        cert_pem: identity.cert_pem.clone(),
        key_pem: identity.key_pem.expose().to_string(),
        group: String::new(),
    };
    let new = lifeboat_proto::enroll::renew(&identity.coordinator, &current, vm.as_str())
        .await
        .context("renewing the agent certificate")?;
    // Both files complete under their `.next` names before either is renamed; `load` finishes
    // an interrupted pair of renames, so key and certificate always match.
    let d = dir(state_dir);
    write(&d.join("agent.key.next"), &new.key_pem, true)?;
    write(&d.join("agent.pem.next"), &new.cert_pem, false)?;
    finish_renewal(&d)?;
    Ok(Identity {
        cert_pem: new.cert_pem,
        key_pem: Secret::new(new.key_pem),
        ..identity.clone()
    })
}

/// Completes the renames of a renewal that was interrupted after both new files were written.
fn finish_renewal(d: &Path) -> Result<()> {
    if !d.join("agent.pem.next").exists() {
        return Ok(());
    }
    if d.join("agent.key.next").exists() {
        std::fs::rename(d.join("agent.key.next"), d.join("agent.key"))
            .context("installing the renewed key")?;
    }
    std::fs::rename(d.join("agent.pem.next"), d.join("agent.pem"))
        .context("installing the renewed certificate")?;
    if let Ok(dir) = std::fs::File::open(d) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// Enrols this VM with the coordinator at `coordinator` using a one-time `token`.
pub async fn enroll(
    state_dir: &Path,
    vm: &VmId,
    group: &GroupId,
    coordinator: &str,
    token: &Secret,
) -> Result<()> {
    let d = dir(state_dir);
    if d.join("agent.pem").exists() {
        bail!(
            "already enrolled ({} exists); remove that directory to enrol again",
            d.display()
        );
    }
    std::fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
    // Windows: the key goes nowhere Users can read (ProgramData's default), before it is
    // written; Unix writes it 0600. Before the token is spent, so that a failure here leaves
    // it usable.
    #[cfg(windows)]
    crate::platform::make_private_dir(state_dir).with_context(|| {
        format!(
            "cannot restrict {} to SYSTEM and Administrators",
            state_dir.display()
        )
    })?;
    let r = lifeboat_proto::enroll::enroll(coordinator, token.expose(), vm.as_str()).await?;
    if r.group != group.as_str() {
        bail!(
            "the coordinator at {coordinator} runs group {}, but this agent's config says group {group}",
            r.group
        );
    }
    write(&d.join("ca.pem"), &r.ca_pem, false)?;
    write(&d.join("agent.key"), &r.key_pem, true)?;
    write(&d.join("coordinator"), coordinator, false)?;
    // Last: its presence means enrolment is complete.
    write(&d.join("agent.pem"), &r.cert_pem, false)?;
    Ok(())
}

fn write(path: &Path, text: &str, private: bool) -> Result<()> {
    let written = match private {
        true => lifeboat_store::durable::replace_private(path, text.as_bytes()),
        false => lifeboat_store::durable::replace(path, text.as_bytes()),
    };
    written.with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate valid from `from` for `days` days.
    fn cert(from: SystemTime, days: u64) -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["vm1".to_string()]).unwrap();
        p.not_before = from.into();
        p.not_after = (from + Duration::from_secs(days * 86_400)).into();
        p.self_signed(&key).unwrap().pem()
    }

    fn identity(cert_pem: String) -> Identity {
        Identity {
            ca_pem: String::new(),
            cert_pem,
            key_pem: Secret::new("k"),
            coordinator: "c:20004".into(),
        }
    }

    #[test]
    fn renewal_is_due_with_a_third_of_the_lifetime_left() {
        let from = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let id = identity(cert(from, 300));
        assert_eq!(
            id.renew_at().unwrap(),
            from + Duration::from_secs(200 * 86_400)
        );
        assert_eq!(
            id.not_after().unwrap(),
            from + Duration::from_secs(300 * 86_400)
        );
    }

    #[test]
    fn an_interrupted_renewal_is_finished_on_load() {
        let state = tempfile::tempdir().unwrap();
        let d = dir(state.path());
        std::fs::create_dir_all(&d).unwrap();
        for (f, text) in [
            ("ca.pem", "ca"),
            ("coordinator", "c:20004"),
            ("agent.key", "old key"),
            ("agent.pem", "old cert"),
            ("agent.key.next", "new key"),
            ("agent.pem.next", "new cert"),
        ] {
            std::fs::write(d.join(f), text).unwrap();
        }
        // Killed before any rename: both are installed.
        let id = Identity::load(state.path(), None).unwrap();
        assert_eq!(
            (id.key_pem.expose(), id.cert_pem.as_str()),
            ("new key", "new cert")
        );
        // Killed between the two renames: the certificate follows the key.
        std::fs::write(d.join("agent.key"), "newer key").unwrap();
        std::fs::write(d.join("agent.pem.next"), "newer cert").unwrap();
        let id = Identity::load(state.path(), None).unwrap();
        assert_eq!(
            (id.key_pem.expose(), id.cert_pem.as_str()),
            ("newer key", "newer cert")
        );
        assert!(!d.join("agent.pem.next").exists() && !d.join("agent.key.next").exists());
    }
}
