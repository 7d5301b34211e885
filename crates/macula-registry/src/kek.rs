//! Secrets at rest: the realm authorities' signing keys are stored in the database sealed
//! (ChaCha20-Poly1305) under a key-encryption key (KEK) that lives outside it, so that a copy
//! of the database made apart from the KEK (a backup, a replica, a PostgreSQL dump) mints no
//! API keys. It does not protect the registry host itself, whose config directory holds the KEK
//! by default (and the node's authority files): that directory is the operator's secret.
//!
//! The KEK is 32 random bytes, written as 64 hex digits. It comes from the environment variable
//! `MACULA_REGISTRY_KEK` when set (for a secret manager or a KMS-style hook that injects it),
//! otherwise from `registry.kek_file` (default `registry.kek` in the config directory), which is
//! created with mode 0600 the first time. A sealed secret is bound to its realm's name (the
//! AEAD's associated data): it cannot be moved to another realm's row.
//!
//! Stored form: `kek1:` followed by the hex of a 12-byte random nonce and the ciphertext with its
//! tag. A value of 64 hex digits is a secret from before sealing; [`Registry::new`] seals every
//! such row on start.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

/// The environment variable that, when set, holds the KEK (64 hex digits).
pub const KEK_ENV: &str = "MACULA_REGISTRY_KEK";

const PREFIX: &str = "kek1:";

/// Where the KEK comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KekSource {
    /// A file (relative paths: to the config directory), created with mode 0600 when missing.
    File(PathBuf),
    /// The key itself, 64 hex digits (from [`KEK_ENV`]).
    Hex(String),
}

impl Default for KekSource {
    fn default() -> Self {
        KekSource::File(PathBuf::from("registry.kek"))
    }
}

/// The key-encryption key.
pub struct Kek {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek(..)")
    }
}

fn parse(text: &str, from: &str) -> Result<Kek> {
    let bytes = hex::decode(text.trim())
        .ok()
        .filter(|b| b.len() == 32)
        .ok_or_else(|| anyhow!("{from} must hold 64 hex digits (32 random bytes)"))?;
    let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes)
        .map_err(|_| anyhow!("{from}: not a usable key"))?;
    Ok(Kek {
        key: LessSafeKey::new(key),
        rng: SystemRandom::new(),
    })
}

impl Kek {
    /// Loads the KEK from `source`; a missing file is created with a new random key (0600).
    pub fn load(source: &KekSource, config_dir: &Path) -> Result<Kek> {
        match source {
            KekSource::Hex(text) => parse(text, KEK_ENV),
            KekSource::File(path) => {
                let path = config_dir.join(path);
                if !path.exists() {
                    let mut bytes = [0u8; 32];
                    SystemRandom::new()
                        .fill(&mut bytes)
                        .map_err(|_| anyhow!("the system's random source failed"))?;
                    // `create_new`: of two registries starting at once, one writes the key and
                    // the other reads it; neither overwrites a key rows were sealed with.
                    let mut f = std::fs::OpenOptions::new();
                    f.write(true).create_new(true);
                    #[cfg(unix)]
                    std::os::unix::fs::OpenOptionsExt::mode(&mut f, 0o600);
                    match f.open(&path) {
                        Ok(mut file) => {
                            std::io::Write::write_all(&mut file, hex::encode(bytes).as_bytes())
                                .with_context(|| {
                                    format!("writing the registry's KEK {}", path.display())
                                })?
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                        Err(e) => {
                            return Err(e).with_context(|| {
                                format!("creating the registry's KEK {}", path.display())
                            })
                        }
                    }
                    tracing::info!(
                        "created {}: the key that encrypts realm secrets in the database; back it up apart from the database",
                        path.display()
                    );
                }
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading the registry's KEK {}", path.display()))?;
                parse(&text, &path.display().to_string())
            }
        }
    }

    /// Seals `secret` (hex text) for the realm `name`.
    pub fn seal(&self, name: &str, secret: &str) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        // SystemRandom fails only when the OS has no entropy source; nothing sane to do then.
        self.rng
            .fill(&mut nonce)
            .expect("the system's random source failed");
        let mut buf = secret.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(name)),
                &mut buf,
            )
            .expect("ChaCha20-Poly1305 seals any input under 256 GiB");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        format!("{PREFIX}{}", hex::encode(out))
    }

    /// Opens what [`Kek::seal`] wrote for `name`.
    pub fn open(&self, name: &str, stored: &str) -> Result<String> {
        let Some(body) = stored.strip_prefix(PREFIX) else {
            bail!("the authority secret of {name} is not sealed");
        };
        let bytes =
            hex::decode(body).map_err(|_| anyhow!("the sealed secret of {name} is damaged"))?;
        if bytes.len() < NONCE_LEN {
            bail!("the sealed secret of {name} is damaged");
        }
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| anyhow!("the sealed secret of {name} is damaged"))?;
        let mut buf = sealed.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(aad(name)), &mut buf)
            .map_err(|_| {
                anyhow!(
                    "the KEK does not open the secret of realm {name}: this is not the key the database was written with \
                     (set {KEK_ENV} or registry.kek_file to that key)"
                )
            })?;
        String::from_utf8(plain.to_vec())
            .map_err(|_| anyhow!("the sealed secret of {name} is damaged"))
    }

    /// Whether `stored` is a secret from before sealing (64 hex digits).
    pub fn is_plain(stored: &str) -> bool {
        stored.len() == 64 && stored.bytes().all(|b| b.is_ascii_hexdigit())
    }
}

fn aad(name: &str) -> Vec<u8> {
    let mut a = b"macula realm authority\0".to_vec();
    a.extend_from_slice(name.as_bytes());
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kek() -> Kek {
        parse(&"ab".repeat(32), "test").unwrap()
    }

    #[test]
    fn a_sealed_secret_opens_only_for_its_realm_and_key() {
        let k = kek();
        let secret = "11".repeat(32);
        let sealed = k.seal("com.acme", &secret);
        assert!(!sealed.contains(&secret));
        assert!(!Kek::is_plain(&sealed));
        assert_eq!(k.open("com.acme", &sealed).unwrap(), secret);
        // Two seals of one secret differ (fresh nonces).
        assert_ne!(sealed, k.seal("com.acme", &secret));
        // Moved to another realm's row: refused.
        assert!(k.open("com.other", &sealed).is_err());
        // Another KEK: refused, saying what to do.
        let other = parse(&"cd".repeat(32), "test").unwrap();
        let e = other.open("com.acme", &sealed).unwrap_err().to_string();
        assert!(e.contains(KEK_ENV), "{e}");
        // Any flipped digit: refused.
        let mut bad = sealed.clone().into_bytes();
        let last = bad.len() - 1;
        bad[last] = if bad[last] == b'0' { b'1' } else { b'0' };
        assert!(k
            .open("com.acme", &String::from_utf8(bad).unwrap())
            .is_err());
        assert!(k.open("com.acme", &secret).is_err());
    }

    #[test]
    fn a_kek_must_be_32_bytes_of_hex() {
        assert!(parse("abcd", "x").is_err());
        assert!(parse(&"zz".repeat(32), "x").is_err());
        assert!(parse(&format!("{}\n", "ab".repeat(32)), "x").is_ok());
    }

    #[test]
    fn a_missing_kek_file_is_created_private_and_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let src = KekSource::default();
        let a = Kek::load(&src, dir.path()).unwrap();
        let sealed = a.seal("r", "s");
        let b = Kek::load(&src, dir.path()).unwrap();
        assert_eq!(b.open("r", &sealed).unwrap(), "s");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("registry.kek"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
