//! Decoding an object's frames as its bytes arrive, on every core, into a
//! file: the frame cutter feeds [`super::parallel`]'s pipeline.

use super::parallel::{FRAME, ordered_parallel};
use super::{HEADER_LEN, ObjectError, ObjectHeader, Sha256Digest, read_header_within};
use std::os::unix::fs::FileExt;

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
/// them where they belong (helped by a page-cache warmer, see `warm.rs`).
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
    let pace = crate::sys::warm::WritePace::default();
    let length = header.length;
    let sha256 = std::thread::scope(|s| {
        if length >= crate::sys::warm::MIN_LEN {
            s.spawn(|| crate::sys::warm::warm_from_end(file, length, &pace));
        }
        // However decoding ends, even by a panic, the warmer stops.
        let _finish = pace.finish_on_drop();
        decode_frames(frames, workers, file, &pace)
    })?;
    header.check_sha256(sha256)?;
    Ok(header)
}

/// The frames' sha256, once each is decoded into its place in `file`.
fn decode_frames(
    frames: FrameCutter<'_>,
    workers: usize,
    file: &std::fs::File,
    pace: &crate::sys::warm::WritePace,
) -> Result<Sha256Digest, ObjectError> {
    let write = |frame: &Result<Frame, ObjectError>, bytes: &[u8]| match frame {
        Ok(frame) => pace.write(frame.content_offset, bytes, || {
            file.write_all_at(bytes, frame.content_offset)
                .map_err(|e| ObjectError::Write(e.to_string()))
        }),
        Err(e) => Err(e.clone()),
    };
    // A lone worker (a prefetch, decoding many objects at once) writes each
    // frame itself: a writer thread would only cost it a frame more memory.
    let alone = workers <= 1;
    ordered_parallel(
        frames,
        workers,
        || zstd::bulk::Decompressor::new().map_err(|e| ObjectError::Corrupt(format!("zstd: {e}"))),
        |decompressor, frame, buf| {
            let job = frame;
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
            match alone {
                true => write(job, buf),
                false => Ok(()),
            }
        },
        // One writer: ext4 serializes buffered writes to a file on its inode
        // lock, where parallel writers spun for a sixth of a fetch's CPU
        // (perf); a fetch into fresh page cache took 6% less with it.
        (!alone).then_some(
            &write
                as &(dyn Fn(&Result<Frame, ObjectError>, &[u8]) -> Result<(), ObjectError> + Sync),
        ),
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
    use crate::format::object::encode_file;
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
