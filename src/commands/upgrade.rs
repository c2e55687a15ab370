//! `walvault upgrade`: after `pg_upgrade`, or a dump and restore into a new
//! cluster, binds the repository to the new cluster. The new cluster's
//! objects go in a folder of their own (docs/format.md, "Clusters"), so the
//! WAL of two clusters never mixes or collides; the old cluster's backups
//! and WAL stay listed, verifiable, restorable and subject to retention.

use crate::error::{Error, Result};
use crate::format::key::{CONFIG_KEY, Key};
use crate::pg::cluster;
use crate::repository::lock::RepoLock;
use crate::repository::{
    ClusterRecord, Created, REPOSITORY_FORMAT, RepoUrl, Repository, RepositoryConfig,
};
use bytes::Bytes;
use std::path::PathBuf;

// The doc comments are `walvault upgrade --help`.
#[derive(clap::Args)]
pub struct UpgradeOptions {
    /// The data directory of the cluster that archives into the repository
    /// from now on (the new one, after pg_upgrade or a dump and restore).
    #[arg(long, env = "PGDATA")]
    pub pgdata: PathBuf,
}

pub async fn run(url: &RepoUrl, opts: &UpgradeOptions) -> Result<()> {
    let new = cluster::identify(&opts.pgdata).map_err(Error::usage)?;
    same_owner(url)?;
    let repo = Repository::open(url, false)?;
    let root = repo.require_config().await?;
    let current = root.current_cluster();
    if current.system_identifier == new.system_identifier {
        crate::say!(
            "repository {url} already archives cluster {} (PostgreSQL {}); nothing to do",
            new.system_identifier,
            current.pg_version
        );
        return Ok(());
    }
    if root.namespace_of(&new.system_identifier).is_some() {
        return Err(Error::conflict(format!(
            "cluster {} archived into {url} before cluster {} took over; a repository \
             never goes back to a cluster it was upgraded away from: give it its own --repo",
            new.system_identifier, current.system_identifier
        )));
    }
    // Under the repository's lock: no prune or backup of the first cluster
    // runs across the change, and two upgrades cannot interleave.
    let lock = RepoLock::acquire(&repo, "upgrade").await?;
    let result = bind(&repo, url, &new).await;
    lock.release().await?;
    let (old, record) = result?;
    crate::say!(
        "repository {url} now archives cluster {} (PostgreSQL {}, {} MiB segments) in {}; \
         cluster {} (PostgreSQL {}) archives there no more, and its backups and WAL stay \
         listed, verifiable and restorable until prune lets them go",
        record.system_identifier,
        record.pg_version,
        record.wal_segment_size >> 20,
        record.namespace,
        old.system_identifier,
        old.pg_version
    );
    Ok(())
}

/// Writes the new cluster's own walvault.json in its folder, then the
/// repository's, now listing it last: the one switch every command reads.
async fn bind(
    repo: &Repository,
    url: &RepoUrl,
    new: &cluster::ClusterIdentity,
) -> Result<(RepositoryConfig, ClusterRecord)> {
    // Read again under the lock.
    let mut root = repo.require_config().await?;
    let old = root.current_cluster();
    let record = ClusterRecord {
        namespace: ClusterRecord::namespace_for(new.pg_version, &new.system_identifier),
        system_identifier: new.system_identifier.clone(),
        pg_version: new.pg_version,
        wal_segment_size: new.wal_segment_size,
        bound_at: chrono::Utc::now(),
    };
    root.format = REPOSITORY_FORMAT;
    root.upgrades.push(record.clone());
    root.validate().map_err(|e| {
        Error::usage(format!(
            "cannot bind cluster {}: {e}; nothing was changed",
            new.system_identifier
        ))
    })?;
    let folder = repo.view(Some(&record.namespace));
    let own = serde_json::to_vec_pretty(&record.own_config()).expect("config serializes");
    if folder
        .put_new(&Key::from(CONFIG_KEY), Bytes::from(own))
        .await?
        == Created::AlreadyExists
    {
        // An upgrade killed before its last step left this: the folder is
        // this cluster's only if what it says is.
        match folder.config().await? {
            Some(c) if c.system_identifier == record.system_identifier => {}
            _ => {
                return Err(Error::conflict(format!(
                    "{url} already holds {}/{CONFIG_KEY} for another cluster; nothing was changed",
                    record.namespace
                )));
            }
        }
    }
    let json = serde_json::to_vec_pretty(&root).expect("config serializes");
    repo.put_replace(&Key::from(CONFIG_KEY), Bytes::from(json))
        .await?;
    Ok((old, record))
}

/// On a filesystem, the folder upgrade creates belongs to whoever runs it,
/// and the archiver must write there from then on: the user the archiver
/// runs as (the owner of the WAL folder it made, else of walvault.json)
/// must run it, or every push after the upgrade would fail on permissions.
fn same_owner(url: &RepoUrl) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let RepoUrl::Local(dir) = url else {
        return Ok(());
    };
    let Some((owned, meta)) = [crate::format::key::WAL_DIR, CONFIG_KEY]
        .into_iter()
        .map(|name| dir.join(name))
        .find_map(|path| std::fs::metadata(&path).ok().map(|m| (path, m)))
    else {
        // Missing or unreadable: the next step says so.
        return Ok(());
    };
    let me = crate::sys::effective_uid();
    if meta.uid() == me {
        return Ok(());
    }
    let name = |uid: u32| crate::sys::user_name(uid).unwrap_or_else(|| format!("uid {uid}"));
    Err(Error::usage(format!(
        "{} belongs to {}, and walvault upgrade runs as {}: the new cluster's folder would \
         be {}'s and the archiver could not write there; run walvault upgrade as {} \
         (e.g. sudo -u {} walvault upgrade ...); nothing was changed",
        owned.display(),
        name(meta.uid()),
        name(me),
        name(me),
        name(meta.uid()),
        name(meta.uid())
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first_cluster() -> RepositoryConfig {
        RepositoryConfig {
            format: crate::repository::ONE_CLUSTER_FORMAT,
            system_identifier: "7712875144486048961".into(),
            pg_version: 15,
            wal_segment_size: 1 << 20,
            created_at: chrono::Utc::now(),
            upgrades: Vec::new(),
        }
    }

    fn new_cluster(id: &str) -> cluster::ClusterIdentity {
        cluster::ClusterIdentity {
            system_identifier: id.into(),
            pg_version: 16,
            wal_segment_size: 1 << 20,
        }
    }

    /// A repository of the first cluster whose folder for cluster 42 holds
    /// `folder_config` already.
    async fn with_folder_config(folder_config: &RepositoryConfig) -> Repository {
        let repo = Repository::in_memory();
        repo.bind_cluster(&first_cluster()).await.unwrap();
        repo.view(Some(&ClusterRecord::namespace_for(16, "42")))
            .put_new(
                &Key::from(CONFIG_KEY),
                Bytes::from(serde_json::to_vec(folder_config).unwrap()),
            )
            .await
            .unwrap();
        repo
    }

    /// An upgrade killed after writing the folder's config, before the
    /// repository's, is finished by running it again; a folder config of
    /// another cluster under that name is refused, and nothing changes.
    #[tokio::test]
    async fn an_upgrade_killed_midway_is_finished_by_running_it_again() {
        let new = new_cluster("42");
        let leftover = RepositoryConfig {
            system_identifier: "42".into(),
            pg_version: 16,
            ..first_cluster()
        };
        let repo = with_folder_config(&leftover).await;
        let (old, record) = bind(&repo, repo.url(), &new).await.unwrap();
        assert_eq!(old.system_identifier, "7712875144486048961");
        assert_eq!(record.namespace, ClusterRecord::namespace_for(16, "42"));
        let root = repo.require_config().await.unwrap();
        assert_eq!(root.format, REPOSITORY_FORMAT);
        assert_eq!(root.current_cluster().system_identifier, "42");

        // A folder that says it is another cluster's.
        let foreign = RepositoryConfig {
            system_identifier: "43".into(),
            ..leftover
        };
        let repo = with_folder_config(&foreign).await;
        let e = bind(&repo, repo.url(), &new).await.unwrap_err();
        assert_eq!(e.kind, crate::error::ErrorKind::Conflict);
        assert!(e.to_string().contains("for another cluster"), "{e}");
        let root = repo.require_config().await.unwrap();
        assert!(root.upgrades.is_empty());
    }
}
