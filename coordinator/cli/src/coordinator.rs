//! Reaching a group's coordinator as an admin: mutual TLS with the admin credentials, and its
//! refusals turned into exit codes.

use std::path::PathBuf;

use anyhow::Result;
use lifeboat_proto::pb::admin_client::AdminClient;

use crate::UsageError;

/// How to reach a group's coordinator as an admin.
#[derive(Debug, clap::Args)]
pub struct CoordinatorArgs {
    /// The coordinator, `host:port` (port 20004).
    #[arg(long, env = "LIFEBOAT_COORDINATOR")]
    pub coordinator: String,
    /// Directory holding `ca.pem`, `admin.pem` and `admin.key` (the coordinator's
    /// `<state_dir>/admin`, copied to the admin's machine).
    #[arg(long, env = "LIFEBOAT_CREDENTIALS")]
    pub credentials: PathBuf,
}

pub async fn admin(args: &CoordinatorArgs) -> Result<AdminClient<tonic::transport::Channel>> {
    let read = |f: &str| {
        let p = args.credentials.join(f);
        std::fs::read_to_string(&p)
            .map_err(|e| UsageError(format!("cannot read {}: {e}", p.display())))
    };
    let (ca, cert, key) = (read("ca.pem")?, read("admin.pem")?, read("admin.key")?);
    let tls = lifeboat_proto::tls::client_config(&ca, Some((&cert, &key)))?;
    let channel = lifeboat_proto::tls::connect(&args.coordinator, tls).await?;
    Ok(AdminClient::new(channel))
}

pub fn status_error(s: tonic::Status) -> anyhow::Error {
    let msg = format!("coordinator: {}", s.message());
    match s.code() {
        tonic::Code::InvalidArgument | tonic::Code::NotFound => UsageError(msg).into(),
        _ => anyhow::anyhow!(msg),
    }
}
