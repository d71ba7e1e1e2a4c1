//! The agent's identity in its group: enrolment (key generated here and never sent, the
//! coordinator authenticated by the CA fingerprint in the join token) and the files it leaves in
//! `<state_dir>/identity/`: `ca.pem` (pinned), `agent.pem`, `agent.key` (0600), `coordinator`.

use std::path::{Path, PathBuf};

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
    pub fn not_after(&self) -> Result<std::time::SystemTime> {
        let der = tls::certs("agent certificate", &self.cert_pem)?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der[0])
            .map_err(|e| anyhow::anyhow!("agent certificate: {e}"))?;
        let secs = cert.validity().not_after.timestamp();
        Ok(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64))
    }
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
    let r = lifeboat_proto::enroll::enroll(coordinator, token.expose(), vm.as_str()).await?;
    if r.group != group.as_str() {
        bail!(
            "the coordinator at {coordinator} runs group {}, but this agent's config says group {group}",
            r.group
        );
    }
    std::fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
    write(&d.join("ca.pem"), &r.ca_pem, false)?;
    write(&d.join("agent.key"), &r.key_pem, true)?;
    write(&d.join("coordinator"), coordinator, false)?;
    // Last: its presence means enrolment is complete.
    write(&d.join("agent.pem"), &r.cert_pem, false)?;
    Ok(())
}

fn write(path: &Path, text: &str, private: bool) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut f = o
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
