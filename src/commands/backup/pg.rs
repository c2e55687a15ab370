//! PostgreSQL's low-level backup API, in one place: the only module that
//! knows how each major version names its functions.

use crate::error::{Error, Result};
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
    config.application_name("walvault");
    Ok(config)
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
            Error::io(format!(
                "cannot connect to {}: {e}; set --dbname or PGHOST/PGPORT/PGUSER",
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
}
