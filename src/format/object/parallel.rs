//! Objects of many frames, compressed and decompressed on every core.
//!
//! Both directions run the same pipeline (encoding here, decoding in
//! `decode.rs`): workers take frames in turn, each producing one frame's
//! original bytes in a pooled buffer; the worker that finishes the frame the
//! sha256 waits for hashes it, and any later ones already done. On the way,
//! a writer thread may store them. The pool holds `workers + 2` buffers at
//! most, so memory holds a few frames, never the whole content.

use super::{HEADER_LEN, ObjectError, ObjectHeader, Sha256Digest, header_bytes};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};

/// Content is cut into independent zstd frames of this size, so the frames
/// of one segment compress on all cores at once. Measured on real WAL, 1 MiB
/// frames also compress slightly better than one 16 MiB frame: with the
/// frame's size known up front zstd picks better-fitting parameters.
pub const FRAME: usize = 1 << 20;

/// Frame buffers and compression contexts kept for the next object: the
/// push-ahead worker encodes segment after segment, and fresh ones cost page
/// faults and zeroing (an eighth of its CPU, measured with perf).
static SPARE_BUFFERS: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
static SPARE_COMPRESSORS: Mutex<Vec<(i32, zstd::bulk::Compressor<'static>)>> =
    Mutex::new(Vec::new());
const MAX_SPARE: usize = 8;

/// A compression context that goes back to the spares when dropped.
struct PooledCompressor {
    level: i32,
    inner: Option<zstd::bulk::Compressor<'static>>,
}

impl PooledCompressor {
    fn take(level: i32) -> std::io::Result<PooledCompressor> {
        let spare = {
            let mut spares = SPARE_COMPRESSORS.lock().unwrap();
            let at = spares.iter().position(|(l, _)| *l == level);
            at.map(|i| spares.swap_remove(i).1)
        };
        let inner = match spare {
            Some(c) => c,
            None => zstd::bulk::Compressor::new(level)?,
        };
        Ok(PooledCompressor {
            level,
            inner: Some(inner),
        })
    }

    fn compress(&mut self, data: &[u8]) -> std::io::Result<Vec<u8>> {
        self.inner
            .as_mut()
            .expect("present until dropped")
            .compress(data)
    }
}

impl Drop for PooledCompressor {
    fn drop(&mut self) {
        let mut spares = SPARE_COMPRESSORS.lock().unwrap();
        if spares.len() < MAX_SPARE
            && let Some(inner) = self.inner.take()
        {
            spares.push((self.level, inner));
        }
    }
}

/// A pipeline thread panicked on a frame: a bug, reported as an error rather
/// than left to hang or abort the pipeline.
pub struct WorkerPanic(String);

impl WorkerPanic {
    fn bug(what: &str) -> WorkerPanic {
        WorkerPanic(format!(
            "a worker thread failed unexpectedly ({what}); this is a bug in walvault, please report it"
        ))
    }
}

impl From<Box<dyn std::any::Any + Send>> for WorkerPanic {
    fn from(panic: Box<dyn std::any::Any + Send>) -> WorkerPanic {
        match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
            (Some(s), _) => WorkerPanic::bug(s),
            (None, Some(s)) => WorkerPanic::bug(s),
            (None, None) => WorkerPanic::bug("no message"),
        }
    }
}

impl From<WorkerPanic> for std::io::Error {
    fn from(p: WorkerPanic) -> std::io::Error {
        std::io::Error::other(p.0)
    }
}

impl From<WorkerPanic> for ObjectError {
    fn from(p: WorkerPanic) -> ObjectError {
        ObjectError::Internal(p.0)
    }
}

/// The sha256 of frames finished out of order, taken in order.
#[derive(Default)]
struct HashChain {
    sha: Sha256,
    want: usize,
    pending: BTreeMap<usize, Arc<Vec<u8>>>,
    /// A worker is hashing `want` outside the lock.
    busy: bool,
}

impl HashChain {
    /// Adds frame `i`; if no one is hashing, hashes every frame that is next
    /// in order, outside the lock, handing each to `done` afterwards.
    fn add(chain: &Mutex<HashChain>, i: usize, buf: Arc<Vec<u8>>, done: impl Fn(Arc<Vec<u8>>)) {
        let mut item = Some((i, buf));
        loop {
            let (mut sha, buf) = {
                let mut c = chain.lock().unwrap();
                if let Some((i, buf)) = item.take() {
                    c.pending.insert(i, buf);
                }
                if c.busy {
                    return;
                }
                let want = c.want;
                let Some(buf) = c.pending.remove(&want) else {
                    return;
                };
                c.busy = true;
                (std::mem::take(&mut c.sha), buf)
            };
            sha.update(&buf[..]);
            done(buf);
            let mut c = chain.lock().unwrap();
            c.sha = sha;
            c.want += 1;
            c.busy = false;
        }
    }
}

/// Stores a frame's original bytes where they belong.
type FrameWriter<'a, J, E> = dyn Fn(&J, &[u8]) -> Result<(), E> + Sync + 'a;

/// Runs `work(job, buffer)` for every job `jobs` yields, on `workers`
/// threads; `work` leaves the frame's original bytes in `buffer`, which then
/// goes to `writer(job, bytes)` on a thread of its own, if given, and to the
/// [`HashChain`]. Jobs are taken in order, one worker at a time, so `jobs` may read
/// its input as it goes. Returns the sha256 of all frames' bytes in job
/// order, or the first error. `init` makes each worker's state (a zstd
/// context).
pub(super) fn ordered_parallel<J: Send, S, E: Send + From<WorkerPanic>>(
    jobs: impl Iterator<Item = J> + Send,
    workers: usize,
    init: impl Fn() -> Result<S, E> + Sync,
    work: impl Fn(&mut S, &J, &mut Vec<u8>) -> Result<(), E> + Sync,
    writer: Option<&FrameWriter<'_, J, E>>,
) -> Result<Sha256Digest, E> {
    let most = jobs.size_hint().1.unwrap_or(usize::MAX);
    let workers = workers.clamp(1, most.max(1));
    // The next job and its place in the order, taken together.
    let next = Mutex::new((0usize, jobs));
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<E>> = Mutex::new(None);
    let (pool_tx, pool_rx) = mpsc::channel::<Vec<u8>>();
    // A frame may wait for the hash chain while every worker decodes the
    // next, and one more for the writer; a lone worker without a writer
    // finishes each frame before it takes the next, so one buffer serves it
    // (many objects decoded at once, a prefetch, each hold that little).
    let buffers = match (workers, writer) {
        (1, None) => 1,
        _ => workers + 1 + usize::from(writer.is_some()),
    };
    for _ in 0..buffers {
        let _ = pool_tx.send(SPARE_BUFFERS.lock().unwrap().pop().unwrap_or_default());
    }
    let pool_rx = Mutex::new(pool_rx);
    // The sha256 runs over frames in order, advanced by whichever worker
    // finishes the frame it waits for: no thread of its own to wake, and no
    // core idle while another thread's hashing lags behind the decoders.
    let chain = Mutex::new(HashChain::default());
    let (write_tx, write_rx) = mpsc::channel::<(J, Arc<Vec<u8>>)>();
    let give_back = |pool: &mpsc::Sender<Vec<u8>>, buf: Arc<Vec<u8>>| {
        if let Some(buf) = Arc::into_inner(buf) {
            let _ = pool.send(buf);
        }
    };
    let fail = |e: E| {
        failed.store(true, Ordering::SeqCst);
        first_error.lock().unwrap().get_or_insert(e);
    };
    std::thread::scope(|s| {
        let writer_pool = pool_tx.clone();
        if let Some(write) = writer {
            let (failed, fail) = (&failed, &fail);
            s.spawn(move || {
                // Never ends early: workers send to it until they are done.
                for (job, buf) in write_rx {
                    if !failed.load(Ordering::SeqCst) {
                        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            write(&job, &buf[..])
                        })) {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => fail(e),
                            Err(panic) => fail(E::from(WorkerPanic::from(panic))),
                        }
                    }
                    give_back(&writer_pool, buf);
                }
            });
        } else {
            drop(write_rx);
            drop(writer_pool);
        }
        for _ in 0..workers {
            let (write_tx, pool_tx) = (write_tx.clone(), pool_tx.clone());
            let (next, failed, pool_rx, init, work, fail, chain) =
                (&next, &failed, &pool_rx, &init, &work, &fail, &chain);
            s.spawn(move || {
                let mut state = match init() {
                    Ok(state) => state,
                    Err(e) => return fail(e),
                };
                loop {
                    let Ok(mut buf) = pool_rx.lock().unwrap().recv() else {
                        return;
                    };
                    if failed.load(Ordering::SeqCst) {
                        return;
                    }
                    let (i, job) = {
                        let mut next = next.lock().unwrap();
                        let Some(job) = next.1.next() else {
                            return;
                        };
                        next.0 += 1;
                        (next.0 - 1, job)
                    };
                    // A claimed frame always joins the chain, even after a
                    // failure or a panic, so the chain never waits forever
                    // (a lost frame would leave it holding every buffer).
                    let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        work(&mut state, &job, &mut buf)
                    }));
                    let panicked = done.is_err();
                    match done {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => fail(e),
                        Err(panic) => fail(E::from(WorkerPanic::from(panic))),
                    }
                    // The chain and the writer hold the only references, so
                    // one of them gives the buffer back.
                    let buf = Arc::new(buf);
                    if writer.is_some() && write_tx.send((job, buf.clone())).is_err() {
                        fail(E::from(WorkerPanic::bug("the writer thread is gone")));
                    }
                    HashChain::add(chain, i, buf, |b| give_back(&pool_tx, b));
                    // A context a panic went through is not used again, not
                    // even by the next object (a pooled one would go back).
                    if panicked {
                        std::mem::forget(state);
                        return;
                    }
                }
            });
        }
        drop(write_tx);
    });
    let sha256 = Sha256Digest(chain.into_inner().unwrap().sha.finalize().into());
    let mut spare = SPARE_BUFFERS.lock().unwrap();
    for buf in pool_rx.into_inner().unwrap().try_iter() {
        if spare.len() < MAX_SPARE {
            spare.push(buf);
        }
    }
    drop(spare);
    match first_error.into_inner().unwrap() {
        Some(e) => Err(e),
        None => Ok(sha256),
    }
}

/// An object ready to store: the header part, then one part per frame, so
/// nothing is copied into one big buffer on the way to the store.
pub struct Encoded {
    pub header: ObjectHeader,
    /// Empty when the object was written to a file as it was made.
    pub parts: Vec<bytes::Bytes>,
    pub stored_len: usize,
}

/// Compresses and checksums the first `len` bytes of `file` (a WAL segment)
/// into one object of 1 MiB frames, compressed on `workers` threads. Each
/// frame is read once. With `out`, the object is written to that file
/// instead, as it is made: frames in order as soon as each is ready, with
/// writeback started at once, the header last; memory then holds only the
/// frames not written yet.
pub fn encode_file(
    file: &std::fs::File,
    len: u64,
    level: i32,
    workers: usize,
    out: Option<&std::fs::File>,
) -> std::io::Result<Encoded> {
    let len_usize = usize::try_from(len).map_err(std::io::Error::other)?;
    let frames = len_usize.div_ceil(FRAME).max(1);
    let outputs: Mutex<Vec<bytes::Bytes>> = Mutex::new(vec![bytes::Bytes::new(); frames]);
    let (ready_tx, ready_rx) = mpsc::channel::<(usize, bytes::Bytes)>();
    let sha256 = std::thread::scope(|s| {
        let appender = out.map(|out| s.spawn(move || append_in_order(out, ready_rx)));
        let sha256 = ordered_parallel(
            0..frames,
            workers,
            || PooledCompressor::take(level),
            |compressor, &i, buf| {
                let start = i * FRAME;
                let end = (start + FRAME).min(len_usize);
                buf.resize(end - start, 0);
                file.read_exact_at(buf, start as u64)?;
                let mut frame = compressor.compress(buf)?;
                frame.shrink_to_fit();
                let frame = bytes::Bytes::from(frame);
                if out.is_some() {
                    let _ = ready_tx.send((i, frame));
                } else {
                    outputs.lock().unwrap()[i] = frame;
                }
                Ok(())
            },
            None,
        );
        drop(ready_tx);
        let appended = appender.map(|a| a.join().expect("appender does not panic"));
        let sha256 = sha256?;
        Ok::<_, std::io::Error>((sha256, appended.transpose()?))
    })?;
    let (sha256, appended) = sha256;
    let header = ObjectHeader {
        length: len,
        sha256,
    };
    let header_part = bytes::Bytes::copy_from_slice(&header_bytes(&header));
    if let (Some(out), Some(end)) = (out, appended) {
        out.write_all_at(&header_part, 0)?;
        return Ok(Encoded {
            header,
            parts: vec![],
            stored_len: end as usize,
        });
    }
    let mut parts = Vec::with_capacity(frames + 1);
    parts.push(header_part);
    parts.extend(outputs.into_inner().unwrap());
    let stored_len = parts.iter().map(|p| p.len()).sum();
    Ok(Encoded {
        header,
        parts,
        stored_len,
    })
}

/// Writes frames into `out` after the header's place, in frame order as
/// they arrive, starting writeback of each at once so that the final fsync
/// has little left to wait for.
fn append_in_order(
    out: &std::fs::File,
    ready: mpsc::Receiver<(usize, bytes::Bytes)>,
) -> std::io::Result<u64> {
    let mut pending = BTreeMap::new();
    let (mut want, mut offset) = (0usize, HEADER_LEN as u64);
    for (i, frame) in ready {
        pending.insert(i, frame);
        while let Some(frame) = pending.remove(&want) {
            out.write_all_at(&frame, offset)?;
            crate::sys::start_writeback(out, offset, frame.len() as u64);
            offset += frame.len() as u64;
            want += 1;
        }
    }
    Ok(offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_chain_hashes_in_order_whatever_order_frames_finish_in() {
        let frames: Vec<Vec<u8>> = (0..60u8).map(|i| vec![i; 1000 + usize::from(i)]).collect();
        let chain = Mutex::new(HashChain::default());
        let handed_back = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for t in 0..4 {
                let (frames, chain, handed_back) = (&frames, &chain, &handed_back);
                // Each thread finishes its share last first.
                s.spawn(move || {
                    for i in (t..frames.len()).step_by(4).rev() {
                        HashChain::add(chain, i, Arc::new(frames[i].clone()), |_| {
                            handed_back.fetch_add(1, Ordering::SeqCst);
                        });
                    }
                });
            }
        });
        let chain = chain.into_inner().unwrap();
        assert_eq!((chain.want, chain.pending.len()), (60, 0));
        assert_eq!(handed_back.into_inner(), 60);
        assert_eq!(
            Sha256Digest(chain.sha.finalize().into()),
            Sha256Digest::of(&frames.concat())
        );
    }

    #[test]
    fn a_panicking_worker_fails_the_pipeline_instead_of_hanging_it() {
        let e = pipeline_with_a_panic(|i| assert!(i != 3, "frame {i}"), |_| {});
        assert!(
            e.contains("frame 3") && e.contains("bug in walvault"),
            "{e}"
        );
    }

    #[test]
    fn a_panicking_writer_fails_the_pipeline_instead_of_hanging_it() {
        let e = pipeline_with_a_panic(|_| {}, |i| assert!(i != 5, "writing frame {i}"));
        assert!(
            e.contains("writing frame 5") && e.contains("bug in walvault"),
            "{e}"
        );
    }

    /// The error of a 64-frame pipeline whose worker or writer panics,
    /// waited for at most 30 s (it used to hang).
    fn pipeline_with_a_panic(
        work: impl Fn(usize) + Send + Sync + 'static,
        write: impl Fn(usize) + Send + Sync + 'static,
    ) -> String {
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let result = ordered_parallel(
                0..64usize,
                2,
                || Ok::<_, std::io::Error>(()),
                |_, &i, buf| {
                    work(i);
                    buf.clear();
                    buf.resize(1000, i as u8);
                    Ok(())
                },
                Some(&|&i, _| {
                    write(i);
                    Ok(())
                }),
            );
            let _ = done_tx.send(result.map_err(|e| e.to_string()));
        });
        let result = done_rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the pipeline returned");
        result.expect_err("a panic is an error")
    }
}
