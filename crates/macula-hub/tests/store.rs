//! The filesystem blob store: blobs by digest, nothing half-visible, bounded uploads, corrupt
//! bytes never taken for the blob.

use std::io::{self, Read};

use macula_hub::{BlobStore, Digest, FsStore, StoreError};

#[test]
fn a_blob_is_kept_by_its_digest_and_read_back_verified() {
    let dir = tempfile::tempdir().unwrap();
    let s = FsStore::open(dir.path()).unwrap();
    let data = b"the bytes of a package".to_vec();
    let (d, n) = s.put(&mut &data[..], 1 << 20, None).unwrap();
    assert_eq!((d, n), (Digest::of(&data), data.len() as u64));
    assert!(s.has(&d));
    assert_eq!(s.read(&d, 1 << 20).unwrap().unwrap(), data);
    // Again: not an error, one copy.
    assert_eq!(s.put(&mut &data[..], 1 << 20, Some(d)).unwrap().0, d);
    let other = Digest::of(b"nothing");
    assert!(s.read(&other, 10).unwrap().is_none());
    assert!(s.remove(&d).unwrap());
    assert!(!s.has(&d));
}

#[test]
fn a_refused_or_interrupted_upload_leaves_nothing_visible() {
    let dir = tempfile::tempdir().unwrap();
    let s = FsStore::open(dir.path()).unwrap();
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
    // Nothing under any digest, nothing left in the temporary directory.
    assert!(!s.has(&Digest::of(&data)));
    let kept = std::fs::read_dir(dir.path().join("sha256"))
        .unwrap()
        .count();
    let tmp = std::fs::read_dir(dir.path().join("tmp")).unwrap().count();
    assert_eq!((kept, tmp), (0, 0));
}

#[test]
fn corrupt_bytes_on_disk_are_never_taken_for_the_blob() {
    let dir = tempfile::tempdir().unwrap();
    let s = FsStore::open(dir.path()).unwrap();
    let data = vec![5u8; 10_000];
    let (d, _) = s.put(&mut &data[..], 1 << 20, None).unwrap();
    // A byte flips on disk.
    let path = dir.path().join("sha256").join(d.hex());
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
