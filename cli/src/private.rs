//! A directory only this user can read, removed when dropped: where `unbusy up` writes the
//! Envoy configuration it renders.
//!
//! `$TMPDIR` is shared with every other user. A fixed name there (`$TMPDIR/unbusy-up/`) can be
//! created first by someone else, as a directory they can read or as a symlink to a place of
//! their choosing; so the directory gets a fresh random name and is made with `mkdir`, which
//! fails on anything already there (a directory, a file, a symlink) instead of reusing or
//! following it, and files in it are created with `O_CREAT | O_EXCL | O_NOFOLLOW`.

use std::fs::{DirBuilder, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A private directory (mode 0700), removed with everything in it when dropped.
#[derive(Debug)]
pub struct PrivateDir {
    path: PathBuf,
}

/// 16 random hex digits (from `/dev/urandom`; a time-seeded generator if it cannot be read).
fn random_suffix() -> String {
    let mut bytes = [0u8; 8];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if read.is_err() {
        bytes = fastrand::u64(..).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl PrivateDir {
    /// A new directory under `parent` named `<prefix><16 random hex digits>`.
    pub fn create(parent: &Path, prefix: &str) -> io::Result<Self> {
        Self::create_named(
            parent,
            (0..16).map(|_| format!("{prefix}{}", random_suffix())),
        )
    }

    /// A new directory under `parent` with the first of `names` that nothing holds yet. A name
    /// already taken (by anything, whoever made it) is skipped, never reused or followed.
    pub fn create_named(
        parent: &Path,
        names: impl IntoIterator<Item = String>,
    ) -> io::Result<Self> {
        let mut last = io::Error::new(io::ErrorKind::AlreadyExists, "no name left to try");
        for name in names {
            let path = parent.join(name);
            match DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => {
                    // (The umask can only have removed bits; this makes it exactly 0700.)
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))?;
                    return Ok(Self { path });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = e,
                Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
            }
        }
        Err(last)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the new file `name` (mode 0600) in the directory and returns its path. Anything
    /// already there, a symlink included, is an error: nothing is overwritten or followed.
    pub fn write(&self, name: &str, bytes: &[u8]) -> io::Result<PathBuf> {
        let path = self.path.join(name);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        Ok(path)
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        // (`remove_dir_all` removes symlinks inside, never what they point to.)
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("unbusy-private-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn names_already_taken_are_skipped_never_reused_or_followed() {
        let parent = scratch("taken");
        let elsewhere = scratch("elsewhere");
        std::fs::create_dir(parent.join("a")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, parent.join("b")).unwrap();
        let dir = PrivateDir::create_named(&parent, ["a", "b", "c"].map(String::from)).unwrap();
        assert_eq!(dir.path(), parent.join("c"));
        let file = dir.write("f", b"x").unwrap();
        assert_eq!(std::fs::metadata(dir.path()).unwrap().mode() & 0o777, 0o700);
        assert_eq!(std::fs::metadata(&file).unwrap().mode() & 0o777, 0o600);
        assert!(
            dir.write("f", b"again").is_err(),
            "an existing file was overwritten"
        );
        std::os::unix::fs::symlink(elsewhere.join("target"), dir.path().join("link")).unwrap();
        assert!(dir.write("link", b"x").is_err(), "a symlink was followed");
        assert!(std::fs::read_dir(&elsewhere).unwrap().next().is_none());
        drop(dir);
        assert!(!parent.join("c").exists());
        assert!(parent.join("a").is_dir() && parent.join("b").exists());
        let all_taken = PrivateDir::create_named(&parent, ["a", "b"].map(String::from));
        assert!(all_taken.is_err());
        std::fs::remove_dir_all(&parent).unwrap();
        std::fs::remove_dir_all(&elsewhere).unwrap();
    }
}
