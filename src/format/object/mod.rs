//! The stored object format (docs/format.md, "Objects").
//!
//! An object is a valid zstd stream: a skippable frame carrying walvault's
//! header, then ordinary zstd frames with the content. `zstd -d` therefore
//! restores any object without walvault, and walvault itself checks the
//! original length and sha256 on every read.

mod decode;
mod parallel;

pub use decode::{Fill, decode_to_file, decode_to_file_from};
pub use parallel::{Encoded, FRAME, encode_file};
use sha2::{Digest, Sha256};
use std::fmt;
use std::io::Read;

/// Skippable-frame magic (0x184D2A50..=0x184D2A5F are reserved for this use).
const SKIPPABLE_MAGIC: u32 = 0x184D_2A5E;
const HEADER_MAGIC: &[u8; 4] = b"WVLT";
/// Version 2 allows the content to span several frames (version 1 objects
/// hold exactly one, and remain readable). An older walvault meeting a
/// version 2 object says "upgrade" instead of calling it corrupt.
pub const FORMAT_VERSION: u16 = 2;
const COMPRESSION_ZSTD: u8 = 1;
/// Length of the skippable frame's payload.
const PAYLOAD_LEN: usize = 48;
/// Everything before the zstd content frame.
pub const HEADER_LEN: usize = 8 + PAYLOAD_LEN;

/// The sha256 of an object's original bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256Digest(pub [u8; 32]);

impl Sha256Digest {
    pub fn of(data: &[u8]) -> Sha256Digest {
        Sha256Digest(Sha256::digest(data).into())
    }

    /// The sha256 of a file, read in pieces.
    pub fn of_file(path: &std::path::Path) -> std::io::Result<Sha256Digest> {
        let mut file = std::fs::File::open(path)?;
        let mut hasher = Sha256::new();
        std::io::copy(&mut file, &mut hasher)?;
        Ok(Sha256Digest(hasher.finalize().into()))
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(s: &str) -> Option<Sha256Digest> {
        if s.len() != 64 || !s.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
            out[i] = u8::from_str_radix(std::str::from_utf8(chunk).ok()?, 16).ok()?;
        }
        Some(Sha256Digest(out))
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}

/// What an object's header says about its original content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectHeader {
    pub length: u64,
    pub sha256: Sha256Digest,
}

impl ObjectHeader {
    /// Whether `actual`, the sha256 of the decoded content, is the header's.
    pub fn check_sha256(&self, actual: Sha256Digest) -> Result<(), ObjectError> {
        if actual == self.sha256 {
            return Ok(());
        }
        Err(ObjectError::Corrupt(format!(
            "sha256 of content is {actual}, header says {}",
            self.sha256
        )))
    }
}

/// Why an object could not be read back as its original bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectError {
    NotAnObject(String),
    UnsupportedVersion(u16),
    /// A compression this walvault does not know: written by a newer one,
    /// not damage.
    UnsupportedCompression(u8),
    Corrupt(String),
    /// Writing the decoded content failed (not the object's fault).
    Write(String),
    /// Reading the object failed (not its fault either).
    Read(String),
    /// walvault itself failed (a bug), not the object nor the disk.
    Internal(String),
}

impl fmt::Display for ObjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObjectError::NotAnObject(why) => write!(f, "not a walvault object ({why})"),
            ObjectError::UnsupportedVersion(v) => write!(
                f,
                "object format version {v} is newer than this walvault understands \
                 (version {FORMAT_VERSION}); upgrade walvault"
            ),
            ObjectError::UnsupportedCompression(c) => write!(
                f,
                "compression {c} is newer than this walvault understands \
                 (it knows {COMPRESSION_ZSTD}, zstd); upgrade walvault"
            ),
            ObjectError::Corrupt(why) => write!(f, "corrupt object: {why}"),
            ObjectError::Write(why) => write!(f, "cannot write the content: {why}"),
            ObjectError::Read(why) => write!(f, "cannot read the object: {why}"),
            ObjectError::Internal(why) => write!(f, "{why}"),
        }
    }
}

pub(crate) fn header_bytes(header: &ObjectHeader) -> [u8; HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN];
    out[0..4].copy_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
    out[4..8].copy_from_slice(&(PAYLOAD_LEN as u32).to_le_bytes());
    out[8..12].copy_from_slice(HEADER_MAGIC);
    out[12..14].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    out[14] = COMPRESSION_ZSTD;
    out[15] = 0;
    out[16..24].copy_from_slice(&header.length.to_le_bytes());
    out[24..56].copy_from_slice(&header.sha256.0);
    out
}

/// Compresses and checksums `data` into one object. Hashing runs on its own
/// thread beside compression: the two are the whole cost of a push, and on
/// two cores overlapping them nearly halves it.
pub fn encode(data: &[u8], level: i32) -> std::io::Result<(ObjectHeader, Vec<u8>)> {
    let (sha256, compressed) = std::thread::scope(|s| {
        let hasher = s.spawn(|| Sha256Digest::of(data));
        let compressed = zstd::bulk::compress(data, level);
        (
            hasher.join().expect("sha256 thread does not panic"),
            compressed,
        )
    });
    let header = ObjectHeader {
        length: data.len() as u64,
        sha256,
    };
    Ok((header, assemble(&header, &compressed?)))
}

/// Like [`decode_limited`], writing the content to `out` as it is
/// decompressed instead of holding it: the sha256 runs on its own thread
/// beside decompression and writing. `out` holds unproven bytes until this
/// returns `Ok`; the caller must not let anyone use them before.
pub fn decode_into(
    object: &[u8],
    out: &mut dyn std::io::Write,
    max: u64,
) -> Result<ObjectHeader, ObjectError> {
    use std::sync::Arc;
    let (header, mut decoder) = open_content(object, max)?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Arc<Vec<u8>>>(2);
    let (written, sha256) = std::thread::scope(|s| {
        let hasher = s.spawn(move || {
            let mut h = Sha256::new();
            for piece in rx {
                h.update(&piece[..]);
            }
            Sha256Digest(h.finalize().into())
        });
        let written = (|| {
            let mut total = 0u64;
            loop {
                let mut piece = vec![0u8; 1 << 20];
                let n = (&mut decoder)
                    .take(
                        header
                            .length
                            .saturating_add(1)
                            .saturating_sub(total)
                            .min(1 << 20),
                    )
                    .read(&mut piece)
                    .map_err(|e| ObjectError::Corrupt(format!("zstd: {e}")))?;
                if n == 0 {
                    return Ok(total);
                }
                total += n as u64;
                if total > header.length {
                    return Err(ObjectError::Corrupt(format!(
                        "content is longer than the {} bytes its header says",
                        header.length
                    )));
                }
                piece.truncate(n);
                out.write_all(&piece)
                    .map_err(|e| ObjectError::Write(e.to_string()))?;
                if tx.send(Arc::new(piece)).is_err() {
                    return Err(ObjectError::Write("sha256 thread stopped".into()));
                }
            }
        })();
        drop(tx);
        (
            written,
            hasher.join().expect("sha256 thread does not panic"),
        )
    });
    let written = written?;
    if written != header.length {
        return Err(ObjectError::Corrupt(format!(
            "content is {written} bytes, header says {}",
            header.length
        )));
    }
    header.check_sha256(sha256)?;
    Ok(header)
}

fn assemble(header: &ObjectHeader, compressed: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + compressed.len());
    out.extend_from_slice(&header_bytes(header));
    out.extend_from_slice(compressed);
    out
}

/// Like [`encode`] when the sha256 is already known (backup hashes each
/// chunk first to look it up, and compresses only what is new).
pub fn encode_with_digest(
    data: &[u8],
    sha256: Sha256Digest,
    level: i32,
) -> std::io::Result<Vec<u8>> {
    let compressed = zstd::bulk::compress(data, level)?;
    let header = ObjectHeader {
        length: data.len() as u64,
        sha256,
    };
    Ok(assemble(&header, &compressed))
}

/// Reads the header without touching the content.
pub fn read_header(object: &[u8]) -> Result<ObjectHeader, ObjectError> {
    if object.len() < HEADER_LEN {
        return Err(ObjectError::NotAnObject(format!(
            "{} bytes, shorter than the {HEADER_LEN}-byte header",
            object.len()
        )));
    }
    let u32_at = |o: usize| u32::from_le_bytes(object[o..o + 4].try_into().unwrap());
    if u32_at(0) != SKIPPABLE_MAGIC || &object[8..12] != HEADER_MAGIC {
        return Err(ObjectError::NotAnObject("bad magic".into()));
    }
    if u32_at(4) as usize != PAYLOAD_LEN {
        return Err(ObjectError::Corrupt(
            "header frame has the wrong size".into(),
        ));
    }
    let version = u16::from_le_bytes([object[12], object[13]]);
    if version == 0 || version > FORMAT_VERSION {
        return Err(ObjectError::UnsupportedVersion(version));
    }
    if object[15] != 0 {
        return Err(ObjectError::Corrupt(
            "reserved header byte is not zero".into(),
        ));
    }
    if object[14] != COMPRESSION_ZSTD {
        return Err(ObjectError::UnsupportedCompression(object[14]));
    }
    Ok(ObjectHeader {
        length: u64::from_le_bytes(object[16..24].try_into().unwrap()),
        sha256: Sha256Digest(object[24..56].try_into().unwrap()),
    })
}

/// Decompresses an object and proves it is the original: same length, same
/// sha256. Memory grows with the real content, never with what a (possibly
/// tampered) header claims.
pub fn decode(object: &[u8]) -> Result<(ObjectHeader, Vec<u8>), ObjectError> {
    decode_limited(object, MAX_CONTENT)
}

/// The header, once its claimed length is known to be within `max`: a
/// tampered header must not size any buffer or work.
pub fn read_header_within(object: &[u8], max: u64) -> Result<ObjectHeader, ObjectError> {
    let header = read_header(object)?;
    if header.length > max {
        return Err(ObjectError::Corrupt(format!(
            "header claims {} bytes of content, more than the {max} this object may hold",
            header.length
        )));
    }
    Ok(header)
}

type ContentDecoder<'a> = zstd::stream::read::Decoder<'a, &'a [u8]>;

/// The header, and a decoder for the content once the header's claimed
/// length is known to be within `max`.
fn open_content(
    object: &[u8],
    max: u64,
) -> Result<(ObjectHeader, ContentDecoder<'_>), ObjectError> {
    let header = read_header_within(object, max)?;
    let decoder = zstd::stream::read::Decoder::with_buffer(&object[HEADER_LEN..])
        .map_err(|e| ObjectError::Corrupt(e.to_string()))?;
    Ok((header, decoder))
}

/// The most bytes an object of `max_content` bytes of content can take in
/// the store: zstd's worst case (incompressible data in 1 MiB frames), the
/// header, and room to spare. Anything longer is not such an object.
pub fn max_stored_len(max_content: u64) -> u64 {
    max_content
        .saturating_add(max_content / 64)
        .saturating_add(HEADER_LEN as u64 + (64 << 10))
}

/// The most any object holds: a 1 GiB WAL segment (the largest PostgreSQL
/// allows), or a manifest.
pub const MAX_CONTENT: u64 = 1 << 30;

/// Like [`decode`], refusing before any work an object whose header claims
/// more than `max` bytes: a tampered header must not cost gigabytes.
pub fn decode_limited(object: &[u8], max: u64) -> Result<(ObjectHeader, Vec<u8>), ObjectError> {
    let (header, mut decoder) = open_content(object, max)?;
    let mut data = Vec::with_capacity(header.length.min(64 << 20) as usize);
    (&mut decoder)
        .take(header.length.saturating_add(1))
        .read_to_end(&mut data)
        .map_err(|e| ObjectError::Corrupt(format!("zstd: {e}")))?;
    if data.len() as u64 != header.length {
        return Err(ObjectError::Corrupt(format!(
            "content is {} bytes, header says {}",
            data.len(),
            header.length
        )));
    }
    let actual = Sha256Digest::of(&data);
    header.check_sha256(actual)?;
    Ok((header, data))
}

/// Like [`decode_limited`], into the start of `out` instead of a new
/// buffer (restore writes chunks from an aligned one). An object claiming
/// more than `max` bytes, or more than `out` holds, is refused unread.
pub fn decode_to_slice(
    object: &[u8],
    out: &mut [u8],
    max: u64,
) -> Result<ObjectHeader, ObjectError> {
    let (header, mut decoder) = open_content(object, max.min(out.len() as u64))?;
    let out = &mut out[..header.length as usize];
    decoder.read_exact(out).map_err(|e| {
        ObjectError::Corrupt(format!(
            "content is shorter than the {} bytes the header says ({e})",
            header.length
        ))
    })?;
    let mut more = [0u8; 1];
    match decoder.read(&mut more) {
        Ok(0) => {}
        Ok(_) => {
            return Err(ObjectError::Corrupt(format!(
                "content is longer than the {} bytes the header says",
                header.length
            )));
        }
        Err(e) => return Err(ObjectError::Corrupt(format!("zstd: {e}"))),
    }
    let actual = Sha256Digest::of(out);
    header.check_sha256(actual)?;
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Vec<u8> {
        (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect()
    }

    #[test]
    fn round_trip() {
        let data = sample();
        let (h, obj) = encode(&data, 3).unwrap();
        assert!(obj.len() < data.len() / 4);
        let (h2, back) = decode(&obj).unwrap();
        assert_eq!(h, h2);
        assert_eq!(back, data);
    }

    fn encode_bytes(data: &[u8], workers: usize) -> (ObjectHeader, Vec<u8>) {
        use std::io::Write;
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(data).unwrap();
        let encoded = encode_file(&file, data.len() as u64, 3, workers, None).unwrap();
        let object: Vec<u8> = encoded.parts.concat();
        assert_eq!(object.len(), encoded.stored_len);
        (encoded.header, object)
    }

    #[test]
    fn an_object_written_as_it_is_made_is_the_object() {
        use std::io::{Read, Write};
        let data: Vec<u8> = (0..3 * FRAME + 17).map(|i| (i % 13) as u8).collect();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&data).unwrap();
        let mut out = tempfile::tempfile().unwrap();
        let encoded = encode_file(&file, data.len() as u64, 3, 2, Some(&out)).unwrap();
        let mut written = vec![];
        out.read_to_end(&mut written).unwrap();
        assert!(encoded.parts.is_empty(), "memory keeps no copy");
        assert_eq!(written.len(), encoded.stored_len);
        let (header, back) = decode(&written).unwrap();
        assert_eq!((header, back), (encoded.header, data.clone()));
        let (_, in_memory) = encode_bytes(&data, 2);
        assert_eq!(written, in_memory);
    }

    #[test]
    fn file_encoding_round_trips() {
        for len in [0usize, 1, FRAME - 1, FRAME, FRAME + 1, 3 * FRAME + 17] {
            let data: Vec<u8> = (0..len)
                .map(|i| (i % 251) as u8 ^ (i >> 12) as u8)
                .collect();
            for workers in [1, 2, 5] {
                let (h, obj) = encode_bytes(&data, workers);
                assert_eq!(h.length, len as u64);
                assert_eq!(h.sha256, Sha256Digest::of(&data));
                assert_eq!(decode(&obj).unwrap().1, data);
                assert_eq!(zstd::stream::decode_all(&obj[..]).unwrap(), data);
                let mut out = vec![];
                decode_into(&obj, &mut out, u64::MAX).unwrap();
                assert_eq!(out, data);
            }
        }
    }

    #[test]
    fn a_short_file_is_an_error_not_a_short_object() {
        use std::io::Write;
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[7u8; 3 * FRAME]).unwrap();
        assert!(encode_file(&file, 4 * FRAME as u64, 3, 2, None).is_err());
    }

    #[test]
    fn frames_out_of_order_or_missing_are_caught() {
        let data: Vec<u8> = (0..3 * FRAME)
            .map(|i| (i / FRAME) as u8 ^ (i % 7) as u8)
            .collect();
        use std::io::Write;
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&data).unwrap();
        let encoded = encode_file(&file, data.len() as u64, 3, 2, None).unwrap();
        let p = &encoded.parts;
        let swapped = [&p[0][..], &p[2][..], &p[1][..], &p[3][..]].concat();
        assert!(matches!(decode(&swapped), Err(ObjectError::Corrupt(_))));
        let missing = [&p[0][..], &p[1][..], &p[2][..]].concat();
        assert!(matches!(decode(&missing), Err(ObjectError::Corrupt(_))));
        let extra = [&p[..], &p[3..]].concat().concat();
        assert!(matches!(decode(&extra), Err(ObjectError::Corrupt(_))));
    }

    #[test]
    fn version_1_objects_stay_readable() {
        let data = sample();
        let (_, mut obj) = encode(&data, 3).unwrap();
        obj[12..14].copy_from_slice(&1u16.to_le_bytes());
        assert_eq!(decode(&obj).unwrap().1, data);
    }

    #[test]
    fn streamed_decoding_checks_like_decode() {
        let data: Vec<u8> = (0..(3 << 20) + 5).map(|i| (i % 251) as u8).collect();
        let (h, obj) = encode(&data, 3).unwrap();
        let mut out = vec![];
        assert_eq!(decode_into(&obj, &mut out, u64::MAX).unwrap(), h);
        assert_eq!(out, data);
        let mut bad = obj.clone();
        let at = bad.len() / 2;
        bad[at] ^= 1;
        assert!(decode_into(&bad, &mut vec![], u64::MAX).is_err());
        assert!(decode_into(&obj[..obj.len() - 3], &mut vec![], u64::MAX).is_err());
        assert!(decode_into(&obj, &mut vec![], 100).is_err());
    }

    #[test]
    fn plain_zstd_reads_it() {
        let data = sample();
        let (_, obj) = encode(&data, 3).unwrap();
        assert_eq!(zstd::stream::decode_all(&obj[..]).unwrap(), data);
    }

    #[test]
    fn empty_content() {
        let (_, obj) = encode(b"", 3).unwrap();
        assert_eq!(decode(&obj).unwrap().1, b"");
    }

    #[test]
    fn lying_length_is_caught_without_allocating_it() {
        let (_, mut obj) = encode(b"hello", 3).unwrap();
        obj[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(decode(&obj), Err(ObjectError::Corrupt(_))));
    }

    #[test]
    fn claimed_length_is_capped_before_decompressing() {
        let (_, obj) = encode(&[0u8; 4096], 3).unwrap();
        assert!(matches!(
            decode_limited(&obj, 4095),
            Err(ObjectError::Corrupt(_))
        ));
        assert_eq!(decode_limited(&obj, 4096).unwrap().1.len(), 4096);
    }

    #[test]
    fn newer_version_is_named() {
        let (_, mut obj) = encode(b"hello", 3).unwrap();
        obj[12] = 9;
        assert_eq!(decode(&obj), Err(ObjectError::UnsupportedVersion(9)));
    }

    #[test]
    fn newer_compression_is_named() {
        let (_, mut obj) = encode(b"hello", 3).unwrap();
        obj[14] = 2;
        assert_eq!(decode(&obj), Err(ObjectError::UnsupportedCompression(2)));
        assert!(decode(&obj).unwrap_err().to_string().contains("upgrade"));
    }

    #[test]
    fn hex_round_trip() {
        let d = Sha256Digest::of(b"x");
        assert_eq!(Sha256Digest::from_hex(&d.to_hex()), Some(d));
        assert_eq!(Sha256Digest::from_hex("zz"), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn any_content_round_trips(data in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let (_, obj) = encode(&data, 1).unwrap();
            prop_assert_eq!(decode(&obj).unwrap().1, data);
        }

        #[test]
        fn a_flipped_byte_is_detected(data in proptest::collection::vec(any::<u8>(), 1..5000),
                                      pos: prop::sample::Index, bit in 0u8..8) {
            let (_, mut obj) = encode(&data, 1).unwrap();
            let i = pos.index(obj.len());
            obj[i] ^= 1 << bit;
            prop_assert!(decode(&obj).is_err());
        }

        #[test]
        fn truncation_is_detected(data in proptest::collection::vec(any::<u8>(), 1..5000),
                                  cut: prop::sample::Index) {
            let (_, obj) = encode(&data, 1).unwrap();
            let keep = cut.index(obj.len());
            prop_assert!(decode(&obj[..keep]).is_err());
        }

        #[test]
        fn garbage_never_panics(obj in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&obj);
        }
    }
}
