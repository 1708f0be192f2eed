//! The stat cache: `(path, size, mtime, ctime, inode, device) → digest`, so an
//! unchanged multi-GB file is never read twice. A changed stamp (any of those
//! fields) means the file is hashed again; `--rehash` ignores the cache.
//!
//! Stored as one JSON file in the cache; updates from concurrent processes are
//! merged under a file lock and written atomically.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::atomic::write_atomic;
use crate::digest::ContentDigest;

/// What identifies one version of a file without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    inode: u64,
    device: u64,
}

impl FileStamp {
    /// The stamp of a file's metadata.
    pub fn of(meta: &fs::Metadata) -> Self {
        Self {
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
            inode: meta.ino(),
            device: meta.dev(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Entry {
    stamp: FileStamp,
    digest: ContentDigest,
}

/// The stat cache of one swift cache folder (or an in-memory one for tests).
#[derive(Debug)]
pub struct StatCache {
    file: Option<PathBuf>,
    entries: Mutex<HashMap<PathBuf, Entry>>,
    changed: Mutex<HashMap<PathBuf, Entry>>,
}

impl StatCache {
    /// Loads the stat cache stored at `file` (empty if missing or unreadable:
    /// it is only a cache).
    pub fn load(file: PathBuf) -> Self {
        let entries = fs::read(&file).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok()).unwrap_or_default();
        Self { file: Some(file), entries: Mutex::new(entries), changed: Mutex::default() }
    }

    /// A stat cache that is never saved.
    pub fn in_memory() -> Self {
        Self { file: None, entries: Mutex::default(), changed: Mutex::default() }
    }

    /// The digest recorded for `path` if its stamp is unchanged.
    pub fn get(&self, path: &Path, stamp: &FileStamp) -> Option<ContentDigest> {
        let entries = self.entries.lock().expect("stat cache lock");
        entries.get(path).filter(|e| e.stamp == *stamp).map(|e| e.digest)
    }

    /// Records a freshly computed digest.
    pub fn put(&self, path: &Path, stamp: FileStamp, digest: ContentDigest) {
        let entry = Entry { stamp, digest };
        self.entries.lock().expect("stat cache lock").insert(path.to_path_buf(), entry.clone());
        self.changed.lock().expect("stat cache lock").insert(path.to_path_buf(), entry);
    }

    /// Merges this process's new entries into the stored file, if any changed.
    pub fn save(&self) -> io::Result<()> {
        let Some(file) = &self.file else { return Ok(()) };
        let changed = std::mem::take(&mut *self.changed.lock().expect("stat cache lock"));
        if changed.is_empty() {
            return Ok(());
        }
        let lock = File::options().create(true).truncate(false).write(true).open(file.with_extension("lock"))?;
        lock.lock()?;
        let mut stored: HashMap<PathBuf, Entry> =
            fs::read(file).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok()).unwrap_or_default();
        stored.retain(|path, _| path.exists());
        stored.extend(changed);
        write_atomic(file, &serde_json::to_vec(&stored).map_err(io::Error::other)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_entries_survive_reload_and_stamp_changes_miss() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data.txt");
        fs::write(&data, b"abc").unwrap();
        let stamp = FileStamp::of(&fs::metadata(&data).unwrap());
        let store = dir.path().join("stat.json");
        let cache = StatCache::load(store.clone());
        cache.put(&data, stamp, ContentDigest::of(b"abc"));
        cache.save().unwrap();
        let reloaded = StatCache::load(store);
        assert_eq!(reloaded.get(&data, &stamp), Some(ContentDigest::of(b"abc")));
        fs::write(&data, b"abcd").unwrap();
        let new_stamp = FileStamp::of(&fs::metadata(&data).unwrap());
        assert_eq!(reloaded.get(&data, &new_stamp), None);
    }
}
