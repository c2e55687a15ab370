//! Real WAL from every supported PostgreSQL major version (fixtures/wal/,
//! made by scripts/make-fixtures.sh; each JSON file says what its segment
//! holds): the header parser and walscan read each one correctly, with no
//! server started.

use std::path::{Path, PathBuf};
use walvault::pg::wal::{SegmentHeader, SegmentName, WalFileName};

struct Fixture {
    about: serde_json::Value,
    segment: Vec<u8>,
}

fn fixtures() -> Vec<Fixture> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/wal");
    (13..=18)
        .map(|major| {
            let about_path = dir.join(format!("pg{major}.json"));
            let about: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&about_path).unwrap()).unwrap();
            let name = about["segment"].as_str().unwrap();
            let packed: PathBuf = dir.join(format!("pg{major}.{name}.zst"));
            let segment = zstd::decode_all(std::fs::File::open(&packed).unwrap()).unwrap();
            Fixture { about, segment }
        })
        .collect()
}

fn time(v: &serde_json::Value) -> chrono::DateTime<chrono::Utc> {
    v.as_str().unwrap().parse().unwrap()
}

#[test]
fn every_version_has_a_fixture_and_its_header_reads() {
    let all = fixtures();
    assert_eq!(all.len(), 6);
    for f in &all {
        let major = f.about["major"].as_u64().unwrap() as u32;
        let size = f.about["segment_size"].as_u64().unwrap() as u32;
        assert_eq!(f.segment.len(), size as usize, "PostgreSQL {major}");
        let header =
            SegmentHeader::parse(&f.segment).unwrap_or_else(|e| panic!("PostgreSQL {major}: {e}"));
        assert_eq!(header.pg_version(), major);
        assert_eq!(header.segment_size, size);
        assert_eq!(header.block_size, 8192);
        assert_eq!(
            header.system_identifier.to_string(),
            f.about["system_identifier"].as_str().unwrap()
        );
        let WalFileName::Segment(name) =
            WalFileName::parse(f.about["segment"].as_str().unwrap()).unwrap()
        else {
            panic!("not a segment name");
        };
        header.check_matches(name).unwrap();
        let next: SegmentName = name.next(size);
        assert!(header.check_matches(next).is_err(), "PostgreSQL {major}");
    }
}

#[test]
fn walscan_finds_every_commit_and_abort_of_every_version() {
    for f in fixtures() {
        let major = f.about["major"].as_u64().unwrap();
        let times = walvault::pg::walscan::transaction_times(&f.segment);
        assert_eq!(
            times.len() as u64,
            f.about["transactions"].as_u64().unwrap(),
            "PostgreSQL {major}: {times:?}"
        );
        let (from, to) = (time(&f.about["not_before"]), time(&f.about["not_after"]));
        for t in &times {
            assert!(
                from <= *t && *t <= to,
                "PostgreSQL {major}: {t} outside {from}..{to}"
            );
        }
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "PostgreSQL {major}");
        assert_eq!(
            walvault::pg::walscan::last_transaction_time(&f.segment),
            times.last().copied()
        );
    }
}
