//! `to = "exports/NAME"`: a copy of the export outside the cache, for people
//! and tools that do not know swift's store.
//!
//! Files are reflinked where the filesystem allows (btrfs, XFS, APFS: no extra
//! space), else copied — never hard-linked, since an edit in place would then
//! corrupt the cached object. The copy is made beside the target and renamed
//! into place, so the folder is the old export or the new one, never half of
//! each. A `.swift-export` file records which export the folder holds: a
//! folder without it (one swift did not write) is never overwritten, and a
//! folder that already holds this export is left alone.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use swift_cache::atomic::{remove_orphans, sync_dir, temp_name};
use swift_cache::store::{read_dir_sorted, remove_tree};
use swift_cache::Artifact;
use swift_engine::kind::CompileCtx;
use swift_engine::ManifestError;

/// The file naming the export a `to` folder holds.
pub const MARKER: &str = ".swift-export";

/// Checks a `to` value and resolves it against the project root.
pub fn target(ctx: &CompileCtx<'_>, to: &str) -> Result<PathBuf, ManifestError> {
    let path = Path::new(to);
    let inside = |name: &str| path.components().next() == Some(Component::Normal(name.as_ref()));
    if to.trim().is_empty() || path.components().all(|c| matches!(c, Component::CurDir)) {
        return Err(ctx.error(&["to"], "to must name a folder for the export, e.g. to = \"exports/law_qa\""));
    }
    if path.components().any(|c| matches!(c, Component::ParentDir)) || inside(".git") || inside(".swift") {
        return Err(ctx
            .error(&["to"], format!("to = {to:?} points outside the project or into .git/.swift"))
            .with_help("give a folder inside the project, e.g. \"exports/law_qa\", or an absolute path"));
    }
    Ok(ctx.root().join(path))
}

/// What `.swift-export` records.
#[derive(Debug, Deserialize, Serialize)]
struct Marker {
    /// The export artifact's digest.
    digest: String,
    /// `pipeline/stage` of the export stage that wrote the folder.
    owner: String,
    /// Every file it wrote, relative to the folder.
    files: Vec<String>,
}

/// Brings `to` up to date with the export at `src` for the export stage
/// `owner` (`pipeline/stage`); returns a line for the log when it changed the
/// folder.
pub fn publish(src: &Path, artifact: &Artifact, to: &Path, shown: &str, owner: &str) -> anyhow::Result<Option<String>> {
    let digest = artifact.digest().to_hex();
    if to.exists() && !is_empty_dir(to) {
        let held: Marker = fs::read_to_string(to.join(MARKER))
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .with_context(|| format!("to = {shown:?}: {} exists and swift did not write it (it has no {MARKER} file); move it away or choose another `to`", to.display()))?;
        if held.owner != owner {
            bail!("to = {shown:?}: {} holds the export of `{}`, not of this stage (`{owner}`); give each export stage its own `to`", to.display(), held.owner);
        }
        let foreign: Vec<String> = files(to)?.into_iter().filter(|f| f != MARKER && !held.files.contains(f)).collect();
        if !foreign.is_empty() {
            bail!(
                "to = {shown:?}: {} holds files the export did not write ({}); move them out, swift replaces the folder whole",
                to.display(),
                foreign.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
            );
        }
        if held.digest == digest {
            return Ok(None);
        }
    }
    let parent = to.parent().context("`to` has no parent folder")?;
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let stem = to.file_name().and_then(|n| n.to_str()).unwrap_or("export");
    // What an export killed mid-copy left beside its target (best effort).
    let _ = remove_orphans(parent);
    let fresh = temp_name(parent, stem);
    let marker = Marker { digest, owner: owner.to_string(), files: files(src)? };
    let result = copy_tree(src, &fresh).and_then(|()| write_synced(&fresh.join(MARKER), &(serde_json::to_string_pretty(&marker)? + "\n")));
    if let Err(e) = result {
        let _ = remove_tree(&fresh);
        return Err(e.context(format!("copying the export to {}", to.display())));
    }
    let old = temp_name(parent, stem);
    let had_old = to.exists();
    if had_old {
        fs::rename(to, &old).with_context(|| format!("moving the previous export {} aside", to.display()))?;
    }
    if let Err(e) = fs::rename(&fresh, to) {
        // Put the previous export back; leave nothing half-done behind.
        if had_old {
            let _ = fs::rename(&old, to);
        }
        let _ = remove_tree(&fresh);
        return Err(anyhow::Error::new(e).context(format!("renaming the new export into {}", to.display())));
    }
    sync_dir(parent).with_context(|| format!("syncing {}", parent.display()))?;
    remove_tree(&old).with_context(|| format!("removing the previous export {}", old.display()))?;
    Ok(Some(format!("exported to {shown}")))
}

/// Every file under `root`, relative to it, sorted.
fn files(root: &Path) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for path in read_dir_sorted(&dir).with_context(|| format!("reading {}", dir.display()))? {
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path.strip_prefix(root).expect("under root").to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Writes a file and fsyncs it.
fn write_synced(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut file = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    file.write_all(text.as_bytes()).and_then(|()| file.sync_all()).with_context(|| format!("writing {}", path.display()))
}

fn is_empty_dir(path: &Path) -> bool {
    fs::read_dir(path).is_ok_and(|mut entries| entries.next().is_none())
}

/// Reflinks (or copies) every file of `src` into a new folder `dest`, each
/// writable by its owner, and fsyncs them.
pub fn copy_tree(src: &Path, dest: &Path) -> anyhow::Result<()> {
    fs::create_dir(dest).with_context(|| format!("creating {}", dest.display()))?;
    for path in read_dir_sorted(src)? {
        let target = dest.join(path.file_name().expect("entries have names"));
        if path.is_dir() {
            copy_tree(&path, &target)?;
        } else {
            reflink_copy::reflink_or_copy(&path, &target).with_context(|| format!("copying {}", path.display()))?;
            let file = fs::File::open(&target).with_context(|| format!("opening {}", target.display()))?;
            file.set_permissions(fs::Permissions::from_mode(0o644))
                .and_then(|()| file.sync_all())
                .with_context(|| format!("finishing {}", target.display()))?;
        }
    }
    fs::set_permissions(dest, fs::Permissions::from_mode(0o755)).and_then(|()| sync_dir(dest)).with_context(|| format!("finishing {}", dest.display()))
}
