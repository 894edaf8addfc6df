//! `Secret<T>`: a value that must never reach a log, a `Debug` dump or the audit trail.

use sha2::{Digest, Sha256};

/// Wraps a secret. `Debug` prints `Secret(**redacted**)`; there is no `Display`.
/// The only way to the value is [`Secret::expose`], which is easy to grep for.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    pub fn new(value: T) -> Self {
        Self(value)
    }
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> std::fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(**redacted**)")
    }
}

/// The fingerprint under which a secret may appear in the audit trail:
/// `sha256:` + the first 16 bytes of SHA-256, hex. Credentials minted by Mayfly
/// carry ≥128 bits of entropy, so a truncated digest identifies without revealing.
pub fn fingerprint(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    format!("sha256:{}", hex::encode(&digest[..16]))
}

/// Writes a private file (keys): created with mode 0600 on Unix, never world-readable.
pub fn write_private_file(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    // `mode` applies only when the file is created: narrow an existing one too.
    restrict(&f)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Creates `path` (mode 0600) if absent and narrows an existing file to 0600, without
/// touching its content: for files other code then opens (the redb store).
pub fn create_private(path: &std::path::Path) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    restrict(&opts.open(path)?)
}

#[cfg(unix)]
fn restrict(f: &std::fs::File) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
}

#[cfg(not(unix))]
fn restrict(_f: &std::fs::File) -> std::io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_contains_the_secret() {
        let s = Secret::new("hunter2".to_string());
        let printed = format!("{s:?}");
        assert!(!printed.contains("hunter2"));
        assert_eq!(printed, "Secret(**redacted**)");
    }

    #[test]
    fn fingerprint_is_stable_and_does_not_contain_the_input() {
        let a = fingerprint(b"token-value");
        assert_eq!(a, fingerprint(b"token-value"));
        assert_ne!(a, fingerprint(b"token-valuf"));
        assert!(!a.contains("token"));
        assert_eq!(a.len(), "sha256:".len() + 32);
    }

    #[cfg(unix)]
    #[test]
    fn a_private_file_is_narrowed_to_0600_even_if_it_existed_wider() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("key.pem");
        std::fs::write(&path, "old").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        write_private_file(&path, b"new").expect("write");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read(&path).expect("read"), b"new");
    }
}
