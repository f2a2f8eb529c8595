//! One run per output folder. A job's folder is locked through `<folder>.lock` beside it,
//! with an advisory lock of the operating system (`flock`, also honoured over NFSv4): the
//! kernel releases it when its process ends, however it ends, so a lock left by a killed run
//! is simply free again — its file still names the run that died, which we report as stale.
//! The file is never removed (removing it would let two runs lock two different files).

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::progress::log;

/// Who holds a folder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    pub host: String,
    pub started: String,
}

impl Holder {
    fn this_process() -> Self {
        Holder {
            pid: std::process::id(),
            host: hostname(),
            started: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        }
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} on {}, since {}", self.pid, self.host, self.started)
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match ok {
        true => String::from_utf8_lossy(&buf[..end]).into_owned(),
        false => "unknown host".into(),
    }
}

/// The lock file of `dir`: `<dir>.lock` beside it.
pub fn lock_path(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    dir.with_file_name(name)
}

/// An exclusive hold on an output folder, released when dropped.
#[derive(Debug)]
pub struct FolderLock {
    file: File,
}

fn read_holder(file: &mut File) -> Option<Holder> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut text).ok()?;
    serde_json::from_str(&text).ok()
}

/// Takes `dir`'s lock: at once, or failing with the holder's name; with `wait`, once the
/// holder is done.
pub fn lock_folder(dir: &Path, wait: bool) -> Result<FolderLock> {
    let path = lock_path(dir);
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("{}: cannot create", parent.display()))?;
    }
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("{}: cannot open", path.display()))?;
    match file.try_lock() {
        Ok(()) => {
            if let Some(stale) = read_holder(&mut file) {
                log(format!(
                    "{}: a run that ended without releasing it ({stale}) left it; taking it over",
                    path.display()
                ));
            }
        }
        Err(TryLockError::WouldBlock) => {
            let holder = read_holder(&mut file).map_or_else(
                || "a run that has not written its name yet".into(),
                |h| h.to_string(),
            );
            if !wait {
                bail!(
                    "{} is in use by another run ({holder}); wait for it to finish, or pass --wait",
                    dir.display()
                );
            }
            log(format!(
                "{} is in use by another run ({holder}); waiting",
                dir.display()
            ));
            file.lock()
                .with_context(|| format!("{}: cannot lock", path.display()))?;
        }
        Err(TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("{}: cannot lock", path.display()));
        }
    }
    let holder = serde_json::to_string(&Holder::this_process())?;
    file.set_len(0)?;
    file.rewind()?;
    file.write_all(holder.as_bytes())?;
    file.sync_data()?;
    Ok(FolderLock { file })
}

impl Drop for FolderLock {
    fn drop(&mut self) {
        // An empty file is a lock released in order; then the kernel's lock goes.
        let _ = self.file.set_len(0);
        let _ = self.file.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_naming_the_first_then_admitted() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("out");
        let first = lock_folder(&dir, false).unwrap();
        let err = lock_folder(&dir, false).unwrap_err().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())) && err.contains("--wait"),
            "{err}"
        );
        drop(first);
        assert_eq!(
            std::fs::read_to_string(lock_path(&dir)).unwrap(),
            "",
            "released in order"
        );
        let _second = lock_folder(&dir, false).unwrap();
    }

    #[test]
    fn a_waiting_run_gets_the_lock_when_the_holder_lets_go() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("out");
        let first = lock_folder(&dir, false).unwrap();
        let waiter = {
            let dir = dir.clone();
            std::thread::spawn(move || lock_folder(&dir, true).map(|_| ()))
        };
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(
            !waiter.is_finished(),
            "the waiter must wait while the lock is held"
        );
        drop(first);
        waiter.join().unwrap().unwrap();
    }

    #[test]
    fn a_stale_lock_file_is_taken_over() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("out");
        let stale = Holder {
            pid: 999_999,
            host: "elsewhere".into(),
            started: "2026-01-01T00:00:00Z".into(),
        };
        std::fs::write(lock_path(&dir), serde_json::to_string(&stale).unwrap()).unwrap();
        let _lock = lock_folder(&dir, false).unwrap();
        let now: Holder = serde_json::from_str(&std::fs::read_to_string(lock_path(&dir)).unwrap()).unwrap();
        assert_eq!(now.pid, std::process::id());
    }
}
