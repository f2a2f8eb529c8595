//! Outputs that appear whole or not at all: written under a temporary name in the same
//! folder, then renamed.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

fn parent_of(dest: &Path) -> PathBuf {
    match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

fn file_name(dest: &Path) -> Result<String> {
    dest.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::Invalid(format!("{}: not a file or folder name", dest.display())))
}

/// Writes `bytes` to `dest` atomically.
pub fn write_file(dest: &Path, bytes: &[u8]) -> Result<()> {
    let parent = parent_of(dest);
    let name = file_name(dest)?;
    let prefix = format!(".{name}.partial-");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix);
    // Outputs are for sharing: rw-r--r-- rather than the private default of temporary files.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
    let mut tmp = builder.tempfile_in(&parent).map_err(|e| Error::io(&parent, e))?;
    tmp.write_all(bytes).map_err(|e| Error::io(tmp.path(), e))?;
    tmp.as_file().sync_all().map_err(|e| Error::io(tmp.path(), e))?;
    tmp.persist(dest).map_err(|e| Error::io(dest, e.error))?;
    Ok(())
}

/// Whether `dest` exists and is not an empty folder.
pub fn is_occupied(dest: &Path) -> bool {
    match std::fs::read_dir(dest) {
        Ok(mut entries) => entries.next().is_some(),
        Err(_) => dest.exists(),
    }
}

/// Builds a folder at `dest` atomically: `fill` writes into a fresh temporary folder beside
/// `dest`, which is renamed to `dest` only when `fill` succeeds. An existing non-empty
/// `dest` is an error unless `replace` is set; on failure nothing is left behind.
pub fn write_dir<T, E: From<Error>>(
    dest: &Path,
    replace: bool,
    fill: impl FnOnce(&Path) -> std::result::Result<T, E>,
) -> std::result::Result<T, E> {
    if is_occupied(dest) && !replace {
        return Err(Error::Invalid(format!(
            "{}: already exists and is not empty (choose another output folder or pass --force)",
            dest.display()
        ))
        .into());
    }
    let parent = parent_of(dest);
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let name = file_name(dest)?;
    let prefix = format!(".{name}.partial-");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix);
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o755));
    let tmp = builder.tempdir_in(&parent).map_err(|e| Error::io(&parent, e))?;
    let value = fill(tmp.path())?;
    if dest.exists() {
        // Move the old folder aside first so that `dest` is never half old, half new.
        let old = tempfile::Builder::new()
            .prefix(&format!(".{name}.old-"))
            .tempdir_in(&parent)
            .map_err(|e| Error::io(&parent, e))?;
        let old_path = old.path().join("old");
        std::fs::rename(dest, &old_path).map_err(|e| Error::io(dest, e))?;
        std::fs::rename(tmp.path(), dest).map_err(|e| Error::io(dest, e))?;
        drop(old);
    } else {
        std::fs::rename(tmp.path(), dest).map_err(|e| Error::io(dest, e))?;
    }
    // The temporary folder was renamed away; forget it without deleting `dest`.
    let _ = tmp.keep();
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_fill_leaves_nothing() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("out");
        let err = write_dir(&dest, false, |tmp| {
            std::fs::write(tmp.join("half"), b"x").unwrap();
            Err::<(), Error>(Error::Invalid("boom".into()))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "boom");
        assert!(!dest.exists());
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
    }

    #[test]
    fn existing_output_needs_replace() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("out");
        write_dir::<_, Error>(&dest, false, |tmp| {
            let _: () = std::fs::write(tmp.join("a"), b"1").unwrap();
            Ok(())
        })
        .unwrap();
        let err = write_dir::<_, Error>(&dest, false, |_| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("already exists"), "{err}");
        write_dir::<_, Error>(&dest, true, |tmp| {
            let _: () = std::fs::write(tmp.join("b"), b"2").unwrap();
            Ok(())
        })
        .unwrap();
        assert!(!dest.join("a").exists());
        assert_eq!(std::fs::read(dest.join("b")).unwrap(), b"2");
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn outputs_are_world_readable() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("f.json");
        write_file(&file, b"x").unwrap();
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o644
        );
        let dir = root.path().join("d");
        write_dir::<_, Error>(&dir, false, |_| Ok(())).unwrap();
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o755
        );
    }

    #[test]
    fn write_file_replaces_whole() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("f.json");
        write_file(&dest, b"one").unwrap();
        write_file(&dest, b"two").unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
    }
}
