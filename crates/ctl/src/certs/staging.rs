//! Certificate files written atomically: `fleetctl certs` never leaves a
//! half-written CA or a key readable by others.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail};

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Secret {
    Yes,
    No,
}

/// Files written next to their destination under a temporary name, renamed
/// into place by `commit`. Temporary files left when dropped are removed.
#[derive(Default)]
pub(super) struct Staging {
    files: Vec<(PathBuf, PathBuf)>,
}

impl Staging {
    pub(super) fn add(&mut self, dest: &Path, contents: &[u8], secret: Secret) -> anyhow::Result<()> {
        let file_name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = dest.with_file_name(format!(".{file_name}.{}.tmp", std::process::id()));
        let fail = |e: std::io::Error| anyhow!("cannot write {}: {e}; check that the directory exists and is writable", dest.display());
        // A leftover from a crashed run could have other permissions.
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(fail(e)),
            _ => {}
        }
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            // Keys are never readable by others, not even briefly.
            options.mode(if secret == Secret::Yes { 0o600 } else { 0o644 });
        }
        let mut file = options.open(&tmp).map_err(fail)?;
        self.files.push((tmp, dest.to_path_buf()));
        file.write_all(contents).map_err(fail)?;
        #[cfg(unix)]
        if secret == Secret::Yes {
            use std::os::unix::fs::PermissionsExt as _;
            // Exactly 0600, whatever the umask made of the mode above.
            file.set_permissions(fs::Permissions::from_mode(0o600)).map_err(fail)?;
        }
        file.sync_all().map_err(fail)?;
        Ok(())
    }

    /// Rename every file into place, in the order added.
    pub(super) fn commit(mut self) -> anyhow::Result<()> {
        let files = std::mem::take(&mut self.files);
        for (i, (tmp, dest)) in files.iter().enumerate() {
            if let Err(e) = fs::rename(tmp, dest) {
                for (tmp, _) in &files[i..] {
                    let _ = fs::remove_file(tmp);
                }
                bail!("cannot write {}: {e}; check that the directory is writable", dest.display());
            }
        }
        // Make the renames durable; not every platform can sync a directory.
        let dirs: std::collections::BTreeSet<&Path> = files.iter().filter_map(|(_, dest)| dest.parent()).collect();
        for dir in dirs {
            let _ = fs::File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        for (tmp, _) in &self.files {
            let _ = fs::remove_file(tmp);
        }
    }
}
