//! The recovery settings a restored data directory starts with:
//! restore_command, the target, and the operator's recovery options.

use super::place::write_private_file;
use super::target;
use super::{ArchiveMode, RecoveryTarget, RestoreOptions, TargetAction};
use crate::error::{Context, Error, Result};
use crate::format::manifest::Manifest;
use crate::repository::RepoUrl;
use std::path::Path;

/// Every parameter that names a recovery target; PostgreSQL refuses more than one set.
const RECOVERY_TARGET_KEYS: [&str; 5] = [
    "recovery_target",
    "recovery_target_time",
    "recovery_target_lsn",
    "recovery_target_xid",
    "recovery_target_name",
];

/// Quotes a word for the shell PostgreSQL runs restore_command through.
pub(super) fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_/.:=@+-,".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

pub(super) fn write_recovery_settings(
    pgdata: &Path,
    url: &RepoUrl,
    cluster: Option<&str>,
    manifest: &Manifest,
    opts: &RestoreOptions,
) -> Result<()> {
    use target::conf_quote;
    let exe =
        std::env::current_exe().context(|| "cannot find this walvault binary's path".into())?;
    // In a repository of several clusters, the WAL of the backup's own.
    let cluster = cluster
        .map(|id| format!("--cluster {} ", shell_word(id)))
        .unwrap_or_default();
    let restore_command = format!(
        "{} --repo {} fetch {cluster}%f %p",
        shell_word(&exe.to_string_lossy()),
        shell_word(&url.to_string())
    );
    // Old recovery settings go (the backed-up server may itself be a
    // restored one, whose target would still apply); ours are appended.
    // Unused targets are left out, not set to '': PostgreSQL counts an
    // emptied target assigned after a set one as a second target.
    let mut settings: Vec<(String, String)> = vec![
        ("restore_command".into(), restore_command),
        (
            "recovery_target_timeline".into(),
            opts.target_timeline.setting(),
        ),
    ];
    settings.extend(
        opts.target
            .settings()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v)),
    );
    if opts.target_exclusive {
        settings.push(("recovery_target_inclusive".into(), "false".into()));
    }
    if opts.target != RecoveryTarget::Latest {
        let action = opts.target_action.unwrap_or(TargetAction::Promote);
        settings.push(("recovery_target_action".into(), action.setting().into()));
    }
    if let Some(c) = &opts.primary_conninfo {
        settings.push(("primary_conninfo".into(), c.clone()));
    }
    if opts.archive_mode == ArchiveMode::Off {
        settings.push(("archive_mode".into(), "off".into()));
    }
    // The operator's own options win: one line per key, theirs last.
    for (k, v) in &opts.recovery_options {
        settings.retain(|(key, _)| key != k);
        settings.push((k.clone(), v.clone()));
    }
    let ours: Vec<String> = settings.iter().map(|(k, _)| k.clone()).collect();
    let managed = |key: &str| {
        RECOVERY_TARGET_KEYS.contains(&key)
            || [
                "restore_command",
                "recovery_target_timeline",
                "recovery_target_action",
                "recovery_target_inclusive",
                "primary_conninfo",
            ]
            .contains(&key)
            || ours.iter().any(|k| k == key)
    };
    let auto = pgdata.join("postgresql.auto.conf");
    let previous = read_regular_file(&auto)?;
    let mut text: String = previous
        .lines()
        .filter(|line| !managed(line.split('=').next().unwrap_or("").trim()))
        .map(|line| format!("{line}\n"))
        .collect();
    text.push_str(&format!(
        "# added by walvault restore of backup {} at {}\n",
        manifest.id,
        chrono::Utc::now().to_rfc3339()
    ));
    for (k, v) in &settings {
        text.push_str(&format!("{k} = {}\n", conf_quote(v)));
    }
    write_private_file(&auto, text.as_bytes())?;
    let signal = if opts.standby {
        "standby.signal"
    } else {
        "recovery.signal"
    };
    write_private_file(&pgdata.join(signal), b"")
}

/// A restored file's text, never read through a link; empty when missing.
pub(super) fn read_regular_file(path: &Path) -> Result<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut text = String::new();
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(mut f) => {
            f.read_to_string(&mut text)
                .context(|| format!("cannot read {}", path.display()))?;
            Ok(text)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(text),
        Err(e) => Err(Error::io(format!("cannot read {}: {e}", path.display()))),
    }
}
