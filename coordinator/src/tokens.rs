//! One-time, expiring join tokens. `lifeboat-coordinator join-token` mints one into the state
//! directory; the running coordinator consumes it at enrolment (an atomic rename, so two
//! concurrent uses cannot both succeed).
//!
//! A token reads `lifeboat1:<id>:<secret>:<ca-sha256>`. Only a SHA-256 of the secret is stored.
//! The CA fingerprint lets the agent authenticate the coordinator before it trusts anything.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use lifeboat_store::manifest::now_millis;
use lifeboat_store::{Secret, VmId};
use ring::rand::SecureRandom;
use serde::{Deserialize, Serialize};

const PREFIX: &str = "lifeboat1";

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    vm: Option<VmId>,
    expires_ms: u64,
    secret_sha256: String,
}

fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("tokens")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256(s: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, s.as_bytes()).as_ref())
}

/// The longest a token may stay valid: a token is a credential waiting to be used, meant for
/// one enrolment soon after it is minted. One year as humantime counts it (365.25 days), so
/// `--ttl 1year` is the longest.
pub const MAX_TTL: Duration = Duration::from_secs(31_557_600);

/// Checks a token lifetime against [`MAX_TTL`] (the CLI's parser, and `mint`).
pub fn check_ttl(ttl: Duration) -> Result<Duration> {
    anyhow::ensure!(
        ttl <= MAX_TTL,
        "a join token may be valid for at most {} (asked for {})",
        humantime::format_duration(MAX_TTL),
        humantime::format_duration(ttl)
    );
    Ok(ttl)
}

/// Mints a token valid for `ttl` (at most [`MAX_TTL`]), bound to `vm` if given. Nothing is
/// written when `ttl` is refused.
pub fn mint(
    state_dir: &Path,
    ca_fingerprint: &str,
    vm: Option<VmId>,
    ttl: Duration,
) -> Result<Secret> {
    let expires_ms = u64::try_from(check_ttl(ttl)?.as_millis())
        .ok()
        .and_then(|ttl| now_millis().checked_add(ttl))
        .context("the token's expiry time is out of range")?;
    let rng = ring::rand::SystemRandom::new();
    let mut id = [0u8; 8];
    let mut secret = [0u8; 24];
    rng.fill(&mut id)
        .map_err(|_| anyhow::anyhow!("no randomness"))?;
    rng.fill(&mut secret)
        .map_err(|_| anyhow::anyhow!("no randomness"))?;
    let (id, secret) = (hex(&id), hex(&secret));
    let d = dir(state_dir);
    std::fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
    let stored = Stored {
        vm,
        expires_ms,
        secret_sha256: sha256(&secret),
    };
    crate::pki::write_private(
        &d.join(format!("{id}.json")),
        &serde_json::to_string(&stored)?,
    )?;
    Ok(Secret::new(format!(
        "{PREFIX}:{id}:{secret}:{ca_fingerprint}"
    )))
}

/// Splits a token into (id, secret, CA fingerprint); used by agents too.
pub fn parse(token: &str) -> Option<(&str, &str, &str)> {
    let mut it = token.trim().split(':');
    let (p, id, secret, fp) = (it.next()?, it.next()?, it.next()?, it.next()?);
    let hexy = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (p == PREFIX && it.next().is_none() && hexy(id, 16) && hexy(secret, 48) && hexy(fp, 64))
        .then_some((id, secret, fp))
}

/// Why a token was refused. `Invalid` covers unknown, used and expired alike on the wire.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("join token is malformed, unknown, expired or already used")]
    Invalid(&'static str),
    #[error("join token was minted for VM {minted}, not {claimed}")]
    WrongVm { minted: String, claimed: String },
}

/// Consumes a token for `vm`: the first presentation past the secret check uses it up, whatever
/// the outcome.
pub fn consume(state_dir: &Path, token: &str, vm: &VmId) -> Result<(), TokenError> {
    let (id, secret, _) = parse(token).ok_or(TokenError::Invalid("malformed"))?;
    let d = dir(state_dir);
    let path = d.join(format!("{id}.json"));
    let text =
        std::fs::read_to_string(&path).map_err(|_| TokenError::Invalid("unknown or used"))?;
    let stored: Stored =
        serde_json::from_str(&text).map_err(|_| TokenError::Invalid("unreadable token record"))?;
    if !constant_time_eq(sha256(secret).as_bytes(), stored.secret_sha256.as_bytes()) {
        return Err(TokenError::Invalid("wrong secret"));
    }
    std::fs::rename(&path, d.join(format!("{id}.used")))
        .map_err(|_| TokenError::Invalid("already used"))?;
    if now_millis() > stored.expires_ms {
        return Err(TokenError::Invalid("expired"));
    }
    if let Some(m) = stored.vm
        && &m != vm
    {
        return Err(TokenError::WrongVm {
            minted: m.to_string(),
            claimed: vm.to_string(),
        });
    }
    Ok(())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_one_time_expiring_and_bound() {
        let dir = tempfile::tempdir().unwrap();
        let fp = "ab".repeat(32);
        let vm = VmId::new("vm1").unwrap();
        let t = mint(dir.path(), &fp, None, Duration::from_secs(60)).unwrap();
        assert!(!format!("{t:?}").contains(':'), "a token never prints");
        assert_eq!(parse(t.expose()).unwrap().2, fp);
        consume(dir.path(), t.expose(), &vm).unwrap();
        assert_eq!(
            consume(dir.path(), t.expose(), &vm),
            Err(TokenError::Invalid("unknown or used"))
        );

        let t = mint(dir.path(), &fp, None, Duration::ZERO).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(
            consume(dir.path(), t.expose(), &vm),
            Err(TokenError::Invalid("expired"))
        );

        let t = mint(
            dir.path(),
            &fp,
            Some(VmId::new("vm2").unwrap()),
            Duration::from_secs(60),
        )
        .unwrap();
        assert!(matches!(
            consume(dir.path(), t.expose(), &vm),
            Err(TokenError::WrongVm { .. })
        ));

        let t = mint(dir.path(), &fp, None, Duration::from_secs(60)).unwrap();
        let mut forged = t.expose().to_string();
        let i = forged.find(':').unwrap() + 18;
        forged.replace_range(i..i + 1, if &forged[i..i + 1] == "0" { "1" } else { "0" });
        assert_eq!(
            consume(dir.path(), &forged, &vm),
            Err(TokenError::Invalid("wrong secret"))
        );
        // The forged attempt did not burn the real token.
        consume(dir.path(), t.expose(), &vm).unwrap();
        assert_eq!(
            consume(dir.path(), "lifeboat1:zz", &vm),
            Err(TokenError::Invalid("malformed"))
        );
    }

    #[test]
    fn lifetimes_beyond_the_maximum_are_refused_and_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let fp = "ab".repeat(32);
        let vm = VmId::new("vm1").unwrap();
        // Far beyond: once wrapped around into a token that never expired.
        let huge = humantime::parse_duration("1000000000years").unwrap();
        for ttl in [huge, MAX_TTL + Duration::from_millis(1), Duration::MAX] {
            let e = mint(dir.path(), &fp, None, ttl).unwrap_err().to_string();
            assert!(e.contains("at most 1year"), "{e}");
            assert!(
                !dir.path().join("tokens").exists(),
                "{ttl:?} wrote something"
            );
        }
        assert_eq!(humantime::parse_duration("1year").unwrap(), MAX_TTL);
        // The boundary itself works and expires when it says.
        let before = now_millis();
        let t = mint(dir.path(), &fp, Some(vm.clone()), MAX_TTL).unwrap();
        let (id, _, _) = parse(t.expose()).unwrap();
        let stored: Stored = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("tokens").join(format!("{id}.json"))).unwrap(),
        )
        .unwrap();
        let ttl = MAX_TTL.as_millis() as u64;
        assert!(
            (before + ttl..=now_millis() + ttl).contains(&stored.expires_ms),
            "{}",
            stored.expires_ms
        );
        consume(dir.path(), t.expose(), &vm).unwrap();
    }
}
