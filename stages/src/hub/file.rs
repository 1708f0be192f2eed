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

/// Redirects followed at most.
const MAX_REDIRECTS: usize = 10;

/// The scheme, host and port of a URL (`http://127.0.0.1:8000`).
pub fn origin(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit('@').next()?.to_ascii_lowercase();
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "https" => ":443",
        "http" => ":80",
        _ => "",
    };
    let has_port = authority.rsplit_once(':').is_some_and(|(_, p)| p.chars().all(|c| c.is_ascii_digit()) && !authority.ends_with(']'));
    Some(if has_port { format!("{scheme}://{authority}") } else { format!("{scheme}://{authority}{default_port}") })
}

/// `location` (absolute, or relative to `base`) as an absolute URL.
fn resolve_location(base: &str, location: &str) -> anyhow::Result<String> {
    if location.contains("://") {
        return Ok(location.to_string());
    }
    let origin_end = base.find("://").map(|i| i + 3).and_then(|start| base[start..].find('/').map(|j| start + j)).unwrap_or(base.len());
    if let Some(path) = location.strip_prefix("//") {
        let scheme = base.split("://").next().unwrap_or("https");
        return Ok(format!("{scheme}://{path}"));
    }
    if location.starts_with('/') {
        return Ok(format!("{}{location}", &base[..origin_end]));
    }
    let dir_end = base[..base.find('?').unwrap_or(base.len())].rfind('/').filter(|&i| i >= origin_end).unwrap_or(origin_end);
    Ok(format!("{}/{location}", &base[..dir_end]))
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
    let trusted = origin(endpoint);
    let mut current = url.to_string();
    let mut head: Option<FileHead> = None;
    let mut token = token;
    for _ in 0..=MAX_REDIRECTS {
        if origin(&current) != trusted {
            // Once off the endpoint's origin, never back with the token.
            token = None;
        }
        let mut request = agent.get(&current);
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
            let location = response.header("location").ok_or(FileError::Other(anyhow!("a redirect without a Location")))?;
            current = resolve_location(&current, location).map_err(FileError::Other)?;
            continue;
        }
        let head = head.ok_or(FileError::Other(anyhow!("the Hub sent no ETag for `{file}`")))?;
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
        assert_eq!(origin("https://huggingface.co/a/b").as_deref(), Some("https://huggingface.co:443"));
        assert_eq!(origin("https://HuggingFace.co:443/x"), origin("https://huggingface.co/y"));
        assert_ne!(origin("http://127.0.0.1:8000/a"), origin("http://127.0.0.1:8001/a"));
        assert_ne!(origin("https://huggingface.co/a"), origin("https://cdn-lfs.huggingface.co/a"));
        assert_ne!(origin("http://h/a"), origin("https://h/a"));
    }

    #[test]
    fn relative_locations_resolve_against_the_request() {
        let base = "http://127.0.0.1:9/org/name/resolve/abc/dir/f.json?x=1";
        assert_eq!(resolve_location(base, "/api/x").unwrap(), "http://127.0.0.1:9/api/x");
        assert_eq!(resolve_location(base, "g.json").unwrap(), "http://127.0.0.1:9/org/name/resolve/abc/dir/g.json");
        assert_eq!(resolve_location(base, "//cdn.example/f").unwrap(), "http://cdn.example/f");
        assert_eq!(resolve_location(base, "https://cdn.example/f").unwrap(), "https://cdn.example/f");
    }
}
