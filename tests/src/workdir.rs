//! Per-instance temporary directories that outlive a failed test.
//!
//! A [`Workdir`] holds one process's data and log files. It is removed on
//! drop, except when the thread is panicking (a failed test), when
//! `RACKSCALE_KEEP_LOGS=1`, or when [`Workdir::keep`] was called (a start
//! that failed); then its path is printed to stderr so the logs can be read.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tempfile::TempDir;

use crate::bins::keep_logs_requested;

/// A temporary directory removed on success and kept on failure.
#[derive(Debug)]
pub struct Workdir {
    dir: Option<TempDir>,
    path: PathBuf,
    keep: bool,
}

impl Workdir {
    /// Creates a fresh directory named `rackscale-<label>-XXXX` under the
    /// system temp dir.
    pub fn new(label: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("rackscale-{label}-"))
            .tempdir()
            .context("creating a temporary work directory")?;
        let path = dir.path().to_path_buf();
        Ok(Self {
            dir: Some(dir),
            path,
            keep: false,
        })
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Marks the directory to be kept on drop, whatever happens.
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// Whether drop will keep the directory if nothing else changes.
    pub fn will_keep(&self) -> bool {
        self.keep || std::thread::panicking() || keep_logs_requested()
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        let Some(dir) = self.dir.take() else { return };
        if self.will_keep() {
            let path = dir.keep();
            eprintln!(
                "[harness] kept work directory (logs, data): {}",
                path.display()
            );
        }
        // Otherwise dropping `dir` removes it.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_on_success() {
        let wd = Workdir::new("unit").unwrap();
        let path = wd.path().to_path_buf();
        assert!(path.is_dir());
        assert!(
            path.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("rackscale-unit-")
        );
        drop(wd);
        assert!(!path.exists() || keep_logs_requested());
    }

    #[test]
    fn kept_when_asked() {
        let mut wd = Workdir::new("unit").unwrap();
        wd.keep();
        let path = wd.path().to_path_buf();
        drop(wd);
        assert!(path.is_dir());
        std::fs::remove_dir_all(path).unwrap();
    }

    #[test]
    fn kept_when_panicking() {
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            let wd = Workdir::new("unit").unwrap();
            tx.send(wd.path().to_path_buf()).unwrap();
            panic!("simulated test failure");
        });
        assert!(handle.join().is_err());
        let path = rx.recv().unwrap();
        assert!(path.is_dir(), "work dir of a panicking test must be kept");
        std::fs::remove_dir_all(path).unwrap();
    }
}
