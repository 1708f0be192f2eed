//! One file of one commit from the Hub into the Hugging Face cache, as
//! `huggingface_hub` lays it out (`blobs/ETAG`, `snapshots/SHA/PATH` a
//! relative link to the blob), with redirects followed here rather than by
//! the HTTP client, so that the token goes to the endpoint's origin only.
//!
//! The Hub answers a `resolve` URL with the file's commit and etag headers
//! and, for large files, a redirect to a storage host. `huggingface_hub`
//! drops the `Authorization` header on a redirect to another host; hf-hub
//! 0.4 sends it on (its metadata request sets it on the redirect target
//! explicitly), so swift does these requests itself:
//!
//! | hop | `Authorization` |
//! |---|---|
//! | the endpoint's `resolve` URL, and redirects on the same scheme, host and port | `Bearer TOKEN` |
//! | a redirect anywhere else (a CDN, another port) | none, then none for every later hop |
//!
//! The body is written to `blobs/ETAG.part` and renamed into place once
//! complete, so the cache never holds half a file under its final name.

use std::io::Write;
use std::path::{Component, Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use url::Url;

/// Redirects followed at most.
const MAX_REDIRECTS: usize = 10;

/// Whether `url` has the scheme, host and port of `trusted` (default ports
/// included, hosts compared case-insensitively, as `url` normalizes them).
fn same_origin(url: &Url, trusted: &Url) -> bool {
    let origin = url.origin();
    origin.is_tuple() && origin == trusted.origin()
}

/// What the Hub said about a file before its body.
struct FileHead {
    etag: String,
    commit: Option<String>,
}

/// Downloads `url` (the endpoint's `resolve` URL of `file` at commit `sha`)
/// into the repository's HF cache folder `repo_folder`; `token` goes to
/// `endpoint`'s origin only. An error names the HTTP status, never the token.
pub fn download(url: &str, endpoint: &str, token: Option<&str>, repo_folder: &Path, sha: &str, file: &str)
    -> Result<PathBuf, FileError> {
    let agent = ureq::AgentBuilder::new().redirects(0).user_agent(concat!("swift/", env!("CARGO_PKG_VERSION"))).build();
    let parse = |u: &str| Url::parse(u).map_err(|e| FileError::Other(anyhow!("`{u}` is not a URL: {e}")));
    let trusted = parse(endpoint)?;
    let mut current = parse(url)?;
    let mut head: Option<FileHead> = None;
    let mut token = token;
    for _ in 0..=MAX_REDIRECTS {
        if !same_origin(&current, &trusted) {
            // Once off the endpoint's origin, never back with the token.
            token = None;
        }
        let mut request = agent.get(current.as_str());
        if let Some(token) = token {
            request = request.set("Authorization", &format!("Bearer {token}"));
        }
        let response = match request.call() {
            Ok(response) => response,
            Err(ureq::Error::Status(code, _)) => return Err(FileError::Status(code)),
            Err(ureq::Error::Transport(t)) => return Err(FileError::Transport(t.to_string())),
        };
        if head.is_none() {
            let etag = response.header("x-linked-etag").or_else(|| response.header("etag"));
            if let Some(etag) = etag {
                head = Some(FileHead { etag: etag.replace('"', ""), commit: response.header("x-repo-commit").map(str::to_string) });
            }
        }
        if (300..400).contains(&response.status()) {
            let location = response.header("location").ok_or_else(|| FileError::Other(anyhow!("a redirect without a Location")))?;
            current = current.join(location).map_err(|e| FileError::Other(anyhow!("a redirect to `{location}`: {e}")))?;
            continue;
        }
        let head = head.ok_or_else(|| FileError::Other(anyhow!("the Hub sent no ETag for `{file}`")))?;
        if head.commit.as_deref().is_some_and(|c| !c.eq_ignore_ascii_case(sha)) {
            return Err(FileError::Other(anyhow!("the Hub served `{file}` of commit {} when {sha} was asked for", head.commit.unwrap_or_default())));
        }
        return store(response, repo_folder, &head.etag, sha, file).map_err(FileError::Other);
    }
    Err(FileError::Other(anyhow!("more than {MAX_REDIRECTS} redirects for `{file}`")))
}

/// Writes the body as `blobs/ETAG` (through `blobs/ETAG.part`) and links
/// `snapshots/SHA/FILE` to it.
fn store(response: ureq::Response, repo_folder: &Path, etag: &str, sha: &str, file: &str) -> anyhow::Result<PathBuf> {
    if etag.is_empty() || etag.contains(['/', '\\']) || etag.starts_with('.') {
        bail!("the Hub sent an unusable ETag for `{file}`");
    }
    if Path::new(file).components().any(|c| !matches!(c, Component::Normal(_))) {
        bail!("the Hub listed an unsafe file name `{file}`");
    }
    let blobs = repo_folder.join("blobs");
    std::fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;
    let blob = blobs.join(etag);
    if !blob.exists() {
        let part = blobs.join(format!("{etag}.part"));
        let mut out = std::fs::File::create(&part).with_context(|| format!("creating {}", part.display()))?;
        std::io::copy(&mut response.into_reader(), &mut out).with_context(|| format!("downloading `{file}`"))?;
        out.flush()?;
        out.sync_all()?;
        drop(out);
        std::fs::rename(&part, &blob).with_context(|| format!("moving {} into place", part.display()))?;
    }
    let pointer = repo_folder.join("snapshots").join(sha).join(file);
    let parent = pointer.parent().context("a snapshot path has a parent")?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    if !pointer.exists() {
        // snapshots/SHA/a/b.json → ../../../blobs/ETAG
        let depth = Path::new(file).components().count() + 1;
        let mut target = PathBuf::new();
        (0..depth).for_each(|_| target.push(".."));
        target.push("blobs");
        target.push(etag);
        let _ = std::fs::remove_file(&pointer);
        std::os::unix::fs::symlink(&target, &pointer).with_context(|| format!("linking {}", pointer.display()))?;
    }
    Ok(pointer)
}

/// Why a file could not be fetched.
#[derive(Debug)]
pub enum FileError {
    /// The server answered with this HTTP status.
    Status(u16),
    /// The server could not be reached (the cause, which never holds the token).
    Transport(String),
    /// Anything else.
    Other(anyhow::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_tell_hosts_and_ports_apart() {
        let same = |a: &str, b: &str| same_origin(&Url::parse(a).unwrap(), &Url::parse(b).unwrap());
        assert!(same("https://HuggingFace.co:443/x", "https://huggingface.co/y"));
        assert!(same("http://127.0.0.1:8000/a/resolve", "http://127.0.0.1:8000"));
        assert!(!same("http://127.0.0.1:8000/a", "http://127.0.0.1:8001/a"));
        assert!(!same("https://cdn-lfs.huggingface.co/a", "https://huggingface.co"));
        assert!(!same("http://h/a", "https://h/a"));
        assert!(!same("file:///etc/passwd", "file:///etc/passwd"), "no origin is trusted");
    }

    #[test]
    fn relative_locations_resolve_against_the_request() {
        let base = Url::parse("http://127.0.0.1:9/org/name/resolve/abc/dir/f.json?x=1").unwrap();
        let join = |l: &str| base.join(l).unwrap().to_string();
        assert_eq!(join("/api/x"), "http://127.0.0.1:9/api/x");
        assert_eq!(join("g.json"), "http://127.0.0.1:9/org/name/resolve/abc/dir/g.json");
        assert_eq!(join("//cdn.example/f"), "http://cdn.example/f");
        assert_eq!(join("https://cdn.example/f"), "https://cdn.example/f");
    }
}
