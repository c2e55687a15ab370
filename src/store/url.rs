//! Where a repository lives: `/abs/path`, `file:///abs/path` or `s3://bucket/prefix`.

use crate::error::{Error, Result};
use std::fmt;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepoUrl {
    Local(PathBuf),
    S3 { bucket: String, prefix: String },
}

const FORMS: &str = "use an absolute path, file:///absolute/path or s3://bucket/prefix";

impl RepoUrl {
    pub fn parse(text: &str) -> Result<RepoUrl> {
        if text.is_empty() {
            return Err(Error::usage(format!(
                "no repository given: set --repo or WALVAULT_REPO ({FORMS})"
            )));
        }
        if text.starts_with('/') {
            return Self::local(text);
        }
        if let Some(path) = text.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(Error::usage(format!(
                    "repository URL '{text}' has a host or a relative path; {FORMS}"
                )));
            }
            return Self::local(path);
        }
        if let Some(rest) = text.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            // Never echo what could be a secret someone put in the URL.
            if bucket.contains('@') || bucket.contains(':') {
                return Err(Error::usage(
                    "credentials do not belong in the repository URL: give them through \
                     AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the AWS credential chain",
                ));
            }
            let valid_bucket = (3..=63).contains(&bucket.len())
                && bucket.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                });
            if !valid_bucket {
                return Err(Error::usage(format!(
                    "'{bucket}' is not a valid S3 bucket name (3-63 lower-case letters, digits, '-' or '.')"
                )));
            }
            let prefix = prefix.trim_matches('/').to_string();
            if prefix.split('/').any(|p| p == ".." || p == ".")
                || prefix.contains("//")
                || prefix.contains(['?', '#', '\\'])
            {
                return Err(Error::usage(format!(
                    "S3 prefix '{prefix}' has an empty, '.', '..' or special segment"
                )));
            }
            return Ok(RepoUrl::S3 {
                bucket: bucket.to_string(),
                prefix,
            });
        }
        let scheme = text.split_once("://").map(|(s, _)| s);
        Err(Error::usage(match scheme {
            Some(s) => format!("unsupported repository URL scheme '{s}'; {FORMS}"),
            None => format!(
                "repository '{text}' is a relative path; archive_command runs in the data \
                 directory, so {FORMS}"
            ),
        }))
    }

    fn local(path: &str) -> Result<RepoUrl> {
        let path = PathBuf::from(path);
        if path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(Error::usage(format!(
                "repository path '{}' contains '..'; give the resolved absolute path",
                path.display()
            )));
        }
        Ok(RepoUrl::Local(path))
    }
}

impl fmt::Display for RepoUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RepoUrl::Local(p) => write!(f, "{}", p.display()),
            RepoUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            RepoUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        assert_eq!(
            RepoUrl::parse("/srv/wal").unwrap(),
            RepoUrl::Local("/srv/wal".into())
        );
        assert_eq!(
            RepoUrl::parse("file:///srv/wal").unwrap(),
            RepoUrl::Local("/srv/wal".into())
        );
        assert_eq!(
            RepoUrl::parse("s3://my-bucket/a/b/").unwrap(),
            RepoUrl::S3 {
                bucket: "my-bucket".into(),
                prefix: "a/b".into()
            }
        );
        assert_eq!(
            RepoUrl::parse("s3://my-bucket").unwrap(),
            RepoUrl::S3 {
                bucket: "my-bucket".into(),
                prefix: "".into()
            }
        );
    }

    #[test]
    fn refusals() {
        for bad in [
            "",
            "relative/dir",
            "file://host/x",
            "gs://bucket",
            "/srv/../etc",
            "s3://AB",
            "s3://key:secret@bucket/x",
            "s3://bucket/a/../b",
        ] {
            assert!(RepoUrl::parse(bad).is_err(), "accepted {bad}");
        }
        let e = RepoUrl::parse("s3://AKIA:verysecret@bucket").unwrap_err();
        assert!(!e.message().contains("verysecret"));
    }
}
