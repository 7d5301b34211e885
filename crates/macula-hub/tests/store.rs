//! The blob stores, each held to the same rules: blobs by digest, nothing half-visible,
//! bounded uploads, corrupt bytes never taken for the blob. The filesystem store always; the
//! S3 store (feature `s3`) against a real S3 API server, `s3s-fs`, SKIPPED where that is not
//! installed (`.ci/run` installs it).

#[path = "common/s3s.rs"]
mod s3s;

use std::io::{self, Read};
use std::path::PathBuf;

use macula_hub::{BlobStore, Digest, FsStore, StoreError};

/// A store under test, and how to look behind its back: the file that holds a blob's bytes
/// (to alter them), and how many blobs and leftovers (temporary files, spooled uploads) are
/// on its disk.
struct Backend {
    store: Box<dyn BlobStore>,
    file_of: Box<dyn Fn(&Digest) -> PathBuf>,
    kept: Box<dyn Fn() -> usize>,
    leftovers: Box<dyn Fn() -> usize>,
}

fn count(dir: PathBuf) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

fn fs_backend(dir: &std::path::Path) -> Backend {
    let root = dir.to_path_buf();
    let (r1, r2, r3) = (root.clone(), root.clone(), root.clone());
    Backend {
        store: Box::new(FsStore::open(&root).unwrap()),
        file_of: Box::new(move |d| r1.join("sha256").join(d.hex())),
        kept: Box::new(move || count(r2.join("sha256"))),
        leftovers: Box::new(move || count(r3.join("tmp"))),
    }
}

#[test]
fn the_filesystem_store_keeps_the_rules() {
    let dir = tempfile::tempdir().unwrap();
    let b = fs_backend(dir.path());
    kept_and_read_back(&b);
    refused_or_interrupted(&b);
    corrupt_bytes(&b);
}

/// A blob is kept by its digest and read back verified.
fn kept_and_read_back(b: &Backend) {
    let s = &b.store;
    let data = b"the bytes of a package".to_vec();
    let (d, n) = s.put(&mut &data[..], 1 << 20, None).unwrap();
    assert_eq!((d, n), (Digest::of(&data), data.len() as u64));
    assert!(s.has(&d));
    assert_eq!(s.read(&d, 1 << 20).unwrap().unwrap(), data);
    // Again: not an error, one copy.
    assert_eq!(s.put(&mut &data[..], 1 << 20, Some(d)).unwrap().0, d);
    let other = Digest::of(b"nothing");
    assert!(s.read(&other, 10).unwrap().is_none());
    assert_eq!(s.size(&d).unwrap(), Some(data.len() as u64));
    assert_eq!(s.size(&other).unwrap(), None);
    assert!(s.remove(&d).unwrap());
    assert!(!s.has(&d));
    assert!(!s.remove(&d).unwrap());
}

/// A refused or interrupted upload leaves nothing visible.
fn refused_or_interrupted(b: &Backend) {
    let s = &b.store;
    let data = vec![1u8; 4096];
    // Not the digest promised.
    let wrong = Digest::of(b"something else");
    assert!(matches!(
        s.put(&mut &data[..], 1 << 20, Some(wrong)),
        Err(StoreError::Mismatch { .. })
    ));
    // Larger than allowed.
    assert!(matches!(
        s.put(&mut &data[..], 100, None),
        Err(StoreError::TooLarge { limit: 100 })
    ));
    // The sender goes away halfway.
    struct Broken(usize);
    impl Read for Broken {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0 == 0 {
                return Err(io::Error::new(io::ErrorKind::ConnectionReset, "gone"));
            }
            let n = buf.len().min(self.0);
            buf[..n].fill(9);
            self.0 -= n;
            Ok(n)
        }
    }
    assert!(matches!(
        s.put(&mut Broken(1000), 1 << 20, None),
        Err(StoreError::Io(_))
    ));
    // ... also when the digest is promised (the store streams it to its place).
    let promised = Digest::of(&[9u8; 1000]);
    assert!(matches!(
        s.put(&mut Broken(600), 1 << 20, Some(promised)),
        Err(StoreError::Io(_))
    ));
    assert!(matches!(
        s.put(&mut &data[..], 100, Some(Digest::of(&data))),
        Err(StoreError::TooLarge { limit: 100 })
    ));
    // Nothing under any digest, nothing left behind.
    assert!(!s.has(&Digest::of(&data)));
    assert!(!s.has(&promised));
    assert_eq!(((b.kept)(), (b.leftovers)()), (0, 0));
}

/// Corrupt bytes on disk are never taken for the blob.
fn corrupt_bytes(b: &Backend) {
    let s = &b.store;
    let data = vec![5u8; 10_000];
    let (d, _) = s.put(&mut &data[..], 1 << 20, None).unwrap();
    // A byte flips on disk.
    let path = (b.file_of)(&d);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[5000] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let e = s.read(&d, 1 << 20).unwrap_err();
    assert!(e.to_string().contains("corrupt"), "{e}");
    // A streaming reader gets the bytes and then the error, never a clean end.
    let mut r = s.open(&d).unwrap().unwrap();
    let mut sink = vec![];
    assert_eq!(
        r.read_to_end(&mut sink).unwrap_err().kind(),
        io::ErrorKind::InvalidData
    );
    // A blob larger than the reader allows is refused.
    let (big, _) = s.put(&mut &vec![0u8; 2048][..], 1 << 20, None).unwrap();
    assert!(matches!(
        s.read(&big, 1024),
        Err(StoreError::TooLarge { limit: 1024 })
    ));
}

#[test]
fn uploads_an_earlier_run_left_unfinished_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
    std::fs::write(dir.path().join("tmp").join("1-0"), b"half").unwrap();
    FsStore::open(dir.path()).unwrap();
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0
    );
}

#[cfg(not(feature = "s3"))]
#[test]
fn the_s3_store_keeps_the_rules() {
    eprintln!("SKIPPED the S3 store: macula-hub is built without its feature s3 (cargo test --features s3; the workspace's tests build it)");
}

#[cfg(feature = "s3")]
mod s3 {
    use super::*;
    use macula_hub::s3::{S3Config, S3Store};

    fn config(server: &s3s::S3Server, dir: &std::path::Path, prefix: &str) -> S3Config {
        let secret = dir.join("s3-secret");
        std::fs::write(&secret, format!("{}\n", s3s::SECRET_KEY)).unwrap();
        S3Config {
            endpoint: server.endpoint.clone(),
            bucket: s3s::BUCKET.into(),
            prefix: prefix.into(),
            access_key_id: s3s::ACCESS_KEY.into(),
            secret_access_key_file: secret,
            ..Default::default()
        }
    }

    fn server() -> Option<s3s::S3Server> {
        match s3s::start() {
            Ok(s) => Some(s),
            Err(why) => {
                eprintln!("SKIPPED the S3 store against s3s-fs: {why}");
                None
            }
        }
    }

    /// Every file under `dir`, however deep (what the server keeps on its disk).
    fn files(dir: &std::path::Path) -> Vec<PathBuf> {
        let mut out = vec![];
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files(&p));
            } else {
                out.push(p);
            }
        }
        out
    }

    #[test]
    fn the_s3_store_keeps_the_rules() {
        let Some(server) = server() else { return };
        let work = tempfile::tempdir().unwrap();
        let cfg = config(&server, work.path(), "hub/blobs");
        let spool = work.path().join("spool");
        let objects = server
            .root
            .path()
            .join(s3s::BUCKET)
            .join("hub/blobs/sha256");
        let (o1, o2, sp) = (objects.clone(), objects.clone(), spool.clone());
        let b = Backend {
            store: Box::new(S3Store::open(&cfg, &spool).unwrap()),
            file_of: Box::new(move |d| o1.join(d.hex())),
            kept: Box::new(move || count(o2.clone())),
            leftovers: Box::new(move || count(sp.clone())),
        };
        assert!(b.store.describe().contains("s3 bucket hub"));
        assert!(b.store.local_path(&Digest::of(b"")).is_none());
        kept_and_read_back(&b);
        refused_or_interrupted(&b);
        corrupt_bytes(&b);

        // Large blobs go up in parts (a multipart upload), visible only once complete.
        let big: Vec<u8> = (0..24u32 << 20).map(|i| (i % 251) as u8).collect();
        let want = Digest::of(&big);
        struct Cut<'a>(&'a [u8], usize);
        impl Read for Cut<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.1 == 0 {
                    return Err(io::Error::new(io::ErrorKind::ConnectionReset, "gone"));
                }
                let n = buf.len().min(self.1).min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                self.1 -= n;
                Ok(n)
            }
        }
        // Cut at 18 MiB: parts were sent, the upload is aborted, nothing is visible.
        assert!(matches!(
            b.store.put(&mut Cut(&big, 18 << 20), 1 << 30, Some(want)),
            Err(StoreError::Io(_))
        ));
        assert!(!b.store.has(&want));
        assert!(!objects.join(want.hex()).exists());
        // Whole, of unknown digest (spooled, then sent): kept, read back verified.
        let (d, n) = b.store.put(&mut &big[..], 1 << 30, None).unwrap();
        assert_eq!((d, n), (want, big.len() as u64));
        assert_eq!(b.store.read(&d, 1 << 30).unwrap().unwrap(), big);
        assert_eq!(std::fs::read(objects.join(d.hex())).unwrap(), big);
        assert_eq!((b.leftovers)(), 0);

        // Used from async code on a single-threaded runtime (as the registry uses it).
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let got = rt.block_on(async {
            let (d, _) = b.store.put(&mut &b"from async"[..], 1024, None).unwrap();
            b.store.read(&d, 1024).unwrap().unwrap()
        });
        assert_eq!(got, b"from async");
        drop(b);
        // What the server keeps: the objects under the prefix, nothing else (no upload left
        // half-done in its directory).
        let stray: Vec<_> = files(server.root.path())
            .into_iter()
            .filter(|p| !p.starts_with(&objects))
            // s3s-fs's own record of each object it holds (or held).
            .filter(|p| {
                !p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(".bucket-"))
            })
            .collect();
        assert!(stray.is_empty(), "left on the server: {stray:?}");
    }

    #[test]
    fn a_bad_s3_setting_is_refused_at_start_saying_which() {
        let Some(server) = server() else { return };
        let work = tempfile::tempdir().unwrap();
        let spool = work.path().join("spool");
        let good = config(&server, work.path(), "");
        let err = |cfg: &S3Config| match S3Store::open(cfg, &spool) {
            Ok(_) => panic!("accepted {cfg:?}"),
            Err(e) => e.to_string(),
        };
        let secret = work.path().join("wrong");
        std::fs::write(&secret, "not-the-secret").unwrap();
        let e = err(&S3Config {
            secret_access_key_file: secret,
            ..good.clone()
        });
        assert!(e.contains("s3 bucket hub"), "{e}");
        let e = err(&S3Config {
            bucket: "no-such-bucket".into(),
            ..good.clone()
        });
        assert!(e.contains("no-such-bucket"), "{e}");
        let e = err(&S3Config {
            endpoint: "http://192.0.2.1:9000".into(),
            ..good.clone()
        });
        assert!(e.contains("refusing plain http://"), "{e}");
        let e = err(&S3Config {
            secret_access_key_file: work.path().join("absent"),
            ..good.clone()
        });
        assert!(e.contains("secret access key file"), "{e}");
        let e = err(&S3Config {
            bucket: String::new(),
            ..good.clone()
        });
        assert!(e.contains("no bucket"), "{e}");
        // The good one opens.
        S3Store::open(&good, &spool).unwrap();
    }
}
