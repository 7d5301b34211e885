//! Blobs in an S3-compatible object store ([`S3Store`], cargo feature `s3`), for operators
//! whose Hub outgrows one machine's disk: AWS S3, Ceph's radosgw, MinIO, Garage, s3s-fs.
//!
//! Objects are named `<prefix>sha256/<hex>`, as [`crate::FsStore`] names its files, and the
//! store keeps the rules of `store.rs`:
//! - **Nothing half-visible.** An object is written by one PUT, or by a multipart upload that
//!   S3 makes visible only when it completes; the bytes are hashed as they are sent, and an
//!   upload whose bytes are not the digest expected (or that runs past its limit, or whose
//!   reader fails) is aborted, never completed.
//! - **Bounded.** An upload stops at its limit; a blob of unknown digest is spooled to a local
//!   file first (its name is its digest), bounded the same way.
//! - **Verified on read.** Reads are hashed as they stream, and fail at the end if an object
//!   was altered in the bucket.
//!
//! The [`crate::BlobStore`] trait is synchronous (a package is reviewed by code that reads it
//! like files); the store runs its requests on a runtime of its own, on one thread, and its
//! callers wait for them as they would wait for a disk.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where an [`S3Store`] keeps blobs (the node's `registry.hub.s3` section).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// The S3 API's URL: `https://s3.eu-west-1.amazonaws.com`, `http://127.0.0.1:9000`. Plain
    /// `http://` only to this machine, unless `allow_http`.
    pub endpoint: String,
    /// The bucket (made beforehand: the Hub does not create buckets).
    pub bucket: String,
    /// The region the signatures name; default `us-east-1` (what most S3-compatible servers
    /// accept).
    pub region: String,
    /// A prefix for the Hub's objects in a shared bucket (`hub/`); default none.
    pub prefix: String,
    /// The access key id; empty: `AWS_ACCESS_KEY_ID` from the environment.
    pub access_key_id: String,
    /// A file holding the secret access key (mode 0600); empty: `AWS_SECRET_ACCESS_KEY` from
    /// the environment.
    pub secret_access_key_file: PathBuf,
    /// Send the bucket in the host name (`bucket.s3.example.com`) instead of the path.
    pub virtual_hosted: bool,
    /// Allow plain `http://` to another machine (the keys' signatures and the blobs cross the
    /// network unencrypted).
    pub allow_http: bool,
}

impl S3Config {
    /// Whether a bucket is configured (an empty section means the filesystem store).
    pub fn is_set(&self) -> bool {
        !self.bucket.is_empty() || !self.endpoint.is_empty()
    }
}

#[cfg(feature = "s3")]
pub use imp::S3Store;

#[cfg(feature = "s3")]
mod imp {
    use std::io::{self, Read};
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use bytes::Bytes;
    use futures::StreamExt;
    use object_store::aws::AmazonS3Builder;
    use object_store::buffered::BufWriter;
    use object_store::path::Path;
    use object_store::{ObjectStore, ObjectStoreExt};
    use tokio::io::AsyncWriteExt;

    use super::S3Config;
    use crate::digest::{hash_stream, Digest};
    use crate::store::{BlobStore, StoreError, Verified};

    /// Blobs in an S3 bucket (see the module's documentation).
    pub struct S3Store {
        store: Arc<dyn ObjectStore>,
        prefix: String,
        what: String,
        /// The runtime the requests run on (its thread ends when the store is dropped).
        rt: tokio::runtime::Handle,
        _stop: tokio::sync::oneshot::Sender<()>,
        /// Local spool for blobs whose digest is not known before they are read.
        spool: PathBuf,
        next: AtomicU64,
    }

    fn other(e: impl std::fmt::Display) -> StoreError {
        StoreError::Io(io::Error::other(e.to_string()))
    }

    fn is_loopback(endpoint: &str) -> bool {
        url::Url::parse(endpoint)
            .ok()
            .and_then(|u| {
                u.host().map(|h| match h {
                    url::Host::Domain(d) => d == "localhost",
                    url::Host::Ipv4(a) => a.is_loopback(),
                    url::Host::Ipv6(a) => a.is_loopback(),
                })
            })
            .unwrap_or(false)
    }

    impl S3Store {
        /// A store in `cfg`'s bucket; blobs of unknown digest spool under `spool` (made if
        /// missing, emptied). Checks that the bucket answers before returning.
        pub fn open(cfg: &S3Config, spool: impl Into<PathBuf>) -> Result<S3Store, StoreError> {
            if cfg.bucket.is_empty() {
                return Err(other("s3: no bucket is set (registry.hub.s3.bucket)"));
            }
            if cfg.endpoint.is_empty() {
                return Err(other(
                    "s3: no endpoint is set (registry.hub.s3.endpoint: the S3 API's URL)",
                ));
            }
            let http = cfg.endpoint.starts_with("http://");
            if !http && !cfg.endpoint.starts_with("https://") {
                return Err(other(format!(
                    "s3: the endpoint {} is not an http(s):// URL",
                    cfg.endpoint
                )));
            }
            if http && !cfg.allow_http && !is_loopback(&cfg.endpoint) {
                return Err(other(format!(
                    "s3: refusing plain http:// to {}: signatures and blobs would cross the network unencrypted; use https:// or set registry.hub.s3.allow_http",
                    cfg.endpoint
                )));
            }
            let key_id = if cfg.access_key_id.is_empty() {
                std::env::var("AWS_ACCESS_KEY_ID").unwrap_or_default()
            } else {
                cfg.access_key_id.clone()
            };
            let secret = if cfg.secret_access_key_file.as_os_str().is_empty() {
                std::env::var("AWS_SECRET_ACCESS_KEY").unwrap_or_default()
            } else {
                std::fs::read_to_string(&cfg.secret_access_key_file)
                    .map_err(|e| {
                        other(format!(
                            "s3: the secret access key file {}: {e}",
                            cfg.secret_access_key_file.display()
                        ))
                    })?
                    .trim()
                    .to_owned()
            };
            if key_id.is_empty() || secret.is_empty() {
                return Err(other(
                    "s3: no credentials: set registry.hub.s3.access_key_id and secret_access_key_file, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
                ));
            }
            let region = if cfg.region.is_empty() {
                "us-east-1"
            } else {
                &cfg.region
            };
            let store = AmazonS3Builder::new()
                .with_endpoint(cfg.endpoint.trim_end_matches('/'))
                .with_bucket_name(&cfg.bucket)
                .with_region(region)
                .with_access_key_id(key_id)
                .with_secret_access_key(secret)
                .with_virtual_hosted_style_request(cfg.virtual_hosted)
                .with_allow_http(http)
                .build()
                .map_err(|e| other(format!("s3: {e}")))?;
            let prefix = cfg.prefix.trim_matches('/').to_owned();
            let prefix = if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            };
            let spool = spool.into();
            if spool.exists() {
                std::fs::remove_dir_all(&spool)?;
            }
            std::fs::create_dir_all(&spool)?;
            // The requests' runtime, on a thread of its own: the store is used from plain
            // threads and from async code alike.
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name("hub-s3".into())
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = tx.send(Ok(rt.handle().clone()));
                    rt.block_on(async {
                        let _ = stopped.await;
                    });
                })?;
            let rt = rx
                .recv()
                .map_err(|_| other("s3: its runtime did not start"))??;
            let s = S3Store {
                store: Arc::new(store),
                prefix,
                what: format!(
                    "s3 bucket {} at {}{}",
                    cfg.bucket,
                    cfg.endpoint,
                    if cfg.prefix.is_empty() {
                        String::new()
                    } else {
                        format!(" (prefix {})", cfg.prefix)
                    }
                ),
                rt,
                _stop: stop,
                spool,
                next: AtomicU64::new(0),
            };
            // The bucket answers (a missing one, or keys it refuses, fail now, not at the
            // first upload).
            let store = s.store.clone();
            let probe = s.path_of("sha256");
            s.run(async move { store.list_with_delimiter(Some(&probe)).await.map(|_| ()) })?
                .map_err(|e| other(format!("s3: {}: {e}", s.what)))?;
            Ok(s)
        }

        fn path_of(&self, rest: &str) -> Path {
            Path::from(format!("{}{rest}", self.prefix))
        }

        fn path(&self, d: &Digest) -> Path {
            self.path_of(&format!("sha256/{}", d.hex()))
        }

        /// Runs `f` on the store's runtime and waits for it.
        fn run<F>(&self, f: F) -> Result<F::Output, StoreError>
        where
            F: std::future::Future + Send + 'static,
            F::Output: Send + 'static,
        {
            futures::executor::block_on(self.rt.spawn(f)).map_err(other)
        }

        /// Sends what `r` yields to the object of `d`, hashing it: completed only if the bytes
        /// are `d` and within `limit`.
        fn upload(&self, r: &mut dyn Read, limit: u64, d: Digest) -> Result<u64, StoreError> {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(4);
            let (commit_tx, commit_rx) = tokio::sync::oneshot::channel::<bool>();
            let store = self.store.clone();
            let path = self.path(&d);
            let task = self.rt.spawn(async move {
                let mut w = BufWriter::new(store, path);
                let mut failed = None;
                while let Some(b) = rx.recv().await {
                    if failed.is_none() {
                        if let Err(e) = w.put(b).await {
                            failed = Some(e);
                        }
                    }
                }
                match (failed, commit_rx.await) {
                    (None, Ok(true)) => w.shutdown().await.map_err(|e| e.to_string()),
                    (failed, _) => {
                        let _ = w.abort().await;
                        Err(failed.map(|e| e.to_string()).unwrap_or_default())
                    }
                }
            });
            let sent = hash_stream(r, limit, |chunk| {
                futures::executor::block_on(tx.send(Bytes::copy_from_slice(chunk)))
                    .map_err(|_| io::Error::other("the upload stopped"))
            });
            drop(tx);
            let good = matches!(&sent, Ok((actual, _)) if *actual == d);
            let _ = commit_tx.send(good);
            let done = futures::executor::block_on(task).map_err(other)?;
            let (actual, len) = sent?;
            if actual != d {
                return Err(StoreError::Mismatch {
                    expected: d,
                    actual,
                });
            }
            done.map_err(|e| other(format!("s3: uploading {d}: {e}")))?;
            Ok(len)
        }
    }

    /// A reader of an object's body as it streams (chunks passed from the store's runtime).
    struct Body {
        rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
        cur: Bytes,
    }

    impl Read for Body {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            while self.cur.is_empty() {
                match futures::executor::block_on(self.rx.recv()) {
                    Some(Ok(b)) => self.cur = b,
                    Some(Err(e)) => return Err(e),
                    None => return Ok(0),
                }
            }
            let n = buf.len().min(self.cur.len());
            buf[..n].copy_from_slice(&self.cur.split_to(n));
            Ok(n)
        }
    }

    impl BlobStore for S3Store {
        fn put(
            &self,
            r: &mut dyn Read,
            limit: u64,
            expect: Option<Digest>,
        ) -> Result<(Digest, u64), StoreError> {
            if let Some(d) = expect {
                if self.has(&d) {
                    // Read to the end anyway, so that a wrong body is still refused.
                    let (actual, len) = hash_stream(r, limit, |_| Ok(()))?;
                    if actual != d {
                        return Err(StoreError::Mismatch {
                            expected: d,
                            actual,
                        });
                    }
                    return Ok((d, len));
                }
                return Ok((d, self.upload(r, limit, d)?));
            }
            // Digest unknown: spooled (and hashed) first, then sent under its name.
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let tmp = self.spool.join(format!("{}-{n}", std::process::id()));
            let result = (|| {
                let mut f = std::fs::File::create(&tmp)?;
                let (d, _) = hash_stream(r, limit, |c| io::Write::write_all(&mut f, c))?;
                drop(f);
                self.put(
                    &mut io::BufReader::new(std::fs::File::open(&tmp)?),
                    limit,
                    Some(d),
                )
            })();
            let _ = std::fs::remove_file(&tmp);
            result
        }

        fn open(&self, d: &Digest) -> Result<Option<Verified<Box<dyn Read + Send>>>, StoreError> {
            let store = self.store.clone();
            let path = self.path(d);
            let got = self.run(async move { store.get(&path).await })?;
            let got = match got {
                Ok(g) => g,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(other(format!("s3: {d}: {e}"))),
            };
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            self.rt.spawn(async move {
                let mut stream = got.into_stream();
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(io::Error::other);
                    let failed = chunk.is_err();
                    // A failed read ends the body; so does a reader that went away.
                    if tx.send(chunk).await.is_err() || failed {
                        break;
                    }
                }
            });
            Ok(Some(Verified::new(
                Box::new(Body {
                    rx,
                    cur: Bytes::new(),
                }) as Box<dyn Read + Send>,
                *d,
            )))
        }

        fn has(&self, d: &Digest) -> bool {
            matches!(self.size(d), Ok(Some(_)))
        }

        fn size(&self, d: &Digest) -> Result<Option<u64>, StoreError> {
            let store = self.store.clone();
            let path = self.path(d);
            match self.run(async move { store.head(&path).await })? {
                Ok(m) => Ok(Some(m.size)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(other(format!("s3: {d}: {e}"))),
            }
        }

        fn remove(&self, d: &Digest) -> Result<bool, StoreError> {
            if !self.has(d) {
                return Ok(false);
            }
            let store = self.store.clone();
            let path = self.path(d);
            self.run(async move { store.delete(&path).await })?
                .map_err(|e| other(format!("s3: {d}: {e}")))?;
            Ok(true)
        }

        fn describe(&self) -> String {
            self.what.clone()
        }
    }
}
