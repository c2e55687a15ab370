//! What walvault knows about PostgreSQL: WAL file names and segment headers,
//! LSNs, the records walscan reads, the backup API client and a scratch server.

pub mod client;
pub mod cluster;
pub mod lsn;
pub mod server;
pub mod wal;
pub mod walscan;
