//! A hostile repository: every parser of what a repository (or a caller)
//! hands walvault gets damaged, truncated, extended and random input, and
//! (walvault.json, retention.json and history files included) must answer
//! with an error or the right value: never a panic, never a
//! buffer sized by a claim past the declared limit.
//!
//! `make test` runs a few hundred cases per parser; `WALVAULT_FUZZ_CASES`
//! sets how many (the fault suite runs 100 000).

use proptest::prelude::*;
use std::path::Path;
use walvault::format::object;

fn cases() -> u32 {
    std::env::var("WALVAULT_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

/// The real WAL segments of tests/wal_fixtures.rs, decompressed once.
fn fixture_segments() -> &'static [Vec<u8>] {
    static SEGMENTS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    SEGMENTS.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/wal");
        let mut all = vec![];
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "zst") {
                all.push(zstd::decode_all(std::fs::File::open(&path).unwrap()).unwrap());
            }
        }
        assert_eq!(all.len(), 6, "one fixture per supported version");
        all
    })
}

/// A well-formed manifest to damage.
fn manifest_json() -> String {
    serde_json::json!({
        "format": 1,
        "id": "20261127T153444Z",
        "pg_version": 150018,
        "system_identifier": "7714727710762327984",
        "wal_segment_size": 16777216,
        "timeline": 1,
        "start_lsn": "0/2000028",
        "stop_lsn": "0/2000138",
        "start_time": "2026-11-27T15:34:44Z",
        "stop_time": "2026-11-27T15:34:46Z",
        "backup_label": "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n",
        "tablespace_map": null,
        "tablespaces": [{"oid": 16385, "location": "/srv/ts1"}],
        "directories": [{"path": "base", "mode": 448}, {"path": "base/1", "mode": 448}],
        "files": [{
            "path": "base/1/1259",
            "size": 8192,
            "mode": 384,
            "mtime": "2026-11-27T15:30:00Z",
            "chunks_sha256": "ab".repeat(32),
            "chunks": [{
                "sha256": "cd".repeat(32),
                "size": 8192,
                "pack": "0123456789abcdef0123456789abcdef",
                "offset": 0,
                "length": 120
            }]
        }],
        "stats": {"size": 8192, "stored": 120, "deduplicated": 0}
    })
    .to_string()
}

/// Arbitrary JSON, a few levels deep.
fn any_json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(|n| serde_json::json!(n)),
        any::<u64>().prop_map(|n| serde_json::json!(n)),
        any::<f64>().prop_map(|n| serde_json::json!(n)),
        "\\PC{0,24}".prop_map(serde_json::Value::String),
    ];
    leaf.prop_recursive(4, 48, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("format".to_string()),
                    Just("files".to_string()),
                    Just("chunks".to_string()),
                    Just("path".to_string()),
                    Just("size".to_string()),
                    Just("offset".to_string()),
                    Just("length".to_string()),
                    "[a-z_]{1,12}",
                ],
                inner,
                0..8
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    /// An object damaged anywhere, cut anywhere or with bytes after it decodes
    /// to its content or fails: it is never mistaken for other content.
    #[test]
    fn objects(data in prop::collection::vec(any::<u8>(), 0..3000),
               flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
               cut in any::<Option<prop::sample::Index>>(),
               tail in prop::collection::vec(any::<u8>(), 0..8)) {
        let (_, mut obj) = object::encode(&data, 1).unwrap();
        for (at, x) in &flips {
            let i = at.index(obj.len());
            obj[i] ^= *x;
        }
        if let Some(cut) = cut {
            obj.truncate(cut.index(obj.len() + 1));
        }
        obj.extend_from_slice(&tail);
        if let Ok((header, content)) = object::decode(&obj) {
            prop_assert_eq!(content.len() as u64, header.length);
            prop_assert_eq!(object::Sha256Digest::of(&content), header.sha256);
        }
        // A header claiming more than the limit is refused before any work.
        if let Ok(header) = object::read_header_within(&obj, 1000) {
            prop_assert!(header.length <= 1000);
        }
        let _ = object::decode_limited(&obj, 1000);
    }

    /// Pure garbage, including garbage that starts like an object.
    #[test]
    fn garbage_objects(prefix_len in 0usize..16, junk in prop::collection::vec(any::<u8>(), 0..400)) {
        let (_, real) = object::encode(b"a segment", 1).unwrap();
        let mut obj = real[..prefix_len.min(real.len())].to_vec();
        obj.extend_from_slice(&junk);
        let _ = object::decode(&obj);
        let _ = object::read_header(&obj);
    }

    /// Real WAL of every version with bytes damaged where its records are:
    /// the header parser and walscan stop or skip, never panic or loop.
    #[test]
    fn wal_records(which in any::<prop::sample::Index>(),
                   flips in prop::collection::vec((0usize..(96 << 10), any::<u8>()), 1..24),
                   cut in any::<Option<prop::sample::Index>>()) {
        let segments = fixture_segments();
        let mut segment = segments[which.index(segments.len())].clone();
        for (at, x) in &flips {
            segment[*at] ^= *x;
        }
        if let Some(cut) = cut {
            segment.truncate(cut.index(segment.len() + 1));
        }
        if let Ok(header) = walvault::pg::wal::SegmentHeader::parse(&segment) {
            let _ = header.pg_version();
        }
        let times = walvault::pg::walscan::transaction_times(&segment);
        prop_assert!(times.len() < segment.len() / 24 + 1);
        let _ = walvault::pg::walscan::last_transaction_time(&segment);
    }

    /// Manifests: random JSON, and a real manifest with bytes damaged.
    #[test]
    fn manifests_from_any_json(value in any_json()) {
        let text = value.to_string();
        if let Ok(m) = walvault::format::manifest::Manifest::from_json(text.as_bytes(), "a test") {
            let _ = m.check_paths();
        }
    }

    #[test]
    fn damaged_manifests(flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut bytes = manifest_json().into_bytes();
        for (at, x) in &flips {
            let i = at.index(bytes.len());
            bytes[i] ^= *x;
        }
        if let Ok(m) = walvault::format::manifest::Manifest::from_json(&bytes, "a test") {
            let _ = m.check_paths();
        }
    }

    /// walvault.json and retention.json from random JSON, and history files
    /// from random text: parsed, validated and used without a panic.
    #[test]
    fn small_records(value in any_json(), text in "\\PC{0,200}", timeline: u32, segno: u64) {
        let bytes = value.to_string().into_bytes();
        if let Ok(c) = serde_json::from_slice::<walvault::repository::RepositoryConfig>(&bytes) {
            let _ = c.validate();
        }
        if let Ok(r) = serde_json::from_slice::<walvault::repository::retention::Retention>(&bytes) {
            let _ = r.is_complete_from(timeline, segno);
        }
        let _ = walvault::repository::archive::parse_history(&text);
        let lines = format!("{timeline}\t{}/{:X}\tbefore 2000-01-01\n{text}", segno >> 32, segno as u32);
        let _ = walvault::repository::archive::parse_history(&lines);
    }

    /// Names, LSNs, durations, times and URLs from a caller or a listing.
    #[test]
    fn text_inputs(s in "\\PC{0,48}") {
        let _ = walvault::pg::wal::WalFileName::parse(&s);
        let _ = walvault::pg::lsn::parse_lsn(&s);
        let _ = walvault::human::parse_duration(&s);
        let _ = walvault::commands::restore::parse_time(&s);
        let _ = walvault::repository::RepoUrl::parse(&s);
        let _ = walvault::format::manifest::safe_relative_path(&s);
    }

    #[test]
    fn durations_of_any_size(n: u64, unit in "[smhdw]?") {
        let _ = walvault::human::parse_duration(&format!("{n}{unit}"));
    }
}

#[test]
fn the_manifest_under_attack_is_a_real_one() {
    let m = walvault::format::manifest::Manifest::from_json(manifest_json().as_bytes(), "a test")
        .unwrap();
    m.check_paths().unwrap();
}
