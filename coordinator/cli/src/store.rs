//! `lifeboat store init`: creates a store's Azure container (or local directory) — the one step
//! that needs a credential allowed to create containers.

use std::path::PathBuf;

use anyhow::Result;
use lifeboat_store::StoreConfig;
use lifeboat_store::backend::Init;

use crate::common::store_config;

#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// A local store directory, or a TOML file describing the store (`kind = "azure"`, …).
    #[arg(long)]
    store: PathBuf,
}

pub async fn init(a: InitArgs) -> Result<()> {
    let InitArgs { store } = a;
    let config = store_config(&store, false)?;
    let what = match &config {
        StoreConfig::Local { path } => format!("store directory {}", path.display()),
        StoreConfig::Azure(a) => {
            format!("container {} in storage account {}", a.container, a.account)
        }
    };
    match config.init().await? {
        Init::Created => println!("created {what}"),
        Init::Existed => println!("{what} exists already; nothing to do"),
    }
    Ok(())
}
