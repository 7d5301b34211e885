//! Where blobs are kept, behind one interface ([`BlobStore`]): the local filesystem by default
//! ([`FsStore`]); an S3-compatible object store for operators who outgrow one machine
//! (`S3Store` in `s3.rs`, cargo feature `s3`).
//!
//! Rules every store keeps:
//! - **Nothing half-visible.** A blob appears under its digest only once all of it is written,
//!   durable and hashed to that digest; an interrupted or refused upload leaves nothing behind
//!   under any name a reader looks at.
//! - **Bounded.** An upload stops at the limit it is given.
//! - **Verified on read.** A reader of a blob gets its bytes and, at the end, an error instead
//!   of success if they do not hash to the digest (a disk that rotted, a file someone edited):
//!   corrupt bytes are never taken for the blob.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest as _, Sha256};

use crate::digest::{hash_stream, Digest, HashError};

/// Why a store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the blob is larger than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the bytes hash to {actual}, not {expected}")]
    Mismatch { expected: Digest, actual: Digest },
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl From<HashError> for StoreError {
    fn from(e: HashError) -> Self {
        match e {
            HashError::Io(e) => StoreError::Io(e),
            HashError::TooLarge { limit } => StoreError::TooLarge { limit },
        }
    }
}

/// A store of blobs by digest (see the module's documentation).
pub trait BlobStore: Send + Sync {
    /// Stores what `r` yields, at most `limit` bytes; with `expect`, only if the bytes hash to
    /// it. Returns the digest and length. Storing a blob the store has is not an error.
    fn put(
        &self,
        r: &mut dyn Read,
        limit: u64,
        expect: Option<Digest>,
    ) -> Result<(Digest, u64), StoreError>;

    /// The blob's bytes, verified as they are read (see [`Verified`]); None if it is not kept.
    fn open(&self, d: &Digest) -> Result<Option<Verified<Box<dyn Read + Send>>>, StoreError>;

    /// Whether the blob is kept.
    fn has(&self, d: &Digest) -> bool;

    /// The blob's size, if it is kept.
    fn size(&self, d: &Digest) -> Result<Option<u64>, StoreError>;

    /// The blob as a local file, where the store keeps it as one (served without copying);
    /// None for a remote store.
    fn local_path(&self, _d: &Digest) -> Option<PathBuf> {
        None
    }

    /// Where the store is, for messages and logs.
    fn describe(&self) -> String;

    /// Forgets the blob; whether it was kept.
    fn remove(&self, d: &Digest) -> Result<bool, StoreError>;

    /// The whole blob, at most `limit` bytes, verified.
    fn read(&self, d: &Digest, limit: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(mut r) = self.open(d)? else {
            return Ok(None);
        };
        let mut out = vec![];
        (&mut r).take(limit + 1).read_to_end(&mut out)?;
        if out.len() as u64 > limit {
            return Err(StoreError::TooLarge { limit });
        }
        // To the end, so that the digest is checked.
        let mut rest = [0u8; 1];
        if r.read(&mut rest)? != 0 {
            return Err(StoreError::TooLarge { limit });
        }
        Ok(Some(out))
    }
}

/// A reader of a blob that hashes what it reads and, at the end, fails with
/// [`io::ErrorKind::InvalidData`] if the bytes are not the blob's.
pub struct Verified<R> {
    inner: R,
    hasher: Sha256,
    expected: Digest,
    done: bool,
}

impl<R: Read> Verified<R> {
    pub fn new(inner: R, expected: Digest) -> Self {
        Verified {
            inner,
            hasher: Sha256::new(),
            expected,
            done: false,
        }
    }
}

impl<R: Read> Read for Verified<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if n == 0 {
            let actual = Digest(std::mem::take(&mut self.hasher).finalize().into());
            self.done = true;
            if actual != self.expected {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "blob {} is corrupt: its bytes hash to {actual}",
                        self.expected
                    ),
                ));
            }
            return Ok(0);
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Blobs as files: `<root>/sha256/<hex>`, written first under `<root>/tmp/` and renamed into
/// place once durable and verified.
pub struct FsStore {
    root: PathBuf,
    next: AtomicU64,
}

impl FsStore {
    /// A store at `root` (made if missing). Uploads an earlier run left unfinished are removed.
    pub fn open(root: impl Into<PathBuf>) -> io::Result<FsStore> {
        let root = root.into();
        fs::create_dir_all(root.join("sha256"))?;
        let tmp = root.join("tmp");
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir_all(&tmp)?;
        Ok(FsStore {
            root,
            next: AtomicU64::new(0),
        })
    }

    fn path(&self, d: &Digest) -> PathBuf {
        self.root.join("sha256").join(d.hex())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl BlobStore for FsStore {
    fn put(
        &self,
        r: &mut dyn Read,
        limit: u64,
        expect: Option<Digest>,
    ) -> Result<(Digest, u64), StoreError> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .root
            .join("tmp")
            .join(format!("{}-{n}", std::process::id()));
        let result = (|| {
            let mut f = File::create(&tmp)?;
            let (d, len) = hash_stream(r, limit, |chunk| f.write_all(chunk))?;
            if let Some(expected) = expect.filter(|e| *e != d) {
                return Err(StoreError::Mismatch {
                    expected,
                    actual: d,
                });
            }
            f.sync_all()?;
            let dest = self.path(&d);
            if !dest.exists() {
                fs::rename(&tmp, &dest)?;
                File::open(self.root.join("sha256"))?.sync_all()?;
            }
            Ok((d, len))
        })();
        // Refused, interrupted or already kept: the temporary file goes.
        let _ = fs::remove_file(&tmp);
        result
    }

    fn open(&self, d: &Digest) -> Result<Option<Verified<Box<dyn Read + Send>>>, StoreError> {
        match File::open(self.path(d)) {
            Ok(f) => Ok(Some(Verified::new(
                Box::new(io::BufReader::new(f)) as Box<dyn Read + Send>,
                *d,
            ))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn has(&self, d: &Digest) -> bool {
        self.path(d).is_file()
    }

    fn size(&self, d: &Digest) -> Result<Option<u64>, StoreError> {
        match fs::metadata(self.path(d)) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn local_path(&self, d: &Digest) -> Option<PathBuf> {
        Some(self.path(d)).filter(|p| p.is_file())
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn remove(&self, d: &Digest) -> Result<bool, StoreError> {
        match fs::remove_file(self.path(d)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}
