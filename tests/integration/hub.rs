//! The `download` stage against a loopback server that speaks the Hub's API for
//! fixture repositories (revision resolution, file listing, ranged downloads
//! with the headers the real Hub sends), and against a pre-populated HF cache.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::util::{populate_hf_cache, Project};

type Files = BTreeMap<String, Vec<u8>>;

#[derive(Default)]
struct HubState {
    /// repo path ("models/org/name" or "datasets/org/name") → (main sha, commits)
    repos: HashMap<String, (String, HashMap<String, Files>)>,
    token: Option<String>,
    requests: Vec<String>,
    /// Files are served by a storage host here (`http://127.0.0.1:PORT`):
    /// `resolve` answers 302 with the Hub's headers, as the real Hub does for LFS files.
    storage: Option<String>,
    /// What each resolve request's `Authorization` header was.
    resolve_auth: Vec<Option<String>>,
}

struct FakeHub {
    port: u16,
    state: Arc<Mutex<HubState>>,
}

impl FakeHub {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(HubState::default()));
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = shared.clone();
                std::thread::spawn(move || serve(stream, &state));
            }
        });
        Self { port, state }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn commit(&self, repo: &str, sha: &str, files: Files) {
        let mut state = self.state.lock().unwrap();
        let entry = state.repos.entry(repo.to_string()).or_default();
        entry.0 = sha.to_string();
        entry.1.insert(sha.to_string(), files);
    }

    fn requests(&self, containing: &str) -> usize {
        self.state.lock().unwrap().requests.iter().filter(|r| r.contains(containing)).count()
    }
}

fn serve(stream: TcpStream, state: &Mutex<HubState>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.trim_end().split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (status, extra, body) = respond(&path, &headers, state);
    let mut out = stream;
    let mut head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = out.write_all(head.as_bytes());
    let _ = out.write_all(&body);
}

fn respond(path: &str, headers: &HashMap<String, String>, state: &Mutex<HubState>) -> (String, Vec<(String, String)>, Vec<u8>) {
    let mut state = state.lock().unwrap();
    state.requests.push(path.to_string());
    if let Some(token) = &state.token {
        if headers.get("authorization") != Some(&format!("Bearer {token}")) {
            return ("401 Unauthorized".into(), vec![], b"{\"error\":\"Invalid credentials\"}".to_vec());
        }
    }
    let not_found = || ("404 Not Found".to_string(), vec![], b"{\"error\":\"Repository not found\"}".to_vec());
    let lookup = |state: &HubState, repo: &str, rev: &str| -> Option<(String, Files)> {
        let (main, commits) = state.repos.get(repo)?;
        let sha = if rev == "main" { main.clone() } else { rev.to_string() };
        commits.get(&sha).map(|files| (sha, files.clone()))
    };
    if let Some(rest) = path.strip_prefix("/api/") {
        // /api/{models|datasets}/{org}/{name}/revision/{rev}
        let parts: Vec<&str> = rest.splitn(5, '/').collect();
        if parts.len() == 5 && parts[3] == "revision" {
            let repo = format!("{}/{}/{}", parts[0], parts[1], parts[2]);
            let Some((sha, files)) = lookup(&state, &repo, parts[4]) else { return not_found() };
            let siblings: Vec<_> = files.keys().map(|f| serde_json::json!({"rfilename": f})).collect();
            let body = serde_json::json!({"id": repo, "sha": sha, "siblings": siblings});
            return ("200 OK".into(), vec![("Content-Type".into(), "application/json".into())], body.to_string().into_bytes());
        }
        return not_found();
    }
    // /{org}/{name}/resolve/{rev}/{file} or /datasets/{org}/{name}/resolve/{rev}/{file}
    let (kind, rest) = match path.strip_prefix("/datasets/") {
        Some(rest) => ("datasets", rest),
        None => ("models", &path[1..]),
    };
    let parts: Vec<&str> = rest.splitn(5, '/').collect();
    if parts.len() < 5 || parts[2] != "resolve" {
        return not_found();
    }
    let repo = format!("{kind}/{}/{}", parts[0], parts[1]);
    let Some((sha, files)) = lookup(&state, &repo, parts[3]) else { return not_found() };
    let Some(content) = files.get(parts[4]) else { return not_found() };
    let etag = format!("\"{}\"", blake3::hash(content).to_hex());
    state.resolve_auth.push(headers.get("authorization").cloned());
    if let Some(storage) = &state.storage {
        let location = format!("{storage}/blobs/{}", etag.trim_matches('"'));
        let extra = vec![("X-Repo-Commit".to_string(), sha), ("X-Linked-Etag".to_string(), etag), ("Location".to_string(), location)];
        return ("302 Found".into(), extra, vec![]);
    }
    let mut extra = vec![("X-Repo-Commit".to_string(), sha), ("ETag".to_string(), etag)];
    let len = content.len();
    match headers.get("range").and_then(|r| r.strip_prefix("bytes=")) {
        Some(range) => {
            let (a, b) = range.split_once('-').unwrap();
            let start: usize = a.parse().unwrap();
            let end: usize = if b.is_empty() { len - 1 } else { b.parse::<usize>().unwrap().min(len - 1) };
            extra.push(("Content-Range".into(), format!("bytes {start}-{end}/{len}")));
            ("206 Partial Content".into(), extra, content[start..=end].to_vec())
        }
        None => ("200 OK".into(), extra, content.clone()),
    }
}

/// A storage host on its own port: serves blobs by etag and records every
/// `Authorization` header it receives.
struct Storage {
    port: u16,
    blobs: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    authorizations: Arc<Mutex<Vec<Option<String>>>>,
}

impl Storage {
    fn start(files: &Files) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let blobs: HashMap<String, Vec<u8>> = files.values().map(|c| (blake3::hash(c).to_hex().to_string(), c.clone())).collect();
        let (blobs, authorizations) = (Arc::new(Mutex::new(blobs)), Arc::new(Mutex::new(Vec::new())));
        let (b, a) = (blobs.clone(), authorizations.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (b, a) = (b.clone(), a.clone());
                std::thread::spawn(move || serve_blob(stream, &b, &a));
            }
        });
        Self { port, blobs, authorizations }
    }
}

fn serve_blob(stream: TcpStream, blobs: &Mutex<HashMap<String, Vec<u8>>>, authorizations: &Mutex<Vec<Option<String>>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut auth = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.trim_end().split_once(':') {
            if k.trim().eq_ignore_ascii_case("authorization") {
                auth = Some(v.trim().to_string());
            }
        }
    }
    authorizations.lock().unwrap().push(auth);
    let path = request_line.split_whitespace().nth(1).unwrap_or("/");
    let body = path.strip_prefix("/blobs/").and_then(|etag| blobs.lock().unwrap().get(etag).cloned());
    let mut out = stream;
    let (status, body) = match body {
        Some(body) => ("200 OK", body),
        None => ("404 Not Found", b"no such blob".to_vec()),
    };
    let _ = out.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()).as_bytes());
    let _ = out.write_all(&body);
}

fn fixture_repo() -> Files {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen2-tiny");
    let mut files = Files::new();
    for name in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        files.insert(name.to_string(), std::fs::read(dir.join(name)).unwrap());
    }
    files.insert("README.md".into(), b"# tiny\n".to_vec());
    files
}

const SHA1: &str = "1111111111111111111111111111111111111111";
const SHA2: &str = "2222222222222222222222222222222222222222";
const SHA3: &str = "3333333333333333333333333333333333333333";

fn hub_project(hub: &FakeHub) -> Project {
    let p = Project::new();
    p.write("pipelines/hub.toml", "[stages.base]\nkind = \"download\"\nmodel = \"hf://swift-test/tiny-qwen\"\n");
    p.set_env("HF_ENDPOINT", &hub.endpoint());
    p.set_env("HF_HUB_CACHE", p.path("hf-cache").to_str().unwrap());
    p.set_env("HF_HOME", p.path("hf-home").to_str().unwrap());
    p
}

#[test]
fn hub_download_caches_and_follows_upstream_commits() {
    let hub = FakeHub::start();
    hub.commit("models/swift-test/tiny-qwen", SHA1, fixture_repo());
    let p = hub_project(&hub);

    let run = p.run("pipelines/hub.toml", &[], 0);
    assert_eq!(run.status("base"), "ran", "{run}");
    let model = std::path::PathBuf::from(run.json()["stages"][0]["outputs"]["model"].as_str().unwrap());
    assert!(model.join("model.safetensors").is_file() && model.join("config.json").is_file());
    assert!(!model.join("README.md").exists(), "only the files a model needs are fetched");
    assert_eq!(hub.requests("/resolve/"), 5, "one request per file: its headers and body together");
    assert!(p.read("pipelines/hub.lock").contains(&format!("revision = \"{SHA1}\"")));
    assert!(p.path("hf-cache/models--swift-test--tiny-qwen/snapshots").join(SHA1).join("config.json").exists());

    let generated = p.swift(&["generate", "--model", "pipelines/hub.toml:base", "--prompt", "The statute says", "--max-tokens", "3", "--json"]);
    assert_eq!(generated.code, 0, "{generated}");
    assert_eq!(generated.json()["new_ids"].as_array().unwrap().len(), 3);

    // swift recorded refs/main in the HF cache: offline runs resolve it.
    let all_before = hub.requests("/");
    let offline = p.run("pipelines/hub.toml", &["--offline"], 0);
    assert_eq!(offline.status("base"), "cached", "{offline}");
    assert_eq!(hub.requests("/"), all_before, "offline: no request");

    let api_before = hub.requests("/api/");
    let rerun = p.run("pipelines/hub.toml", &[], 0);
    assert_eq!(rerun.status("base"), "cached");
    assert_eq!(hub.requests("/api/"), api_before + 1, "an unchanged upstream costs one metadata request");
    assert_eq!(hub.requests("/resolve/"), 5, "and no transfer");

    // A fresh swift cache over the same HF cache: no file is transferred again.
    swift_cache::store::remove_tree(&p.path(".swift")).unwrap();
    let reused = p.run("pipelines/hub.toml", &[], 0);
    assert_eq!(reused.json()["stages"][0]["metrics"]["files_cached"], 5, "{reused}");
    assert_eq!(hub.requests("/resolve/"), 5);

    // A new upstream commit is seen, named by status, and fetched.
    let mut next = fixture_repo();
    next.insert("tokenizer_config.json".into(), b"{\"model_max_length\": 512}".to_vec());
    hub.commit("models/swift-test/tiny-qwen", SHA2, next);
    let status = p.swift(&["status", "pipelines/hub.toml", "--json"]);
    let reason = &status.json()["stages"][0]["reasons"][0];
    assert_eq!(reason["kind"], "revision-changed", "{status}");
    let moved = p.run("pipelines/hub.toml", &[], 0);
    assert_eq!(moved.status("base"), "ran");
    assert!(p.read("pipelines/hub.lock").contains(SHA2));

    // --locked keeps the pinned commit and asks nothing, even when main moves on.
    hub.commit("models/swift-test/tiny-qwen", SHA3, fixture_repo());
    let api_before = hub.requests("/api/");
    let locked = p.run("pipelines/hub.toml", &["--locked"], 0);
    assert_eq!(locked.status("base"), "cached", "{locked}");
    assert_eq!(hub.requests("/api/"), api_before);
}

#[test]
fn offline_miss_is_a_clear_error_and_a_populated_cache_needs_no_server() {
    let hub = FakeHub::start();
    let p = hub_project(&hub);
    let run = p.run("pipelines/hub.toml", &["--offline"], 1);
    assert!(run.stderr.contains("not in the Hugging Face cache") && run.stderr.contains("without --offline"), "{run}");
    assert_eq!(hub.requests("/"), 0, "offline means no request at all");

    // Lay out an HF cache as huggingface_hub writes it: blobs, snapshot links, refs.
    populate_hf_cache(&p.path("hf-cache"), "models/swift-test/tiny-qwen", SHA1, &fixture_repo().into_iter().collect::<Vec<_>>());
    p.set_env("HF_ENDPOINT", "http://127.0.0.1:9");
    p.set_env("HF_HUB_OFFLINE", "1");
    let run = p.run("pipelines/hub.toml", &[], 0);
    assert_eq!(run.status("base"), "ran", "{run}");
    assert!(p.read("pipelines/hub.lock").contains(SHA1));
}

/// A hub serving the fixture repository at SHA1 to requests with `token` only.
fn hub_requiring(token: &str) -> FakeHub {
    let hub = FakeHub::start();
    hub.commit("models/swift-test/tiny-qwen", SHA1, fixture_repo());
    hub.state.lock().unwrap().token = Some(token.into());
    hub
}

#[test]
fn a_refused_token_is_explained_and_never_written_anywhere() {
    let hub = hub_requiring("hf_good_token");
    let p = hub_project(&hub);
    p.set_env("HF_TOKEN", "hf_bad_token_123");
    let run = p.run("pipelines/hub.toml", &[], 1);
    assert!(run.stderr.contains("refused access") && run.stderr.contains("HF_TOKEN"), "{run}");
    assert!(!run.stderr.contains("hf_bad_token_123") && !run.stdout.contains("hf_bad_token_123"));

    p.set_env("HF_TOKEN", "hf_good_token");
    let run = p.run("pipelines/hub.toml", &[], 0);
    assert!(!run.stderr.contains("hf_good_token"));
    for file in walk(&p.path(".swift")).into_iter().chain([p.path("pipelines/hub.lock")]) {
        let bytes = std::fs::read(&file).unwrap_or_default();
        assert!(!String::from_utf8_lossy(&bytes).contains("hf_good_token"), "token found in {}", file.display());
    }
}

#[test]
fn a_dataset_path_inside_a_repository_is_fetched_alone() {
    let hub = FakeHub::start();
    let mut files = Files::new();
    files.insert("train/law.jsonl".into(), b"{\"q\": 1}\n".to_vec());
    files.insert("test/law.jsonl".into(), b"{\"q\": 2}\n".to_vec());
    hub.commit("datasets/swift-test/law", SHA1, files);
    let p = hub_project(&hub);
    p.write("pipelines/data.toml", "[stages.law]\nkind = \"download\"\ndataset = \"hf://datasets/swift-test/law@main/train\"\n");
    let run = p.run("pipelines/data.toml", &[], 0);
    let out = std::path::PathBuf::from(run.json()["stages"][0]["outputs"]["dataset"].as_str().unwrap());
    assert_eq!(std::fs::read_to_string(out.join("law.jsonl")).unwrap(), "{\"q\": 1}\n");
    assert_eq!(hub.requests("/resolve/"), 1, "only train/law.jsonl, one request");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn an_adapter_of_a_hub_model_names_its_repository_and_revision() {
    let hub = FakeHub::start();
    hub.commit("models/swift-test/tiny-qwen", SHA1, fixture_repo());
    let p = hub_project(&hub);
    let line = serde_json::json!({"messages": [
        {"role": "user", "content": "Which court hears appeals?"},
        {"role": "assistant", "content": "The appellate court does."},
    ]});
    p.write("data/chat.jsonl", &format!("{line}\n{line}\n"));
    p.write(
        "pipelines/hub.toml",
        "[stages.base]\nkind = \"download\"\nmodel = \"hf://swift-test/tiny-qwen@main\"\n\n\
         [stages.prep]\nkind = \"preprocess\"\nmodel = \"base\"\ndata = [\"data/chat.jsonl\"]\n\n\
         [stages.tune]\nkind = \"finetune\"\nmethod = \"lora\"\nmodel = \"base\"\ndata = \"prep\"\nmax_steps = 2\n",
    );
    let run = p.run("pipelines/hub.toml", &[], 0);
    let adapter = std::path::PathBuf::from(run.stage("tune")["outputs"]["adapter"].as_str().unwrap());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["base_model_name_or_path"], "swift-test/tiny-qwen");
    assert_eq!(config["revision"], "main");
}

/// The token goes to the endpoint only: a file the Hub redirects to another
/// host (here another port) is fetched there without `Authorization`, as
/// huggingface_hub does; the HF cache holds it as blobs and snapshot links.
#[test]
fn a_redirect_to_another_host_never_carries_the_token() {
    let hub = hub_requiring("hf_secret_token");
    let storage = Storage::start(&fixture_repo());
    hub.state.lock().unwrap().storage = Some(format!("http://127.0.0.1:{}", storage.port));
    let p = hub_project(&hub);
    p.set_env("HF_TOKEN", "hf_secret_token");
    let run = p.run("pipelines/hub.toml", &[], 0);
    assert_eq!(run.status("base"), "ran", "{run}");
    let resolves = hub.state.lock().unwrap().resolve_auth.clone();
    assert_eq!(resolves.len(), 5);
    assert!(resolves.iter().all(|a| a.as_deref() == Some("Bearer hf_secret_token")), "{resolves:?}");
    let sent = storage.authorizations.lock().unwrap().clone();
    assert_eq!(sent.len(), 5, "every file came from the storage host");
    assert!(sent.iter().all(Option::is_none), "the storage host received {sent:?}");
    let snapshot = p.path("hf-cache/models--swift-test--tiny-qwen/snapshots").join(SHA1);
    let link = std::fs::read_link(snapshot.join("config.json")).unwrap();
    assert!(link.starts_with("../../blobs"), "{}", link.display());
    let blob = blake3::hash(&std::fs::read(snapshot.join("config.json")).unwrap()).to_hex().to_string();
    assert!(storage.blobs.lock().unwrap().contains_key(&blob));
}

/// A token with a trailing CR (copied from a Windows file) is trimmed and
/// works; one with control or non-ASCII characters inside is refused before
/// any request, and never printed.
#[test]
fn tokens_are_trimmed_and_unusable_ones_are_refused_unseen() {
    let hub = hub_requiring("hf_good_token");
    let p = hub_project(&hub);
    p.set_env("HF_TOKEN", "hf_good_token\r\n");
    let run = p.run("pipelines/hub.toml", &[], 0);
    assert_eq!(run.status("base"), "ran", "{run}");
    for bad in ["hf_bad\u{7}token", "hf_bäd_token", "hf bad token"] {
        let p = hub_project(&hub);
        p.set_env("HF_TOKEN", bad);
        let before = hub.requests("/");
        let run = p.run("pipelines/hub.toml", &[], 1);
        assert!(run.stderr.contains("the Hugging Face token from HF_TOKEN contains"), "{run}");
        assert!(!run.stderr.contains("hf_b") && !run.stdout.contains("hf_b"), "the token was printed\n{run}");
        assert_eq!(hub.requests("/"), before, "a request went out with an unusable token");
    }
}
