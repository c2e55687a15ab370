//! `walvault list`: the backups, newest last.

use crate::error::Result;
use crate::human::human_bytes;
use crate::repository::catalog;
use crate::repository::{RepoUrl, Repository};

// The doc comments are `walvault list --help`.
#[derive(clap::Args)]
pub struct ListOptions {
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(url: &RepoUrl, opts: &ListOptions) -> Result<()> {
    let repo = Repository::open(url, false)?;
    let root = repo.require_config().await?;
    // Every cluster's backups (a repository holds several after an upgrade),
    // oldest cluster first.
    let clusters = repo.clusters(&root);
    let mut backups = vec![];
    for c in &clusters {
        backups.extend(catalog::load_readable(&c.repo).await?);
    }
    if opts.json {
        let rows: Vec<serde_json::Value> = backups
            .iter()
            .map(|b| {
                serde_json::json!({
                    "id": b.id,
                    "start_time": b.start_time,
                    "stop_time": b.stop_time,
                    "start_lsn": b.start_lsn,
                    "stop_lsn": b.stop_lsn,
                    "timeline": b.timeline,
                    "pg_version": b.pg_version,
                    "system_identifier": b.system_identifier,
                    "files": b.files.len(),
                    "size": b.stats.size,
                    "stored": b.stats.stored,
                })
            })
            .collect();
        crate::say!("{}", serde_json::to_string_pretty(&rows).expect("json"));
        return Ok(());
    }
    if backups.is_empty() {
        crate::say!("no backups in {url}");
        return Ok(());
    }
    crate::say!(
        "{:<16}  {:<19}  {:<19}  {:>13}  {:>13}  {:>3}  {:>10}  {:>10}",
        "id",
        "start (UTC)",
        "stop (UTC)",
        "start lsn",
        "stop lsn",
        "tli",
        "size",
        "stored"
    );
    for b in &backups {
        if clusters.len() > 1
            && let Some(c) = clusters
                .iter()
                .find(|c| c.config.system_identifier == b.system_identifier)
            && backups
                .iter()
                .find(|x| x.system_identifier == b.system_identifier)
                .is_some_and(|first| first.id == b.id)
        {
            crate::say!(
                "cluster {} (PostgreSQL {}{}):",
                c.config.system_identifier,
                c.config.pg_version,
                if c.current { ", archiving now" } else { "" }
            );
        }
        crate::say!(
            "{:<16}  {:<19}  {:<19}  {:>13}  {:>13}  {:>3}  {:>10}  {:>10}",
            b.id,
            b.start_time.format("%Y-%m-%d %H:%M:%S"),
            b.stop_time.format("%Y-%m-%d %H:%M:%S"),
            b.start_lsn.to_string(),
            b.stop_lsn.to_string(),
            b.timeline,
            human_bytes(b.stats.size),
            human_bytes(b.stats.stored)
        );
    }
    Ok(())
}
