//! Repository URIs and the storage options that reach them.
//!
//! One URI names a repository: a plain path or `file://` (local filesystem), `s3://bucket/prefix`
//! (any S3-compatible store), `hdfs://host:port/path` (with the `hdfs` cargo feature).

use std::time::Duration;

use opendal::Operator;

use crate::error::{FormatError, Result};

/// How to reach S3 and how long to wait for any storage before giving up.
///
/// Fields left `None` fall back to the usual AWS environment variables when the repository is
/// opened: `AWS_ENDPOINT_URL` (then `AWS_ENDPOINT`), `AWS_REGION` (then `AWS_DEFAULT_REGION`),
/// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`.
#[derive(Debug, Clone)]
pub struct StorageOptions {
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
    pub s3_access_key_id: Option<String>,
    pub s3_secret_access_key: Option<String>,
    pub s3_session_token: Option<String>,
    /// Use `https://bucket.endpoint` instead of `https://endpoint/bucket` addressing.
    pub s3_virtual_host_style: bool,
    /// Upper bound for any one storage operation (and for opening the repository). An
    /// unreachable endpoint fails within about this time instead of hanging.
    pub timeout: Duration,
    /// Retries of temporary storage failures (not of timeouts of `open`).
    pub retries: usize,
}

impl Default for StorageOptions {
    fn default() -> Self {
        StorageOptions {
            s3_endpoint: None,
            s3_region: None,
            s3_access_key_id: None,
            s3_secret_access_key: None,
            s3_session_token: None,
            s3_virtual_host_style: false,
            timeout: Duration::from_secs(30),
            retries: 3,
        }
    }
}

impl StorageOptions {
    /// These options with unset S3 fields filled from the environment.
    pub fn with_env_fallbacks(&self) -> StorageOptions {
        fn env(names: &[&str]) -> Option<String> {
            names
                .iter()
                .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
        }
        let mut o = self.clone();
        o.s3_endpoint = o
            .s3_endpoint
            .or_else(|| env(&["AWS_ENDPOINT_URL", "AWS_ENDPOINT"]));
        o.s3_region = o
            .s3_region
            .or_else(|| env(&["AWS_REGION", "AWS_DEFAULT_REGION"]));
        o.s3_access_key_id = o.s3_access_key_id.or_else(|| env(&["AWS_ACCESS_KEY_ID"]));
        o.s3_secret_access_key = o
            .s3_secret_access_key
            .or_else(|| env(&["AWS_SECRET_ACCESS_KEY"]));
        o.s3_session_token = o.s3_session_token.or_else(|| env(&["AWS_SESSION_TOKEN"]));
        o
    }
}

/// A parsed repository URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// An absolute local directory.
    Local(std::path::PathBuf),
    S3 {
        bucket: String,
        prefix: String,
    },
    Hdfs {
        name_node: String,
        path: String,
    },
}

impl Location {
    /// Parses `uri`; relative local paths are made absolute against the current directory.
    pub fn parse(uri: &str) -> Result<Location> {
        let bad = |why: &str| {
            FormatError::invalid(format!(
                "repository URI {uri:?}: {why}; use a path, file:///path, s3://bucket/prefix or \
                 hdfs://host:port/path"
            ))
        };
        if uri.trim().is_empty() {
            return Err(bad("it is empty"));
        }
        if let Some(rest) = uri.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("no bucket"));
            }
            return Ok(Location::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.trim_matches('/').to_string(),
            });
        }
        if let Some(rest) = uri.strip_prefix("hdfs://") {
            let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
            if host.is_empty() {
                return Err(bad("no namenode host:port"));
            }
            return Ok(Location::Hdfs {
                name_node: format!("hdfs://{host}"),
                path: format!("/{}", path.trim_matches('/')),
            });
        }
        let path = match uri.strip_prefix("file://") {
            Some(p) if p.starts_with('/') => p,
            Some(_) => return Err(bad("file:// URIs must hold an absolute path (file:///dir)")),
            None if uri.contains("://") => return Err(bad("unknown scheme")),
            None => uri,
        };
        let path = std::path::Path::new(path);
        let abs = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir()
                .map_err(|e| {
                    FormatError::local_io(path, "cannot resolve the relative repository path", e)
                })?
                .join(path)
        };
        Ok(Location::Local(abs))
    }
}

/// Builds the operator for `loc`, with timeouts and retries from `opts` (already env-resolved).
pub(crate) fn operator(uri: &str, loc: &Location, opts: &StorageOptions) -> Result<Operator> {
    use opendal::layers::{RetryLayer, TimeoutLayer};
    let build_err =
        |e: opendal::Error| FormatError::storage(format!("cannot open repository {uri}"), e);
    let op = match loc {
        Location::Local(path) => {
            let b = opendal::services::Fs::default().root(&path.to_string_lossy());
            Operator::new(b).map_err(build_err)?
        }
        Location::S3 { bucket, prefix } => {
            let mut b = opendal::services::S3::default()
                .bucket(bucket)
                .root(&format!("/{prefix}"))
                .region(opts.s3_region.as_deref().unwrap_or("us-east-1"))
                .disable_ec2_metadata();
            if let Some(ep) = &opts.s3_endpoint {
                b = b.endpoint(ep);
            }
            if let Some(k) = &opts.s3_access_key_id {
                b = b.access_key_id(k);
            }
            if let Some(s) = &opts.s3_secret_access_key {
                b = b.secret_access_key(s);
            }
            if let Some(t) = &opts.s3_session_token {
                b = b.session_token(t);
            }
            if opts.s3_virtual_host_style {
                b = b.enable_virtual_host_style();
            }
            Operator::new(b).map_err(build_err)?
        }
        #[cfg(feature = "hdfs")]
        Location::Hdfs { name_node, path } => {
            let b = opendal::services::HdfsNative::default()
                .name_node(name_node)
                .root(path);
            Operator::new(b).map_err(build_err)?
        }
        #[cfg(not(feature = "hdfs"))]
        Location::Hdfs { .. } => {
            return Err(FormatError::invalid(format!(
                "repository {uri}: this hopps was built without HDFS support; rebuild with \
                 `--features hdfs` (cargo feature `hdfs` of hopps-format)"
            )));
        }
    };
    let io_timeout = opts.timeout;
    Ok(op
        .layer(
            RetryLayer::new()
                .with_max_times(opts.retries)
                .with_min_delay(Duration::from_millis(50))
                .with_max_delay(Duration::from_secs(2))
                .with_jitter(),
        )
        .layer(
            TimeoutLayer::new()
                .with_timeout(opts.timeout)
                .with_io_timeout(io_timeout),
        ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_uris() {
        assert_eq!(
            Location::parse("s3://bkt/a/b/").unwrap(),
            Location::S3 {
                bucket: "bkt".into(),
                prefix: "a/b".into()
            }
        );
        assert_eq!(
            Location::parse("s3://bkt").unwrap(),
            Location::S3 {
                bucket: "bkt".into(),
                prefix: String::new()
            }
        );
        assert_eq!(
            Location::parse("hdfs://nn:8020/models").unwrap(),
            Location::Hdfs {
                name_node: "hdfs://nn:8020".into(),
                path: "/models".into()
            }
        );
        assert_eq!(
            Location::parse("file:///srv/repo").unwrap(),
            Location::Local("/srv/repo".into())
        );
        assert!(
            matches!(Location::parse("rel/dir").unwrap(), Location::Local(p) if p.is_absolute())
        );
        for bad in ["", "s3://", "gs://x/y", "file://relative", "hdfs:///p"] {
            let err = Location::parse(bad).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::InvalidInput, "{bad}");
        }
    }
}
