//! Hashing files and folders: blake3 over memory maps, multi-threaded for large
//! files (rayon), several files in parallel, with the stat cache in front so an
//! unchanged file is never read again.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::digest::ContentDigest;
use crate::statcache::{FileStamp, StatCache};
use crate::tree::{TreeEntry, TreeListing};

/// Files at least this large are hashed with several threads.
const PARALLEL_THRESHOLD: u64 = 1 << 20;

/// Hashes one file's bytes.
pub fn hash_file(path: &Path) -> io::Result<ContentDigest> {
    let len = fs::metadata(path)?.len();
    let mut hasher = blake3::Hasher::new();
    if len >= PARALLEL_THRESHOLD {
        hasher.update_mmap_rayon(path)?;
    } else {
        hasher.update_mmap(path)?;
    }
    Ok(ContentDigest::from_hash(hasher.finalize()))
}

/// What hashing a local source found: one file, or a folder's listing.
#[derive(Clone, Debug)]
pub enum Hashed {
    /// A single file.
    File {
        /// Digest of its bytes.
        digest: ContentDigest,
        /// Its size.
        size: u64,
        /// Whether an execute bit is set.
        executable: bool,
    },
    /// A folder, as its sorted listing.
    Tree(TreeListing),
}

/// Counts of how a hashing pass went, for benchmarks and logs.
#[derive(Clone, Copy, Debug, Default)]
pub struct HashStats {
    /// Bytes actually read and hashed.
    pub bytes_hashed: u64,
    /// Files whose digest came from the stat cache.
    pub stat_hits: u64,
}

/// Hashes a file or folder, consulting `stats` unless `rehash` is set.
/// Symbolic links are followed (the Hugging Face cache links snapshots to blobs).
pub fn hash_path(path: &Path, stats: &StatCache, rehash: bool) -> io::Result<(Hashed, HashStats)> {
    let meta = fs::metadata(path).map_err(|e| with_path(e, path))?;
    if meta.is_file() {
        let (digest, hashed) = digest_with_cache(path, &meta, stats, rehash)?;
        let executable = meta.permissions().mode() & 0o111 != 0;
        let summary = HashStats { bytes_hashed: if hashed { meta.len() } else { 0 }, stat_hits: u64::from(!hashed) };
        return Ok((Hashed::File { digest, size: meta.len(), executable }, summary));
    }
    if let Some(what) = special_file(&meta) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is {what}, not a file or a folder: give a regular file or a folder", path.display()),
        ));
    }
    let mut files = Vec::new();
    walk(path, path, &mut files)?;
    let results: Vec<io::Result<(TreeEntry, bool)>> = files
        .into_par_iter()
        .map(|(rel, abs, meta)| {
            let (digest, hashed) = digest_with_cache(&abs, &meta, stats, rehash)?;
            let executable = meta.permissions().mode() & 0o111 != 0;
            Ok((TreeEntry { path: rel, size: meta.len(), executable, digest }, hashed))
        })
        .collect();
    let mut entries = Vec::with_capacity(results.len());
    let mut summary = HashStats::default();
    for result in results {
        let (entry, hashed) = result?;
        if hashed {
            summary.bytes_hashed += entry.size;
        } else {
            summary.stat_hits += 1;
        }
        entries.push(entry);
    }
    Ok((Hashed::Tree(TreeListing::new(entries)), summary))
}

fn digest_with_cache(path: &Path, meta: &fs::Metadata, stats: &StatCache, rehash: bool) -> io::Result<(ContentDigest, bool)> {
    let stamp = FileStamp::of(meta);
    if !rehash {
        if let Some(digest) = stats.get(path, &stamp) {
            return Ok((digest, false));
        }
    }
    let digest = hash_file(path).map_err(|e| with_path(e, path))?;
    stats.put(path, stamp, digest);
    Ok((digest, true))
}

/// Lists regular files under `dir` (following links), relative paths with `/`.
fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf, fs::Metadata)>) -> io::Result<()> {
    let mut names: Vec<_> = fs::read_dir(dir).map_err(|e| with_path(e, dir))?.collect::<Result<_, _>>()?;
    names.sort_by_key(|e| e.file_name());
    for entry in names {
        let abs = entry.path();
        let meta = fs::metadata(&abs).map_err(|e| with_path(e, &abs))?;
        if meta.is_dir() {
            walk(root, &abs, out)?;
        } else if meta.is_file() {
            let rel = abs.strip_prefix(root).expect("walked path is under its root");
            let rel = rel.to_str().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, format!("{}: file names must be UTF-8", abs.display()))
            })?;
            out.push((rel.replace('\\', "/"), abs, meta));
        }
    }
    Ok(())
}

/// What a path that is neither a regular file nor a folder is ("a named pipe
/// (FIFO)", "a character device", …), or `None` for a file or a folder.
/// Inside input folders such entries are skipped; as an input they are refused.
pub fn special_file(meta: &fs::Metadata) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_file() || t.is_dir() {
        None
    } else if t.is_fifo() {
        Some("a named pipe (FIFO)")
    } else if t.is_char_device() {
        Some("a character device")
    } else if t.is_block_device() {
        Some("a block device")
    } else if t.is_socket() {
        Some("a socket")
    } else {
        Some("neither a file nor a folder")
    }
}

/// Adds the path to an I/O error's message.
pub(crate) fn with_path(err: io::Error, path: &Path) -> io::Error {
    io::Error::new(err.kind(), format!("{}: {err}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_and_small_files_hash_like_blake3() {
        let dir = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(dir.path().join("big"), &big).unwrap();
        fs::write(dir.path().join("small"), b"abc").unwrap();
        assert_eq!(hash_file(&dir.path().join("big")).unwrap(), ContentDigest::of(&big));
        assert_eq!(hash_file(&dir.path().join("small")).unwrap(), ContentDigest::of(b"abc"));
    }

    #[test]
    fn stat_cache_skips_rehash_unless_asked() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("d")).unwrap();
        fs::write(dir.path().join("d/a.txt"), b"aaa").unwrap();
        fs::write(dir.path().join("d/b.txt"), b"bbb").unwrap();
        let stats = StatCache::in_memory();
        let (first, s1) = hash_path(&dir.path().join("d"), &stats, false).unwrap();
        assert_eq!(s1.bytes_hashed, 6);
        let (second, s2) = hash_path(&dir.path().join("d"), &stats, false).unwrap();
        assert_eq!((s2.bytes_hashed, s2.stat_hits), (0, 2));
        let (Hashed::Tree(a), Hashed::Tree(b)) = (first, second) else { panic!("expected trees") };
        assert_eq!(a.digest(), b.digest());
        let (_, s3) = hash_path(&dir.path().join("d"), &stats, true).unwrap();
        assert_eq!(s3.bytes_hashed, 6);
    }
}
