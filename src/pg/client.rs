//! PostgreSQL's low-level backup API, in one place: the only module that
//! knows how each major version names its functions.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use tokio_postgres::{Client, Config, NoTls};

/// How to reach the server: `--dbname` (a conninfo string or URL) first, then
/// the standard libpq variables, then libpq's defaults.
pub fn connection_config(dbname: Option<&str>) -> Result<Config> {
    let mut config: Config = match dbname {
        Some(s) => s
            .parse()
            .map_err(|e| Error::usage(format!("cannot parse --dbname: {e}")))?,
        None => Config::new(),
    };
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    if config.get_hosts().is_empty() {
        let host = env("PGHOST").unwrap_or_else(|| {
            if std::path::Path::new("/var/run/postgresql").is_dir() {
                "/var/run/postgresql".into()
            } else {
                "localhost".into()
            }
        });
        config.host(&host);
    }
    if config.get_ports().is_empty()
        && let Some(port) = env("PGPORT")
    {
        let port = port
            .parse()
            .map_err(|_| Error::usage(format!("PGPORT '{port}' is not a port number")))?;
        config.port(port);
    }
    if config.get_user().is_none() {
        let user = env("PGUSER")
            .or_else(|| env("USER"))
            .unwrap_or_else(|| "postgres".into());
        config.user(&user);
    }
    if config.get_dbname().is_none() {
        config.dbname(env("PGDATABASE").as_deref().unwrap_or("postgres"));
    }
    if config.get_password().is_none()
        && let Some(p) = env("PGPASSWORD")
    {
        config.password(p);
    }
    // Like libpq, a password file keeps the password out of argv and the
    // environment: PGPASSFILE, else ~/.pgpass.
    if config.get_password().is_none() {
        let file = env("PGPASSFILE")
            .map(PathBuf::from)
            .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".pgpass")));
        if let Some(file) = file
            && let Some(p) = password_from_file(&file, &config)
        {
            config.password(p);
        }
    }
    config.application_name("walvault");
    Ok(config)
}

/// The password for `config`'s first host, port, database and user from a
/// libpq password file (`hostname:port:database:username:password`, `*`
/// matching anything, `\` escaping `:` and `\`; the first match wins). Like
/// libpq, a file others may read is ignored, with a warning.
fn password_from_file(path: &Path, config: &Config) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() {
        return None;
    }
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            "password file {} has group or world access and is ignored; make it u=rw (0600) or less",
            path.display()
        );
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    let hosts = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => vec![h.clone()],
        // libpq names a socket connection "localhost" in the file (or by its directory).
        Some(tokio_postgres::config::Host::Unix(p)) => {
            vec!["localhost".into(), p.display().to_string()]
        }
        None => vec!["localhost".into()],
    };
    let port = config
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432)
        .to_string();
    let database = config.get_dbname().unwrap_or("postgres");
    let user = config.get_user().unwrap_or("postgres");
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(split_pgpass_line)
        .find(|f| {
            let matches = |field: &str, value: &str| field == "*" || field == value;
            hosts.iter().any(|h| matches(&f[0], h))
                && matches(&f[1], &port)
                && matches(&f[2], database)
                && matches(&f[3], user)
        })
        .map(|mut f| f.swap_remove(4))
}

/// The five fields of a password file line, unescaped; `None` if it has fewer.
fn split_pgpass_line(line: &str) -> Option<Vec<String>> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    fields.last_mut().expect("one field").push(next);
                }
            }
            // The password is the rest of the line.
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => fields.last_mut().expect("one field").push(c),
        }
    }
    (fields.len() == 5).then_some(fields)
}

fn describe_target(config: &Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "?".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "PostgreSQL at {host} port {port} as {}",
        config.get_user().unwrap_or("?")
    )
}

/// What the server says about itself before a backup.
pub struct ServerInfo {
    /// `server_version_num`, e.g. 150018.
    pub version_num: u32,
    pub system_identifier: String,
    pub wal_segment_size: u32,
    pub data_directory: Option<String>,
}

/// What `pg_backup_stop` returns.
pub struct BackupStop {
    pub lsn: String,
    pub backup_label: String,
    pub tablespace_map: Option<String>,
}

pub struct Server {
    client: Client,
    pub info: ServerInfo,
}

fn sql_error(what: &str, e: tokio_postgres::Error) -> Error {
    let detail = e
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| e.to_string());
    Error::io(format!("{what}: {detail}"))
}

impl Server {
    pub async fn connect(config: &Config) -> Result<Server> {
        let (client, connection) = config.connect(NoTls).await.map_err(|e| {
            // tokio-postgres keeps the reason ("password missing") in the source.
            let reason = match std::error::Error::source(&e) {
                Some(source) => format!("{e}: {source}"),
                None => e.to_string(),
            };
            Error::io(format!(
                "cannot connect to {}: {reason}; set --dbname or PGHOST/PGPORT/PGUSER \
                 (a password: PGPASSFILE or ~/.pgpass, mode 0600)",
                describe_target(config)
            ))
        })?;
        // Drive the connection, and pass on the server's warnings (such as
        // "still waiting for all required WAL segments to be archived").
        let mut connection = connection;
        tokio::spawn(async move {
            use futures::StreamExt;
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(tokio_postgres::AsyncMessage::Notice(n)) if n.severity() == "WARNING" => {
                        tracing::warn!("server: {}", n.message())
                    }
                    Ok(tokio_postgres::AsyncMessage::Notice(n)) => {
                        tracing::debug!("server: {}", n.message())
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!("connection closed: {e}");
                        break;
                    }
                }
            }
        });
        let row = client
            .query_one(
                "SELECT current_setting('server_version_num')::int4, \
                        (SELECT system_identifier::text FROM pg_control_system()), \
                        (SELECT setting::int4 FROM pg_settings WHERE name = 'wal_segment_size'), \
                        (SELECT setting FROM pg_settings WHERE name = 'data_directory')",
                &[],
            )
            .await
            .map_err(|e| sql_error("cannot read server settings", e))?;
        let info = ServerInfo {
            version_num: row.get::<_, i32>(0) as u32,
            system_identifier: row.get(1),
            wal_segment_size: row.get::<_, i32>(2) as u32,
            data_directory: row.get(3),
        };
        if info.version_num < 130000 {
            return Err(Error::usage(format!(
                "PostgreSQL {} is not supported; walvault backs up 13 and later",
                info.version_num / 10000
            )));
        }
        Ok(Server { client, info })
    }

    /// Starts a non-exclusive backup on this connection, with an immediate
    /// checkpoint. Returns the start LSN.
    pub async fn backup_start(&self, label: &str) -> Result<String> {
        let sql = if self.info.version_num >= 150000 {
            "SELECT pg_backup_start($1, fast => true)::text"
        } else {
            "SELECT pg_start_backup($1, fast => true, exclusive => false)::text"
        };
        let row = self
            .client
            .query_one(sql, &[&label])
            .await
            .map_err(|e| sql_error("cannot start the backup", e))?;
        Ok(row.get(0))
    }

    /// The timeline of the checkpoint the backup started from (on a
    /// standby, of the restartpoint): the one its WAL starts on.
    pub async fn checkpoint_timeline(&self) -> Result<u32> {
        let row = self
            .client
            .query_one("SELECT timeline_id::int8 FROM pg_control_checkpoint()", &[])
            .await
            .map_err(|e| sql_error("cannot read the checkpoint's timeline", e))?;
        let timeline: i64 = row.get(0);
        u32::try_from(timeline)
            .map_err(|_| Error::io(format!("the server reports timeline {timeline}")))
    }

    /// Ends the backup, waiting until the WAL it needs is archived.
    pub async fn backup_stop(&self) -> Result<BackupStop> {
        let sql = if self.info.version_num >= 150000 {
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(wait_for_archive => true)"
        } else {
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_stop_backup(exclusive => false, wait_for_archive => true)"
        };
        let row = self
            .client
            .query_one(sql, &[])
            .await
            .map_err(|e| sql_error("cannot stop the backup", e))?;
        let map: Option<String> = row.get(2);
        Ok(BackupStop {
            lsn: row.get(0),
            backup_label: row.get(1),
            tablespace_map: map.filter(|m| !m.is_empty()),
        })
    }
}

/// `START TIMELINE: n` from a backup_label.
pub fn timeline_from_label(label: &str) -> Option<u32> {
    label
        .lines()
        .find_map(|l| l.strip_prefix("START TIMELINE:"))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn label_timeline() {
        let label = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n\
                     CHECKPOINT LOCATION: 0/2000060\nSTART TIMELINE: 3\n";
        assert_eq!(super::timeline_from_label(label), Some(3));
        assert_eq!(super::timeline_from_label("x"), None);
    }

    #[test]
    fn password_file() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("pgpass");
        std::fs::write(
            &file,
            "# comment\n\
             db.example:5432:*:other:nope\n\
             localhost:5433:postgres:backup:wrong port\n\
             localhost:*:postgres:backup:s3cr\\:et\\\\x:y\n\
             *:*:*:*:fallback\n",
        )
        .unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let config: super::Config =
            "host=/var/run/postgresql port=5432 user=backup dbname=postgres"
                .parse()
                .unwrap();
        assert_eq!(
            super::password_from_file(&file, &config).as_deref(),
            Some("s3cr:et\\x:y")
        );
        let other: super::Config = "host=db.example user=nobody dbname=x".parse().unwrap();
        assert_eq!(
            super::password_from_file(&file, &other).as_deref(),
            Some("fallback")
        );
        // Readable by others: ignored, like libpq does.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(super::password_from_file(&file, &config), None);
    }
}
