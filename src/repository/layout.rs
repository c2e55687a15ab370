//! Object keys: where each kind of content lives in a repository
//! (docs/format.md, "Layout").

use crate::wal::WalFileName;
use object_store::path::Path as Key;

pub const WAL_DIR: &str = "wal";

/// `wal/<timeline+log>/<name>.zst` for segment-bound files: one folder per
/// 4 GiB of WAL keeps listings short on every store. `wal/<TTTTTTTT>.history.zst`
/// for timeline history files.
pub fn wal_key(name: &WalFileName) -> Key {
    match name {
        WalFileName::TimelineHistory(_) => Key::from(format!("{WAL_DIR}/{name}.zst")),
        WalFileName::Segment(s) | WalFileName::Partial(s) | WalFileName::BackupHistory(s, _) => {
            Key::from(format!(
                "{WAL_DIR}/{:08X}{:08X}/{name}.zst",
                s.timeline, s.log
            ))
        }
    }
}

/// The WAL file a key under `wal/` names, if it names one.
pub fn wal_name_of_key(key: &Key) -> Option<WalFileName> {
    let file = key.filename()?.strip_suffix(".zst")?;
    let name = WalFileName::parse(file).ok()?;
    (wal_key(&name) == *key).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        let seg = WalFileName::parse("000000020000000A000000FF").unwrap();
        assert_eq!(
            wal_key(&seg).as_ref(),
            "wal/000000020000000A/000000020000000A000000FF.zst"
        );
        let hist = WalFileName::parse("00000002.history").unwrap();
        assert_eq!(wal_key(&hist).as_ref(), "wal/00000002.history.zst");
        assert_eq!(wal_name_of_key(&wal_key(&seg)), Some(seg));
        assert_eq!(wal_name_of_key(&wal_key(&hist)), Some(hist));
        assert_eq!(
            wal_name_of_key(&Key::from("wal/x/000000020000000A000000FF.zst")),
            None
        );
    }
}
