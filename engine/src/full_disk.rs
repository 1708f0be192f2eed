//! A stage that fills the disk: what is freed and what the user is told.
//!
//! A stage whose writes fail with "No space left on device" (or a quota)
//! leaves its partial outputs in `scratch/KEY/out/`, which would keep the disk
//! full and fail the rerun the same way. The executor removes them before the
//! run's summary, lock and record are written (so those have room again), and
//! the stage's error says how much room it had and how much it used. What else
//! the stage keeps in its scratch folder — a fine-tune's checkpoints — stays:
//! it is what a rerun resumes from, and its size is in the message, for the
//! user to delete when starting over is cheaper than freeing space.

use std::io::ErrorKind;
use std::path::Path;

use swift_cache::{StageKey, Store};

use crate::exec::human_bytes;

/// Whether an error comes from a full disk or an exhausted quota: by the
/// `io::Error` in its chain, or by the OS error text where a message was
/// reformatted on the way.
pub(crate) fn is_full_disk(error: &anyhow::Error) -> bool {
    let io_full = |e: &(dyn std::error::Error + 'static)| {
        e.downcast_ref::<std::io::Error>().is_some_and(|io| matches!(io.kind(), ErrorKind::StorageFull | ErrorKind::QuotaExceeded))
    };
    error.chain().any(io_full) || {
        let text = format!("{error:#}");
        text.contains("(os error 28)") || text.contains("(os error 122)")
    }
}

/// Removes the stage's partial outputs and says what happened: the room the
/// stage had when it started (`free_before`), the room there is now, and
/// what its scratch folder still holds.
pub(crate) fn free_and_explain(store: &Store, key: &StageKey, free_before: Option<u64>) -> String {
    let scratch = store.scratch_dir(key);
    let partial = bytes_under(&scratch.join("out"));
    let _ = swift_cache::store::remove_tree(&scratch.join("out"));
    let kept = bytes_under(&scratch);
    if kept == 0 {
        let _ = swift_cache::store::remove_tree(&scratch);
    }
    let had = free_before.map_or_else(String::new, |b| format!(" It had {} free when it started and needed more.", human_bytes(b)));
    let now = store.free_bytes().map_or_else(String::new, |b| format!(", {} free now", human_bytes(b)));
    let kept = if kept > 0 {
        format!(
            " Its scratch folder keeps {} ({}), what a rerun resumes from; delete it to start over.",
            human_bytes(kept),
            scratch.display()
        )
    } else {
        String::new()
    };
    let removed = if partial > 0 { format!(" The {} of partial outputs it wrote were removed.", human_bytes(partial)) } else { String::new() };
    format!(
        "\n  the disk holding the cache ({}{now}) is full.{had}{removed}{kept} \
         Free space there, or point SWIFT_CACHE at a larger disk, and rerun",
        store.root().display(),
    )
}

/// The bytes of the files under `path` (0 when it is missing).
fn bytes_under(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else { return 0 };
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(path).map_or(0, |entries| entries.flatten().map(|e| bytes_under(&e.path())).sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_disks_are_told_from_other_errors() {
        let full = anyhow::Error::from(std::io::Error::from(ErrorKind::StorageFull)).context("writing the adapter");
        assert!(is_full_disk(&full));
        let reformatted = anyhow::anyhow!("ingesting data: No space left on device (os error 28)");
        assert!(is_full_disk(&reformatted));
        assert!(!is_full_disk(&anyhow::Error::from(std::io::Error::from(ErrorKind::NotFound))));
    }

    #[test]
    fn partial_outputs_go_and_checkpoints_stay() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let key = StageKey::from_bytes([7; 32]);
        let scratch = store.scratch_dir(&key);
        std::fs::create_dir_all(scratch.join("out/model")).unwrap();
        std::fs::write(scratch.join("out/model/weights"), vec![0u8; 3000]).unwrap();
        std::fs::write(scratch.join("checkpoint.json"), vec![0u8; 500]).unwrap();
        let message = free_and_explain(&store, &key, Some(4096));
        assert!(!scratch.join("out").exists());
        assert!(scratch.join("checkpoint.json").exists());
        assert!(message.contains("It had 4.0 KiB free") && message.contains("2.9 KiB of partial outputs"), "{message}");
        assert!(message.contains("keeps 500 B"), "{message}");

        std::fs::remove_file(scratch.join("checkpoint.json")).unwrap();
        free_and_explain(&store, &key, None);
        assert!(!scratch.exists(), "an empty scratch folder goes too");
    }
}
