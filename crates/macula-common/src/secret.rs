//! Files that hold secrets.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

/// Writes a secret readable by this user only: the file is created with mode 0600 (never
/// readable by others, not even for a moment), and an existing file is made 0600 first.
pub fn write_secret(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let ctx = || format!("writing {}", path.display());
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        opts.mode(0o600);
        if path.exists() {
            fs::set_permissions(path, fs::Permissions::from_mode(0o600)).with_context(ctx)?;
        }
    }
    let mut f = opts.open(path).with_context(ctx)?;
    f.write_all(text.as_bytes()).with_context(ctx)?;
    Ok(())
}
