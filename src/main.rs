//! Command-line parsing only: every verb lives in `walvault::commands`.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use walvault::commands::{fetch, push};
use walvault::error::{Error, ErrorKind};
use walvault::repository::RepoUrl;

#[derive(Parser)]
#[command(
    name = "walvault",
    version,
    about = "PostgreSQL WAL archive and point-in-time recovery, on a filesystem or S3",
    after_help = "postgresql.conf:\n  archive_command = 'walvault --repo URL push %p %f'\n  restore_command = 'walvault --repo URL fetch %f %p'"
)]
struct Cli {
    /// Repository: /abs/path, file:///abs/path or s3://bucket/prefix (S3 settings from AWS_* variables).
    #[arg(
        long,
        global = true,
        env = "WALVAULT_REPO",
        value_name = "URL",
        hide_env_values = false
    )]
    repo: Option<String>,

    /// More log output (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    /// Only warnings and errors.
    #[arg(short, long, global = true, env = "WALVAULT_QUIET")]
    quiet: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Archive one WAL file (archive_command = 'walvault push %p %f').
    Push {
        /// %p: path of the file, relative to the data directory.
        path: PathBuf,
        /// %f: its file name.
        name: String,
        /// zstd level (1-19).
        #[arg(long, env = "WALVAULT_COMPRESS_LEVEL", default_value_t = 3,
              value_parser = clap::value_parser!(i32).range(1..=19))]
        compress_level: i32,
    },
    /// Restore one WAL file (restore_command = 'walvault fetch %f %p').
    Fetch {
        /// %f: the file name PostgreSQL asks for.
        name: String,
        /// %p: where to write it, relative to the data directory.
        path: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // clap's usage errors are 2; help and version are 0.
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    walvault::logging::init(if cli.quiet {
        -1
    } else {
        cli.verbose.min(100) as i8
    });
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io(format!("cannot start the async runtime: {e}")))
        .and_then(|rt| rt.block_on(run(cli)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if e.kind == ErrorKind::NotFound {
                // PostgreSQL asks for files that do not exist yet: not an error.
                tracing::debug!("{e}");
            } else {
                tracing::error!("{e}");
            }
            ExitCode::from(e.kind.exit_code())
        }
    }
}

async fn run(cli: Cli) -> Result<(), Error> {
    let url = RepoUrl::parse(cli.repo.as_deref().unwrap_or(""))?;
    match cli.command {
        Command::Push {
            path,
            name,
            compress_level,
        } => {
            push::run(
                &url,
                &push::PushOptions {
                    path,
                    name,
                    compress_level,
                },
            )
            .await
        }
        Command::Fetch { name, path } => {
            fetch::run(&url, &fetch::FetchOptions { name, path }).await
        }
    }
}
