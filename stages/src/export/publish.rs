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
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context};
use swift_cache::atomic::{sync_dir, temp_name};
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

/// Brings `to` up to date with the export at `src`; returns a line for the
/// log when it changed the folder.
pub fn publish(src: &Path, artifact: &Artifact, to: &Path, shown: &str) -> anyhow::Result<Option<String>> {
    let digest = artifact.digest().to_hex();
    if to.exists() {
        match fs::read_to_string(to.join(MARKER)) {
            Ok(held) if held.trim() == digest => return Ok(None),
            Ok(_) => {}
            Err(_) if is_empty_dir(to) => {}
            Err(_) => bail!(
                "to = {shown:?}: {} exists and swift did not write it (it has no {MARKER} file); move it away or choose another `to`",
                to.display()
            ),
        }
    }
    let parent = to.parent().context("`to` has no parent folder")?;
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let stem = to.file_name().and_then(|n| n.to_str()).unwrap_or("export");
    let fresh = temp_name(parent, stem);
    let result = copy_tree(src, &fresh).and_then(|()| {
        fs::write(fresh.join(MARKER), format!("{digest}\n")).with_context(|| format!("writing {}", fresh.join(MARKER).display()))
    });
    if let Err(e) = result {
        let _ = remove_tree(&fresh);
        return Err(e.context(format!("copying the export to {}", to.display())));
    }
    let old = temp_name(parent, stem);
    if to.exists() {
        fs::rename(to, &old).with_context(|| format!("moving the previous export {} aside", to.display()))?;
    }
    fs::rename(&fresh, to).with_context(|| format!("renaming {} to {}", fresh.display(), to.display()))?;
    sync_dir(parent).with_context(|| format!("syncing {}", parent.display()))?;
    remove_tree(&old).with_context(|| format!("removing the previous export {}", old.display()))?;
    Ok(Some(format!("exported to {shown}")))
}

fn is_empty_dir(path: &Path) -> bool {
    fs::read_dir(path).is_ok_and(|mut entries| entries.next().is_none())
}

/// Reflinks (or copies) every file of `src` into a new folder `dest`, each
/// writable by its owner.
fn copy_tree(src: &Path, dest: &Path) -> anyhow::Result<()> {
    fs::create_dir(dest).with_context(|| format!("creating {}", dest.display()))?;
    for path in read_dir_sorted(src)? {
        let target = dest.join(path.file_name().expect("entries have names"));
        if path.is_dir() {
            copy_tree(&path, &target)?;
        } else {
            reflink_copy::reflink_or_copy(&path, &target).with_context(|| format!("copying {}", path.display()))?;
            let file = fs::File::open(&target).with_context(|| format!("opening {}", target.display()))?;
            file.set_permissions(fs::Permissions::from_mode(0o644))?;
            file.sync_all()?;
        }
    }
    fs::set_permissions(dest, fs::Permissions::from_mode(0o755))?;
    Ok(())
}
