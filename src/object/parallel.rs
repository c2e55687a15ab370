//! Objects of many frames, compressed and decompressed on every core.
//!
//! Both directions run the same pipeline: workers take frames in turn, each
//! producing one frame's original bytes in a pooled buffer, and one more
//! thread hashes the buffers in frame order; on the way there, a writer
//! thread may store them. The pool holds `workers + 2` buffers at most, so
//! memory holds a few frames, never the whole content.

use super::{
    HEADER_LEN, ObjectError, ObjectHeader, Sha256Digest, header_bytes, read_header_within,
};
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

/// Stores a frame's original bytes where they belong.
type FrameWriter<'a, J, E> = dyn Fn(&J, &[u8]) -> Result<(), E> + Sync + 'a;

/// Runs `work(job, buffer)` for every job `jobs` yields, on `workers`
/// threads; `work` leaves the frame's original bytes in `buffer`, which then
/// goes to `writer(job, bytes)` on a thread of its own, if given, and to the
/// hasher. Jobs are taken in order, one worker at a time, so `jobs` may read
/// its input as it goes. Returns the sha256 of all frames' bytes in job
/// order, or the first error. `init` makes each worker's state (a zstd
/// context).
fn ordered_parallel<J: Send, S, E: Send>(
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
    for _ in 0..workers + 1 + usize::from(writer.is_some()) {
        let _ = pool_tx.send(SPARE_BUFFERS.lock().unwrap().pop().unwrap_or_default());
    }
    let pool_rx = Mutex::new(pool_rx);
    // A decoded frame goes to the hasher and, at the same time, to the
    // writer; whichever finishes with it last returns it to the pool.
    let (hash_tx, hash_rx) = mpsc::channel::<(usize, Arc<Vec<u8>>)>();
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
    let sha256 = std::thread::scope(|s| {
        // A frame finished early waits in `pending`, holding one of the
        // pool's buffers; the frame the hasher waits for always has a worker,
        // since frames are claimed in order by workers that hold a buffer.
        let writer_pool = pool_tx.clone();
        let hasher = s.spawn(move || {
            let mut h = Sha256::new();
            let mut pending = BTreeMap::new();
            let mut want = 0usize;
            for (i, buf) in hash_rx {
                pending.insert(i, buf);
                while let Some(buf) = pending.remove(&want) {
                    h.update(&buf[..]);
                    want += 1;
                    give_back(&pool_tx, buf);
                }
            }
            Sha256Digest(h.finalize().into())
        });
        if let Some(write) = writer {
            let (failed, fail) = (&failed, &fail);
            s.spawn(move || {
                for (job, buf) in write_rx {
                    if !failed.load(Ordering::SeqCst)
                        && let Err(e) = write(&job, &buf[..])
                    {
                        fail(e);
                    }
                    give_back(&writer_pool, buf);
                }
            });
        } else {
            drop(write_rx);
            drop(writer_pool);
        }
        for _ in 0..workers {
            let (hash_tx, write_tx) = (hash_tx.clone(), write_tx.clone());
            let (next, failed, pool_rx, init, work, fail) =
                (&next, &failed, &pool_rx, &init, &work, &fail);
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
                    // A claimed frame always reaches the hasher, even after a
                    // failure, so the hasher never waits forever.
                    if let Err(e) = work(&mut state, &job, &mut buf) {
                        fail(e);
                    }
                    // The hasher and the writer hold the only references,
                    // so one of them gives the buffer back.
                    let buf = Arc::new(buf);
                    let sent = match writer {
                        Some(_) => {
                            hash_tx.send((i, buf.clone())).is_ok()
                                && write_tx.send((job, buf)).is_ok()
                        }
                        None => hash_tx.send((i, buf)).is_ok(),
                    };
                    if !sent {
                        return;
                    }
                }
            });
        }
        drop(hash_tx);
        drop(write_tx);
        hasher.join().expect("sha256 thread does not panic")
    });
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
    use std::os::fd::AsRawFd;
    let mut pending = BTreeMap::new();
    let (mut want, mut offset) = (0usize, HEADER_LEN as u64);
    for (i, frame) in ready {
        pending.insert(i, frame);
        while let Some(frame) = pending.remove(&want) {
            out.write_all_at(&frame, offset)?;
            // SAFETY: only asks the kernel to start writing back a range of
            // a file we hold open; no memory is passed.
            unsafe {
                libc::sync_file_range(
                    out.as_raw_fd(),
                    offset as i64,
                    frame.len() as i64,
                    libc::SYNC_FILE_RANGE_WRITE,
                )
            };
            offset += frame.len() as u64;
            want += 1;
        }
    }
    Ok(offset)
}

/// The most content one frame may claim: a frame's buffer is sized by it.
const MAX_FRAME_CONTENT: u64 = FRAME as u64 * 64;

/// A content frame cut from an object, and where its content goes.
struct Frame {
    compressed: bytes::Bytes,
    content_offset: u64,
    content_len: usize,
}

/// Appends more of an object to the buffer; 0 at its end.
pub type Fill<'a> = dyn FnMut(&mut bytes::BytesMut) -> Result<usize, ObjectError> + Send + 'a;

/// Cuts an object into its content frames as its bytes arrive, so the
/// first frames decompress while the rest is still being read. Each frame
/// must state its content size (walvault writes them so), and the sizes
/// must add up to the header's length.
struct FrameCutter<'a> {
    buf: bytes::BytesMut,
    fill: &'a mut Fill<'a>,
    at_end: bool,
    done: bool,
    offset: u64,
    length: u64,
}

impl FrameCutter<'_> {
    fn cut(&mut self) -> Result<Option<Frame>, ObjectError> {
        loop {
            if !self.buf.is_empty() {
                if let Ok(size) = zstd::zstd_safe::find_frame_compressed_size(&self.buf)
                    && size > 0
                    && size <= self.buf.len()
                {
                    let content = match zstd::zstd_safe::get_frame_content_size(&self.buf) {
                        Ok(Some(c)) if c <= MAX_FRAME_CONTENT => c,
                        _ => {
                            return Err(ObjectError::Corrupt(
                                "a frame does not state a sensible content size".into(),
                            ));
                        }
                    };
                    if self.offset + content > self.length {
                        return Err(ObjectError::Corrupt(format!(
                            "frames hold more than the {} bytes the header says",
                            self.length
                        )));
                    }
                    let frame = Frame {
                        compressed: self.buf.split_to(size).freeze(),
                        content_offset: self.offset,
                        content_len: content as usize,
                    };
                    self.offset += content;
                    return Ok(Some(frame));
                }
                if self.at_end {
                    return Err(ObjectError::Corrupt(
                        "the object ends inside a frame, or holds bytes that are no frame".into(),
                    ));
                }
            } else if self.at_end {
                if self.offset != self.length {
                    return Err(ObjectError::Corrupt(format!(
                        "content is {} bytes, header says {}",
                        self.offset, self.length
                    )));
                }
                return Ok(None);
            }
            if (self.fill)(&mut self.buf)? == 0 {
                self.at_end = true;
            }
        }
    }
}

impl Iterator for FrameCutter<'_> {
    type Item = Result<Frame, ObjectError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let cut = self.cut().transpose();
        self.done = !matches!(cut, Some(Ok(_)));
        cut
    }
}

/// Decompresses an object into `file` (from offset 0) and proves it is the
/// original: same length, same sha256. Frames are decompressed on `workers`
/// threads as soon as `fill` has delivered them, and one more thread writes
/// them where they belong. `size_hint` is the object's size, if known.
/// `file` holds unproven bytes until this returns `Ok`; the caller must not
/// let anyone use them before.
pub fn decode_to_file_from(
    mut buf: bytes::BytesMut,
    fill: &mut Fill<'_>,
    file: &std::fs::File,
    max: u64,
    workers: usize,
) -> Result<ObjectHeader, ObjectError> {
    // A store may send more than any object of `max` bytes could be.
    let cap = super::max_stored_len(max);
    let mut more = |buf: &mut bytes::BytesMut| -> Result<usize, ObjectError> {
        let n = fill(buf)?;
        if buf.len() as u64 > cap {
            return Err(ObjectError::Corrupt(format!(
                "the object holds more than the {cap} bytes any object of {max} bytes can"
            )));
        }
        Ok(n)
    };
    // Enough for the header and the first frame's header.
    while buf.len() < HEADER_LEN + 18 && more(&mut buf)? > 0 {}
    let header = read_header_within(&buf, max)?;
    let sized = matches!(
        zstd::zstd_safe::get_frame_content_size(&buf[HEADER_LEN..]),
        Ok(Some(size)) if size <= MAX_FRAME_CONTENT
    );
    if !sized {
        // One frame of unstated or outsized size (objects of walvault before
        // format 2): decode it in one pass, streaming, once it is all here.
        while more(&mut buf)? > 0 {}
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        let header = super::decode_into(&buf, &mut out, max)?;
        std::io::Write::flush(&mut out).map_err(|e| ObjectError::Write(e.to_string()))?;
        return Ok(header);
    }
    let _ = buf.split_to(HEADER_LEN);
    let mut cutter_fill: &mut Fill<'_> = &mut more;
    // As many workers as there are frames to keep busy, for small files.
    let workers = workers.min(header.length.div_ceil(FRAME as u64).max(1) as usize);
    let frames = FrameCutter {
        buf,
        fill: &mut cutter_fill,
        at_end: false,
        done: false,
        offset: 0,
        length: header.length,
    };
    let pace = super::warm::WritePace::default();
    let length = header.length;
    let sha256 = std::thread::scope(|s| {
        if length >= super::warm::MIN_LEN {
            s.spawn(|| super::warm::warm_from_end(file, length, &pace));
        }
        let sha256 = decode_frames(frames, workers, file, &pace);
        pace.finish();
        sha256
    })?;
    header.check_sha256(sha256)?;
    Ok(header)
}

/// The frames' sha256, once each is decoded into its place in `file`.
fn decode_frames(
    frames: FrameCutter<'_>,
    workers: usize,
    file: &std::fs::File,
    pace: &super::warm::WritePace,
) -> Result<Sha256Digest, ObjectError> {
    ordered_parallel(
        frames,
        workers,
        || zstd::bulk::Decompressor::new().map_err(|e| ObjectError::Corrupt(format!("zstd: {e}"))),
        |decompressor, frame, buf| {
            let frame = frame.as_ref().map_err(Clone::clone)?;
            buf.clear();
            buf.reserve(frame.content_len);
            let n = decompressor
                .decompress_to_buffer(&frame.compressed[..], buf)
                .map_err(|e| ObjectError::Corrupt(format!("zstd: {e}")))?;
            if n != frame.content_len {
                return Err(ObjectError::Corrupt(format!(
                    "a frame holds {n} bytes where its header says {}",
                    frame.content_len
                )));
            }
            Ok(())
        },
        // One writer: ext4 serializes buffered writes to a file on its inode
        // lock, where parallel writers spun for a sixth of a fetch's CPU
        // (perf); a fetch into fresh page cache took 6% less with it.
        Some(&|frame, bytes| match frame {
            Ok(frame) => pace.write(frame.content_offset, bytes, || {
                file.write_all_at(bytes, frame.content_offset)
                    .map_err(|e| ObjectError::Write(e.to_string()))
            }),
            Err(e) => Err(e.clone()),
        }),
    )
}

/// [`decode_to_file_from`] for an object already in memory (taken over
/// without a copy when nothing else holds it).
pub fn decode_to_file(
    object: bytes::Bytes,
    file: &std::fs::File,
    max: u64,
    workers: usize,
) -> Result<ObjectHeader, ObjectError> {
    decode_to_file_from(object.into(), &mut |_| Ok(0), file, max, workers)
}
#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    fn encoded(data: &[u8]) -> Vec<u8> {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(data).unwrap();
        encode_file(&file, data.len() as u64, 3, 2, None)
            .unwrap()
            .parts
            .concat()
    }

    /// What `decode` leaves in a new file, read back.
    fn decoded_by(
        decode: impl FnOnce(&std::fs::File) -> Result<ObjectHeader, ObjectError>,
    ) -> Result<Vec<u8>, ObjectError> {
        let mut file = tempfile::tempfile().unwrap();
        decode(&file)?;
        let mut back = vec![];
        file.rewind().unwrap();
        file.read_to_end(&mut back).unwrap();
        Ok(back)
    }

    fn decoded(object: &[u8], workers: usize) -> Result<Vec<u8>, ObjectError> {
        let object = bytes::Bytes::copy_from_slice(object);
        decoded_by(|file| decode_to_file(object, file, u64::MAX, workers))
    }

    #[test]
    fn frames_decode_in_parallel_to_the_original() {
        for len in [0usize, 5, FRAME, 3 * FRAME + 17] {
            let data: Vec<u8> = (0..len)
                .map(|i| (i % 251) as u8 ^ (i >> 13) as u8)
                .collect();
            let object = encoded(&data);
            for workers in [1, 2, 4] {
                assert_eq!(decoded(&object, workers).unwrap(), data);
            }
        }
    }

    /// Decodes `object` delivered `piece` bytes at a time, as a slow store would.
    fn decoded_in_pieces(object: &[u8], piece: usize) -> Result<Vec<u8>, ObjectError> {
        let mut rest = object;
        let mut fill = |buf: &mut bytes::BytesMut| {
            let n = rest.len().min(piece);
            buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            Ok(n)
        };
        decoded_by(|file| decode_to_file_from(bytes::BytesMut::new(), &mut fill, file, u64::MAX, 2))
    }

    #[test]
    fn frames_are_cut_from_pieces_of_any_size() {
        let data: Vec<u8> = (0..3 * FRAME + 17)
            .map(|i| (i % 251) as u8 ^ (i >> 13) as u8)
            .collect();
        let object = encoded(&data);
        for piece in [1, 7, 4096, FRAME + 3, object.len()] {
            assert_eq!(decoded_in_pieces(&object, piece).unwrap(), data, "{piece}");
        }
        let (_, single) = super::super::encode(&data[..1000], 3).unwrap();
        assert_eq!(decoded_in_pieces(&single, 5).unwrap(), &data[..1000]);
        let mut extended = object.clone();
        extended.extend_from_slice(&object[object.len() - 50..]);
        for bad in [
            &object[..object.len() - 1],
            &object[..HEADER_LEN + 3],
            &extended[..],
        ] {
            assert!(matches!(
                decoded_in_pieces(bad, 999),
                Err(ObjectError::Corrupt(_))
            ));
        }
        let failing = {
            let file = tempfile::tempfile().unwrap();
            let mut fill = |_: &mut bytes::BytesMut| Err(ObjectError::Read("gone".into()));
            decode_to_file_from(bytes::BytesMut::new(), &mut fill, &file, u64::MAX, 2)
        };
        assert!(matches!(failing, Err(ObjectError::Read(_))));
    }

    #[test]
    fn one_frame_objects_and_tampering_are_handled() {
        let data: Vec<u8> = (0..2 * FRAME + 3).map(|i| (i % 13) as u8).collect();
        // One frame (backup chunks, version 1 objects): decoded in one pass.
        let (_, single) = super::super::encode(&data, 3).unwrap();
        assert_eq!(decoded(&single, 2).unwrap(), data);
        let object = encoded(&data);
        let mut flipped = object.clone();
        let at = object.len() - 100;
        flipped[at] ^= 1;
        assert!(matches!(decoded(&flipped, 2), Err(ObjectError::Corrupt(_))));
        assert!(matches!(
            decoded(&object[..object.len() - 1], 2),
            Err(ObjectError::Corrupt(_))
        ));
        let mut lying = object.clone();
        lying[24] ^= 1; // the header's sha256
        assert!(matches!(decoded(&lying, 2), Err(ObjectError::Corrupt(_))));
        let capped = {
            let file = tempfile::tempfile().unwrap();
            decode_to_file(object.clone().into(), &file, 100, 2)
        };
        assert!(matches!(capped, Err(ObjectError::Corrupt(_))));
    }
}
