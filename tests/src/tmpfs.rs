//! A tmpfs of a set size: a disk that fills up, and gets room again, on demand. Mounting needs
//! root (the test command runs as root, as CI does); unmounted when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A mounted tmpfs; lazily unmounted and removed when dropped.
#[derive(Debug)]
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount` reads it: `2m`, `64m`) on a fresh directory.
    pub fn mount(size: &str) -> Self {
        let path = crate::scratch_dir("tmpfs");
        let tmpfs = Tmpfs { path };
        tmpfs.mount_with(&format!("size={size}"), "mount a tmpfs (the tests run as root)");
        tmpfs
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Gives the file system `size` in all, keeping what it holds.
    pub fn resize(&self, size: &str) {
        self.mount_with(&format!("remount,size={size}"), "resize the tmpfs");
    }

    fn mount_with(&self, options: &str, what: &str) {
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(&self.path)
            .status()
            .unwrap_or_else(|e| panic!("cannot {what}: {e}"));
        assert!(status.success(), "cannot {what}: mount -o {options} exited with {status}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
