//! Crash-safe file writes: write to a temporary file beside the target, fsync,
//! rename over the target, fsync the directory. A reader sees the old file or the
//! new one, never a torn one, whatever moment the process is killed.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A temporary name in `dir` unique to this process and call.
pub fn temp_name(dir: &Path, stem: &str) -> std::path::PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".tmp-{stem}-{}-{n}", std::process::id()))
}

/// The process id in a name [`temp_name`] made (`.tmp-{stem}-{pid}-{n}`).
pub fn temp_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(".tmp-")?;
    let mut parts = rest.rsplitn(3, '-');
    parts.next()?.parse::<u64>().ok()?;
    let pid = parts.next()?.parse::<u32>().ok()?;
    parts.next().filter(|stem| !stem.is_empty())?;
    Some(pid)
}

/// Whether process `pid` is running (on Linux, where `/proc` tells; elsewhere
/// every process is taken to be running, so nothing is removed).
fn running(pid: u32) -> bool {
    !cfg!(target_os = "linux") || Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes the temporaries [`temp_name`] made in `dir` (files or folders)
/// whose process has ended — what a kill -9 mid-write leaves — and returns
/// their count. Another live process's temporaries are left alone; a
/// missing `dir` has none.
pub fn remove_orphans(dir: &Path) -> io::Result<usize> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        let Some(pid) = entry.file_name().to_str().and_then(temp_owner) else { continue };
        if pid == std::process::id() || running(pid) {
            continue;
        }
        let path = entry.path();
        let result = if entry.file_type()?.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
        match result {
            Ok(()) => removed += 1,
            // Removed meanwhile by another run's cleanup.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// Writes `bytes` to `path` atomically (temp + fsync + rename + directory fsync).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let stem = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    cleaned_on_error(&temp_name(dir, stem), |tmp| {
        let mut file = File::create(tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(tmp, path)?;
        sync_dir(dir)
    })
}

/// Runs `write` on the temporary path `tmp` and, should it fail, removes
/// whatever it left there (a file or a folder): a write that fails half-way
/// — on a full disk, say — leaves nothing behind to keep the disk full.
pub fn cleaned_on_error<T>(tmp: &Path, write: impl FnOnce(&Path) -> io::Result<T>) -> io::Result<T> {
    let result = write(tmp);
    if result.is_err() {
        let _ = crate::store::remove_tree(tmp);
    }
    result
}

/// Fsyncs a directory so a rename inside it survives a power cut.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_content_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/entry.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path().join("sub")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("entry.json")]);
    }

    #[test]
    fn orphaned_temporaries_of_ended_processes_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(temp_owner(".tmp-out-abc-1234-7"), Some(1234));
        assert_eq!(temp_owner(".tmp-1234-7"), None);
        assert_eq!(temp_owner("model.safetensors"), None);
        // A process id that no process has (above Linux's pid_max of 2^22).
        let dead = dir.path().join(".tmp-export-4294967-0");
        fs::create_dir_all(dead.join("merged")).unwrap();
        fs::write(dir.path().join(".tmp-out-4294967-1"), b"partial").unwrap();
        let mine = temp_name(dir.path(), "out");
        fs::write(&mine, b"in progress").unwrap();
        fs::write(dir.path().join("kept.txt"), b"not a temporary").unwrap();
        let expected = if cfg!(target_os = "linux") { 2 } else { 0 };
        assert_eq!(remove_orphans(dir.path()).unwrap(), expected);
        assert!(mine.exists() && dir.path().join("kept.txt").exists());
        assert_eq!(remove_orphans(&dir.path().join("missing")).unwrap(), 0);
    }
}
