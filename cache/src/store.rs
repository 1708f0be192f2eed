//! The content-addressed store.
//!
//! Layout under the cache folder (the version is part of every path):
//!
//! ```text
//! objects/ab/cdef…        file bytes and tree listings, by blake3 digest, read-only
//! m/<digest>/…            materialized artifacts: a folder's files hard-linked from
//!                         objects/, or m/<digest>/<name> for a single file
//! actions/ab/<key>.json   action cache: stage key → outputs + provenance (written last)
//! locks/<key>.lock        cross-process lock per stage key
//! scratch/<key>/          a running stage's working area (checkpoints survive a crash)
//! tmp/                    temporary files, renamed into place when complete
//! roots/<id>              GC roots: the path of each lock file run against this cache
//! runs/<ms>-<pid>.json    one record per run (stages, timings, metrics)
//! stat-v1.json            the stat cache
//! ```
//!
//! Every write goes to `tmp/` (or a temp name beside its target) first, is fsynced,
//! then renamed, so a kill at any moment leaves either nothing or a whole entry.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::action::ActionEntry;
use crate::artifact::Artifact;
use crate::atomic::{cleaned_on_error, sync_dir, temp_name, write_atomic};
use crate::digest::{ContentDigest, StageKey};
use crate::hash::{hash_file, with_path, Hashed};
use crate::tree::{TreeEntry, TreeListing};

/// Subfolders created when a store is opened.
const LAYOUT: &[&str] = &["objects", "m", "actions", "locks", "scratch", "tmp", "roots", "runs"];

/// A swift cache folder.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

/// What [`Store::actions`] found.
#[derive(Debug, Default)]
pub struct ActionScan {
    /// Readable entries by key.
    pub entries: BTreeMap<StageKey, ActionEntry>,
    /// Files that are not readable entries.
    pub unreadable: Vec<PathBuf>,
}

/// Held while a key is being computed: another process asking for the same key
/// waits, then finds the finished entry.
#[derive(Debug)]
pub struct KeyLock {
    _file: File,
}

impl Store {
    /// Opens (creating if needed) the cache at `root`.
    pub fn open(root: &Path) -> io::Result<Self> {
        for sub in LAYOUT {
            fs::create_dir_all(root.join(sub)).map_err(|e| with_path(e, &root.join(sub)))?;
        }
        let root = root.canonicalize()?;
        Ok(Self { root })
    }

    /// The cache folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where an object lives.
    pub fn object_path(&self, digest: &ContentDigest) -> PathBuf {
        let hex = digest.to_hex();
        self.root.join("objects").join(&hex[..2]).join(&hex[2..])
    }

    /// Whether an object is present.
    pub fn has_object(&self, digest: &ContentDigest) -> bool {
        self.object_path(digest).is_file()
    }

    /// A fresh temporary path inside the cache.
    pub fn temp_path(&self, stem: &str) -> PathBuf {
        temp_name(&self.root.join("tmp"), stem)
    }

    /// Removes the temporaries of processes that have ended from `tmp/`
    /// (what a kill -9 mid-stage leaves; another live run's are kept), and
    /// returns their count. Every run calls it when it starts.
    pub fn remove_orphans(&self) -> std::io::Result<usize> {
        crate::atomic::remove_orphans(&self.root.join("tmp"))
    }

    /// Stores bytes as an object.
    pub fn put_bytes(&self, bytes: &[u8]) -> io::Result<ContentDigest> {
        let digest = ContentDigest::of(bytes);
        if !self.has_object(&digest) {
            cleaned_on_error(&self.temp_path("obj"), |tmp| {
                fs::write(tmp, bytes)?;
                self.commit_object(tmp, &digest)
            })?;
        }
        Ok(digest)
    }

    /// Reads an object whole.
    pub fn read_object(&self, digest: &ContentDigest) -> io::Result<Vec<u8>> {
        let path = self.object_path(digest);
        fs::read(&path).map_err(|e| with_path(e, &path))
    }

    /// Fsyncs `tmp`, makes it read-only and renames it to the object path of
    /// `digest`. Losing a race to another writer is fine: same digest, same bytes.
    fn commit_object(&self, tmp: &Path, digest: &ContentDigest) -> io::Result<()> {
        File::open(tmp)?.sync_all()?;
        fs::set_permissions(tmp, fs::Permissions::from_mode(0o444))?;
        let dest = self.object_path(digest);
        let parent = dest.parent().expect("object path has a parent");
        fs::create_dir_all(parent)?;
        if dest.exists() {
            fs::remove_file(tmp)?;
            return Ok(());
        }
        fs::rename(tmp, &dest).map_err(|e| with_path(e, &dest))?;
        sync_dir(parent)
    }

    /// Copies (reflinks where the filesystem allows) a local file whose digest
    /// is already known into the store, unless the object is there already.
    pub fn ingest_copy(&self, src: &Path, digest: &ContentDigest) -> io::Result<()> {
        if self.has_object(digest) {
            return Ok(());
        }
        cleaned_on_error(&self.temp_path("ingest"), |tmp| {
            reflink_copy::reflink_or_copy(src, tmp).map_err(|e| with_path(e, src))?;
            // Hash what was copied: a source rewritten since it was hashed must not
            // be stored under the old digest.
            if hash_file(tmp)? != *digest {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} changed while swift was reading it; run again", src.display()),
                ));
            }
            self.commit_object(tmp, digest)
        })
    }

    /// Stores a local file or folder hashed by [`crate::hash_path`], by copy; the
    /// source is left untouched. `name` names a single file.
    pub fn ingest_local(&self, src: &Path, hashed: &Hashed, name: &str) -> io::Result<Artifact> {
        match hashed {
            Hashed::File { digest, size, executable } => {
                self.ingest_copy(src, digest)?;
                Ok(Artifact::File { digest: *digest, size: *size, name: name.to_string(), executable: *executable })
            }
            Hashed::Tree(listing) => {
                for entry in listing.entries() {
                    self.ingest_copy(&src.join(&entry.path), &entry.digest)?;
                }
                self.put_tree(listing)
            }
        }
    }

    /// Stores a listing whose files are already objects.
    pub fn put_tree(&self, listing: &TreeListing) -> io::Result<Artifact> {
        let digest = self.put_bytes(listing.encode().as_bytes())?;
        Ok(Artifact::Tree { digest, size: listing.total_size(), files: listing.entries().len() as u64 })
    }

    /// Moves a stage's output (a file or a folder under its scratch area) into
    /// the store, hashing as it goes. The source is consumed.
    pub fn ingest_output(&self, path: &Path) -> io::Result<Artifact> {
        let meta = fs::metadata(path).map_err(|e| with_path(e, path))?;
        if meta.is_file() {
            let digest = self.move_in(path)?;
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("output").to_string();
            let executable = meta.permissions().mode() & 0o111 != 0;
            return Ok(Artifact::File { digest, size: meta.len(), name, executable });
        }
        let hashed = crate::hash::hash_path(path, &crate::StatCache::in_memory(), true)?;
        let crate::hash::Hashed::Tree(listing) = hashed.0 else { unreachable!("a folder hashes to a tree") };
        for entry in listing.entries() {
            if !self.has_object(&entry.digest) {
                self.take_in(&path.join(&entry.path), &entry.digest)?;
            }
        }
        self.put_tree(&listing)
    }

    fn move_in(&self, file: &Path) -> io::Result<ContentDigest> {
        let digest = hash_file(file)?;
        if !self.has_object(&digest) {
            self.take_in(file, &digest)?;
        }
        Ok(digest)
    }

    /// Moves a regular file into the store; a symbolic link's target is copied
    /// (moving the link would store a link that dangles once scratch is gone).
    fn take_in(&self, file: &Path, digest: &ContentDigest) -> io::Result<()> {
        if fs::symlink_metadata(file)?.file_type().is_symlink() {
            return self.ingest_copy(file, digest);
        }
        let tmp = self.temp_path("out");
        fs::rename(file, &tmp).map_err(|e| with_path(e, file))?;
        cleaned_on_error(&tmp, |tmp| self.commit_object(tmp, digest))
    }

    /// Reads a stored folder listing.
    pub fn read_tree(&self, digest: &ContentDigest) -> io::Result<TreeListing> {
        let text = String::from_utf8(self.read_object(digest)?).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        TreeListing::decode(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Where an artifact is (or will be) materialized: a folder for a tree,
    /// `m/<digest>/<name>` for a file.
    pub fn materialized_path(&self, artifact: &Artifact) -> PathBuf {
        let dir = self.root.join("m").join(artifact.digest().to_hex());
        match artifact {
            Artifact::File { name, .. } => dir.join(name),
            Artifact::Tree { .. } => dir,
        }
    }

    /// Makes an artifact available as a read-only file or folder and returns its
    /// path. Files are hard links to the objects (copies if linking fails).
    pub fn materialize(&self, artifact: &Artifact) -> io::Result<PathBuf> {
        let dest = self.materialized_path(artifact);
        if dest.exists() {
            return Ok(dest);
        }
        match artifact {
            Artifact::File { digest, .. } => {
                let parent = dest.parent().expect("materialized file has a folder");
                fs::create_dir_all(parent)?;
                cleaned_on_error(&temp_name(parent, "link"), |tmp| {
                    self.link_object(digest, tmp)?;
                    fs::rename(tmp, &dest)
                })?;
            }
            Artifact::Tree { digest, .. } => {
                let listing = self.read_tree(digest)?;
                let built = cleaned_on_error(&self.temp_path("tree"), |tmp| {
                    fs::create_dir_all(tmp)?;
                    for entry in listing.entries() {
                        let target = tmp.join(&entry.path);
                        fs::create_dir_all(target.parent().expect("entry has a parent"))?;
                        self.link_object(&entry.digest, &target)?;
                    }
                    fs::rename(tmp, &dest)
                });
                match built {
                    Ok(()) => set_dirs_read_only(&dest)?,
                    Err(_) if dest.exists() => {} // another process materialized it first
                    Err(e) => return Err(with_path(e, &dest)),
                }
            }
        }
        Ok(dest)
    }

    fn link_object(&self, digest: &ContentDigest, target: &Path) -> io::Result<()> {
        let object = self.object_path(digest);
        if fs::hard_link(&object, target).is_err() {
            fs::copy(&object, target).map_err(|e| with_path(e, &object))?;
            fs::set_permissions(target, fs::Permissions::from_mode(0o444))?;
        }
        Ok(())
    }

    /// The digests of every object an artifact needs (its listing and files).
    pub fn objects_of(&self, artifact: &Artifact) -> io::Result<Vec<ContentDigest>> {
        match artifact {
            Artifact::File { digest, .. } => Ok(vec![*digest]),
            Artifact::Tree { digest, .. } => {
                let mut all = vec![*digest];
                all.extend(self.read_tree(digest)?.entries().iter().map(|e: &TreeEntry| e.digest));
                Ok(all)
            }
        }
    }

    fn action_path(&self, key: &StageKey) -> PathBuf {
        let hex = key.to_hex();
        self.root.join("actions").join(&hex[..2]).join(format!("{hex}.json"))
    }

    /// The action entry for a key, if one was recorded.
    pub fn read_action(&self, key: &StageKey) -> io::Result<Option<ActionEntry>> {
        let path = self.action_path(key);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| with_path(io::Error::other(e), &path)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(with_path(e, &path)),
        }
    }

    /// Records an action entry. Call only once every output is stored: the
    /// entry is what makes a stage count as done.
    pub fn write_action(&self, entry: &ActionEntry) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(entry).map_err(io::Error::other)?;
        write_atomic(&self.action_path(&entry.key), &bytes)
    }

    /// Removes an action entry (used when its objects are found corrupt).
    pub fn remove_action(&self, key: &StageKey) -> io::Result<()> {
        match fs::remove_file(self.action_path(key)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every recorded action entry, plus the files under `actions/` that are not
    /// readable entries (torn or foreign files, stray temporary files).
    pub fn actions(&self) -> io::Result<ActionScan> {
        let mut scan = ActionScan::default();
        for shard in read_dir_sorted(&self.root.join("actions"))? {
            for file in read_dir_sorted(&shard)? {
                let key = file.file_stem().and_then(|s| s.to_str()).and_then(|hex| hex.parse::<StageKey>().ok());
                let entry = key.and_then(|key| self.read_action(&key).ok().flatten().filter(|e| e.key == key));
                match entry {
                    Some(entry) => {
                        scan.entries.insert(entry.key, entry);
                    }
                    None => scan.unreadable.push(file),
                }
            }
        }
        Ok(scan)
    }

    /// Blocks until this process holds the lock for `key`. Released on drop,
    /// and by the OS if the process dies.
    pub fn lock_key(&self, key: &StageKey) -> io::Result<KeyLock> {
        let file = open_lock_file(&self.root.join("locks").join(format!("{}.lock", key.to_hex())))?;
        file.lock()?;
        Ok(KeyLock { _file: file })
    }

    /// Held (shared) by every command that reads or writes entries; `gc` and
    /// `cache verify` take it exclusively ([`Store::maintenance_guard`]) so they
    /// never delete what a running pipeline is producing or reading.
    pub fn run_guard(&self) -> io::Result<File> {
        let file = open_lock_file(&self.root.join("gc.lock"))?;
        file.lock_shared()?;
        Ok(file)
    }

    /// [`Store::run_guard`] for commands that only read (`status`, `show`,
    /// `generate`), which also work on a cache they cannot write: there the
    /// lock file is opened read-only (a shared lock needs no write access),
    /// and where it does not exist and cannot be made, no lock is taken —
    /// this user cannot run `gc` on such a cache either.
    pub fn read_guard(&self) -> io::Result<Option<File>> {
        match self.run_guard() {
            Ok(file) => Ok(Some(file)),
            Err(e) if matches!(e.kind(), io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem) => {
                match File::open(self.root.join("gc.lock")) {
                    Ok(file) => {
                        file.lock_shared()?;
                        Ok(Some(file))
                    }
                    Err(_) => Ok(None),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// The exclusive side of [`Store::run_guard`]; `None` while a run holds the cache.
    pub fn maintenance_guard(&self) -> io::Result<Option<File>> {
        let file = open_lock_file(&self.root.join("gc.lock"))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(file)),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }

    /// A lock for read-modify-write of one manifest's lock file, so concurrent
    /// runs of the same manifest merge their updates instead of losing one.
    pub fn lock_file_guard(&self, lock_file: &Path) -> io::Result<File> {
        let id = blake3::hash(lock_file.to_string_lossy().as_bytes()).to_hex();
        let file = open_lock_file(&self.root.join("locks").join(format!("lockfile-{}.lock", &id[..32])))?;
        file.lock()?;
        Ok(file)
    }

    /// This cache's stat cache (`stat-v1.json`).
    pub fn stat_cache(&self) -> crate::StatCache {
        crate::StatCache::load(self.root.join("stat-v1.json"))
    }

    /// The scratch area of a stage key (survives crashes, for resumable stages).
    pub fn scratch_dir(&self, key: &StageKey) -> PathBuf {
        self.root.join("scratch").join(key.to_hex())
    }

    /// Bytes free to this user on the filesystem holding the cache, if known.
    pub fn free_bytes(&self) -> Option<u64> {
        free_bytes(&self.root)
    }
}

/// Bytes free to an unprivileged user on the filesystem holding `path`
/// (`statvfs`: available blocks × fragment size).
pub fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c_path` is a NUL-terminated string and `stat` is a writable
    // statvfs that the call fills in when it returns 0.
    if unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it initialized `stat`.
    let stat = unsafe { stat.assume_init() };
    Some((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

fn open_lock_file(path: &Path) -> io::Result<File> {
    File::options().create(true).truncate(false).write(true).open(path).map_err(|e| with_path(e, path))
}

/// Lists a folder's entries sorted by name (empty if it does not exist).
pub fn read_dir_sorted(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut paths = match fs::read_dir(dir) {
        Ok(iter) => iter.map(|e| e.map(|e| e.path())).collect::<Result<Vec<_>, _>>()?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(with_path(e, dir)),
    };
    paths.sort();
    Ok(paths)
}

fn set_dirs_read_only(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            set_dirs_read_only(&entry.path())?;
        }
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o555))
}

/// Removes a file or a folder, read-only ones included.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        return fs::remove_file(path);
    }
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    for entry in fs::read_dir(path)? {
        remove_tree(&entry?.path())?;
    }
    fs::remove_dir(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space_is_read_from_the_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path()).unwrap();
        assert!(free > 0);
        assert_eq!(free_bytes(&dir.path().join("missing")), None);
    }

    #[test]
    fn object_path_layout_is_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let digest = ContentDigest::of(b"hello");
        let rel = store.object_path(&digest).strip_prefix(store.root()).unwrap().to_path_buf();
        assert_eq!(rel, PathBuf::from("objects/ea/8f163db38682925e4491c5e58d4bb3506ef8c14eb78a86e908c5624a67200f"));
    }

    #[test]
    fn folder_ingest_materializes_read_only_with_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("cache")).unwrap();
        let src = dir.path().join("model");
        fs::create_dir_all(src.join("sub")).unwrap();
        fs::write(src.join("config.json"), b"{}").unwrap();
        fs::write(src.join("sub/w.bin"), vec![7u8; 5000]).unwrap();
        let (hashed, _) = crate::hash::hash_path(&src, &crate::StatCache::in_memory(), false).unwrap();
        let artifact = store.ingest_local(&src, &hashed, "model").unwrap();
        let out = store.materialize(&artifact).unwrap();
        assert_eq!(fs::read(out.join("config.json")).unwrap(), b"{}");
        assert_eq!(fs::read(out.join("sub/w.bin")).unwrap(), vec![7u8; 5000]);
        assert!(fs::metadata(out.join("config.json")).unwrap().permissions().readonly());
        assert_eq!(store.materialize(&artifact).unwrap(), out);
        assert_eq!(store.objects_of(&artifact).unwrap().len(), 3);
    }

    #[test]
    fn output_ingest_moves_files_in() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("cache")).unwrap();
        let out = dir.path().join("result.txt");
        fs::write(&out, b"result").unwrap();
        let artifact = store.ingest_output(&out).unwrap();
        assert!(!out.exists());
        assert_eq!(artifact.digest(), ContentDigest::of(b"result"));
        let path = store.materialize(&artifact).unwrap();
        assert!(path.ends_with("result.txt"));
        remove_tree(&store.root().join("m")).unwrap();
        assert!(!path.exists());
    }
}
