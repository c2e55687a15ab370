//! The backup's uploader: sealed packs go to the repository a few at a time
//! while the copy goes on.

use crate::error::{Error, Result};
use crate::format::key::pack_key;
use crate::format::pack::SealedPack;
use crate::repository::{Created, Repository};
use tokio::sync::mpsc;

/// Uploads sealed packs, `concurrency` at a time, until the channel closes.
/// Returns the bytes uploaded.
pub async fn upload_packs(
    repo: &Repository,
    mut sealed: mpsc::Receiver<SealedPack>,
    concurrency: usize,
) -> Result<u64> {
    use futures::StreamExt;
    let stream = futures::stream::poll_fn(move |cx| sealed.poll_recv(cx));
    let mut uploads = stream
        .map(|pack| async move {
            let len = pack.data.len() as u64;
            match repo.put_new(&pack_key(&pack.id), pack.data).await? {
                Created::New => Ok(len),
                Created::AlreadyExists => Err(Error::conflict(format!(
                    "pack {} already exists in {}; refusing to overwrite it",
                    pack.id,
                    repo.url()
                ))),
            }
        })
        .buffer_unordered(concurrency.max(1));
    let mut total = 0;
    while let Some(r) = uploads.next().await {
        total += r?;
    }
    Ok(total)
}
