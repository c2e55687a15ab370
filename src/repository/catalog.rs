//! The backups in a repository: manifests found by listing `backups/`.
//! A backup without a manifest does not exist.

use crate::error::{Error, Result};
use crate::format::key::{BACKUP_DIR, backup_id_of_key, manifest_key};
use crate::format::manifest::Manifest;
use crate::format::object;
use crate::repository::Repository;
use bytes::Bytes;

/// Which of `clusters` (a repository's, after an upgrade) holds backup
/// `id`: its index, `None` if none does. Two clusters holding one id are
/// refused rather than guessed between (`verb` names the command refusing).
pub async fn holder_of(
    clusters: &[crate::repository::Cluster],
    id: &str,
    verb: &str,
) -> Result<Option<usize>> {
    let mut holders = vec![];
    for (i, c) in clusters.iter().enumerate() {
        if ids(&c.repo).await?.iter().any(|b| b == id) {
            holders.push(i);
        }
    }
    match holders[..] {
        [] => Ok(None),
        [i] => Ok(Some(i)),
        _ => Err(Error::conflict(format!(
            "backup {id} names a backup of each of clusters {} in {}, and {verb} cannot tell \
             which one is meant: 'walvault list' shows them",
            holders
                .iter()
                .map(|&i| clusters[i].config.system_identifier.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            clusters[holders[0]].repo.url()
        ))),
    }
}

/// Every backup, oldest first.
pub async fn load_all(repo: &Repository) -> Result<Vec<Manifest>> {
    let ids = ids(repo).await?;
    let mut manifests = Vec::with_capacity(ids.len());
    for id in ids {
        manifests.push(load(repo, &id).await?);
    }
    Ok(manifests)
}

/// Every backup whose manifest reads, oldest first; a damaged manifest is
/// reported and passed over, so one bad backup does not block the others.
/// (prune uses [`load_all`]: it must not act on a partial picture.)
pub async fn load_readable(repo: &Repository) -> Result<Vec<Manifest>> {
    let mut manifests = vec![];
    for id in ids(repo).await? {
        match load(repo, &id).await {
            Ok(m) => manifests.push(m),
            Err(e) if e.kind == crate::error::ErrorKind::Corrupt => {
                tracing::warn!("skipping backup {id}: {e}; 'walvault verify' reports it");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(manifests)
}

pub async fn load(repo: &Repository, id: &str) -> Result<Manifest> {
    let key = manifest_key(id);
    let stored = repo.get(&key).await?.ok_or_else(|| {
        Error::not_found(format!(
            "backup {id} is not in {}; 'walvault list' shows the backups",
            repo.url()
        ))
    })?;
    let (_, json) = object::decode(&stored)
        .map_err(|e| Error::corrupt(format!("manifest of backup {id} ({key}) is damaged: {e}")))?;
    let manifest = Manifest::from_json(&json, &format!("backup {id}"))?;
    if manifest.id != id {
        return Err(Error::corrupt(format!(
            "manifest at {key} says it is backup {}, not {id}",
            manifest.id
        )));
    }
    Ok(manifest)
}

/// Writes a manifest, create-only: the last step of a backup.
pub async fn store(repo: &Repository, manifest: &Manifest) -> Result<()> {
    let json = serde_json::to_vec(manifest).expect("manifest serializes");
    let (_, encoded) = object::encode(&json, 3)
        .map_err(|e| Error::io(format!("cannot compress manifest: {e}")))?;
    match repo
        .put_new(&manifest_key(&manifest.id), Bytes::from(encoded))
        .await?
    {
        crate::repository::Created::New => Ok(()),
        crate::repository::Created::AlreadyExists => Err(Error::conflict(format!(
            "backup {} already exists in {}; start the backup again",
            manifest.id,
            repo.url()
        ))),
    }
}

/// Ids of every backup with a manifest, oldest first (manifests not read).
pub async fn ids(repo: &Repository) -> Result<Vec<String>> {
    let mut ids: Vec<String> = repo
        .list(BACKUP_DIR)
        .await?
        .iter()
        .filter_map(|meta| backup_id_of_key(&meta.key))
        .collect();
    ids.sort();
    Ok(ids)
}
