//! A temporary project with a `.git` folder, and the real swift binary.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

pub struct Project {
    dir: tempfile::TempDir,
    env: std::cell::RefCell<Vec<(String, String)>>,
}

/// What one swift invocation did.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The JSON object on stdout's last line.
    pub fn json(&self) -> Value {
        let last = self.stdout.lines().last().unwrap_or_else(|| panic!("no stdout\n{self}"));
        serde_json::from_str(last).unwrap_or_else(|e| panic!("stdout's last line is not JSON ({e})\n{self}"))
    }

    /// Each stage's status, by name, from `--json` output.
    pub fn statuses(&self) -> Vec<(String, String)> {
        self.json()["stages"]
            .as_array()
            .unwrap_or_else(|| panic!("no stages\n{self}"))
            .iter()
            .map(|s| (s["name"].as_str().unwrap().to_string(), s["status"].as_str().unwrap().to_string()))
            .collect()
    }

    /// The status of one stage.
    pub fn status(&self, stage: &str) -> String {
        self.statuses().into_iter().find(|(n, _)| n == stage).unwrap_or_else(|| panic!("no stage {stage}\n{self}")).1
    }

    /// One stage's entry (status, outputs, metrics) from `--json` output.
    pub fn stage(&self, stage: &str) -> Value {
        let stages = self.json()["stages"].as_array().unwrap_or_else(|| panic!("no stages\n{self}")).clone();
        stages.into_iter().find(|s| s["name"] == stage).unwrap_or_else(|| panic!("no stage {stage}\n{self}"))
    }
}

/// The repository's test fixtures.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Copies a fixture folder (a model, a dataset tree) to `dst`.
pub fn copy_dir(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).unwrap();
    for entry in fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dst.join(entry.file_name()));
        } else {
            fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
        }
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}\n--- stdout\n{}\n--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

impl Project {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join(".git")).unwrap();
        fs::create_dir(dir.path().join("pipelines")).unwrap();
        Self { dir, env: Default::default() }
    }

    /// Sets an environment variable for every later swift command of this project.
    pub fn set_env(&self, key: &str, value: &str) {
        let mut env = self.env.borrow_mut();
        env.retain(|(k, _)| k != key);
        env.push((key.to_string(), value.to_string()));
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn write(&self, rel: &str, content: &str) {
        let path = self.path(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, content).unwrap();
    }

    pub fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.path(rel)).unwrap_or_default()
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_swift"));
        cmd.args(args).current_dir(self.root()).stdin(Stdio::null());
        // Nothing from the developer's environment leaks in: no shared cache, no
        // Hub token or endpoint, no HF cache of theirs.
        for key in ["SWIFT_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH"] {
            cmd.env_remove(key);
        }
        cmd.env("TERM", "dumb").env("HF_HOME", self.path(".hf-home-unset"));
        for (key, value) in self.env.borrow().iter() {
            cmd.env(key, value);
        }
        cmd
    }

    pub fn swift(&self, args: &[&str]) -> Run {
        let output: Output = self.command(args).output().unwrap();
        let run = Run {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        };
        assert!(!run.stderr.contains("panicked"), "swift panicked\n{run}");
        run
    }

    /// `swift run MANIFEST --json EXTRA…`, expecting `code`.
    pub fn run(&self, manifest: &str, extra: &[&str], code: i32) -> Run {
        let mut args = vec!["run", manifest, "--json"];
        args.extend(extra);
        let run = self.swift(&args);
        assert_eq!(run.code, code, "swift {args:?}\n{run}");
        run
    }

    pub fn spawn(&self, args: &[&str]) -> Child {
        self.command(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    }

    /// Lines of the trace file written by test-step stages: (event, stage, ms).
    pub fn trace(&self) -> Vec<(String, String, u128)> {
        self.read("trace.log")
            .lines()
            .map(|l| {
                let parts: Vec<&str> = l.split(' ').collect();
                (parts[0].to_string(), parts[1].to_string(), parts[2].parse().unwrap())
            })
            .collect()
    }

    /// Stages that started, in order.
    pub fn started(&self) -> Vec<String> {
        self.trace().into_iter().filter(|(e, _, _)| e == "start").map(|(_, s, _)| s).collect()
    }

    /// Waits (up to 30 s) until `check` holds.
    pub fn wait_for(&self, what: &str, check: impl Fn(&Self) -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !check(self) {
            assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// A chain a → b → c plus an independent d, all test-step stages tracing to trace.log.
pub const CHAIN: &str = r#"
[pipeline]
name = "chain"

[stages.a]
kind = "test-step"
text = "alpha"
files = ["data/input.txt"]
trace = "trace.log"

[stages.b]
kind = "test-step"
text = "beta"
inputs = ["a"]
trace = "trace.log"

[stages.c]
kind = "test-step"
text = "gamma"
inputs = ["b"]
trace = "trace.log"

[stages.d]
kind = "test-step"
text = "delta"
trace = "trace.log"
"#;

/// A project holding the CHAIN manifest and its input file.
pub fn chain_project() -> Project {
    let project = Project::new();
    project.write("pipelines/chain.toml", CHAIN);
    project.write("data/input.txt", "input v1\n");
    project
}

/// Lays out `files` as huggingface_hub caches repository `repo` (`models/ORG/NAME`
/// or `datasets/ORG/NAME`) at commit `sha`: blobs, snapshot links, refs/main.
pub fn populate_hf_cache(cache: &Path, repo: &str, sha: &str, files: &[(String, Vec<u8>)]) {
    let (kind, name) = repo.split_once('/').unwrap();
    let dir = cache.join(format!("{kind}--{}", name.replace('/', "--")));
    std::fs::create_dir_all(dir.join("blobs")).unwrap();
    std::fs::create_dir_all(dir.join("refs")).unwrap();
    std::fs::write(dir.join("refs/main"), sha).unwrap();
    for (path, bytes) in files {
        let blob = blake3::hash(bytes).to_hex().to_string();
        std::fs::write(dir.join("blobs").join(&blob), bytes).unwrap();
        let link = dir.join("snapshots").join(sha).join(path);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        let depth = path.matches('/').count() + 2;
        std::os::unix::fs::symlink(format!("{}blobs/{blob}", "../".repeat(depth)), &link).unwrap();
    }
}

/// Every file under `dir`, as (path relative to `dir` with `prefix`, bytes).
pub fn files_under(dir: &Path, prefix: &str) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = format!("{prefix}{}", path.file_name().unwrap().to_str().unwrap());
        if path.is_dir() {
            out.extend(files_under(&path, &format!("{name}/")));
        } else {
            out.push((name, std::fs::read(&path).unwrap()));
        }
    }
    out
}
