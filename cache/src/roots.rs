//! GC roots: the lock files a cache serves, and the keys this machine last
//! settled for each of their stages.
//!
//! `roots/ID` (ID: the first 32 hex digits of blake3 of the lock file's path)
//! holds the lock file's path; every key the lock records is live. A lock
//! records only the keys that are the same on every machine (see
//! [`crate::lockfile`]), so `roots/ID.keys` keeps, per stage name, the key
//! this cache last ran or found for that stage: the machine's own pins,
//! which `swift gc` keeps and `swift status` compares against.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::atomic::write_atomic;
use crate::digest::StageKey;
use crate::store::Store;

/// A lock file's keys on this machine, by stage name.
pub type MachineKeys = BTreeMap<String, StageKey>;

impl Store {
    /// Registers a lock file as a GC root of this cache.
    pub fn register_root(&self, lock_file: &Path) -> io::Result<()> {
        let text = lock_file.to_string_lossy();
        let path = self.root_file(lock_file);
        if fs::read_to_string(&path).ok().as_deref() == Some(&*text) {
            return Ok(());
        }
        write_atomic(&path, text.as_bytes())
    }

    /// The keys this cache last settled for the stages of `lock_file`'s
    /// pipeline (empty when none are recorded).
    pub fn machine_keys(&self, lock_file: &Path) -> io::Result<MachineKeys> {
        read_keys(&self.root_file(lock_file).with_extension("keys"))
    }

    /// Records the keys this cache settled for `lock_file`'s stages.
    pub fn write_machine_keys(&self, lock_file: &Path, keys: &MachineKeys) -> io::Result<()> {
        let path = self.root_file(lock_file).with_extension("keys");
        let text = serde_json::to_string_pretty(keys).map_err(io::Error::other)?;
        if fs::read_to_string(&path).ok().as_deref() == Some(text.as_str()) {
            return Ok(());
        }
        write_atomic(&path, text.as_bytes())
    }

    fn root_file(&self, lock_file: &Path) -> PathBuf {
        let id = blake3::hash(lock_file.to_string_lossy().as_bytes()).to_hex();
        self.root().join("roots").join(&id[..32])
    }
}

/// Reads a `roots/ID.keys` file; a missing one holds no keys.
pub(crate) fn read_keys(path: &Path) -> io::Result<MachineKeys> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: not a key list: {e}", path.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(MachineKeys::new()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_keys_round_trip_per_lock_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (a, b) = (dir.path().join("a.lock"), dir.path().join("b.lock"));
        assert!(store.machine_keys(&a).unwrap().is_empty());
        let keys = MachineKeys::from([("tune".to_string(), StageKey::of(b"k"))]);
        store.write_machine_keys(&a, &keys).unwrap();
        assert_eq!(store.machine_keys(&a).unwrap(), keys);
        assert!(store.machine_keys(&b).unwrap().is_empty());
    }
}
