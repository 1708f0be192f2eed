use crate::util::Project;

/// Runs a bad manifest and checks exit 2, the JSON error's location and message.
fn rejects(manifest: &str, extra: &[&str], line: u64, column: u64, needle: &str) {
    let p = Project::new();
    p.write("data/present.txt", "x");
    p.write("pipelines/bad.toml", manifest);
    let run = p.run("pipelines/bad.toml", extra, 2);
    let json = run.json();
    assert_eq!(json["ok"], false, "{run}");
    let error = &json["error"];
    let message = error["message"].as_str().unwrap();
    assert!(message.contains(needle), "expected {needle:?} in {message:?}\n{run}");
    assert_eq!((error["line"].as_u64().unwrap(), error["column"].as_u64().unwrap()), (line, column), "{run}");
    assert!(run.stderr.contains(&format!(":{line}:{column}: ")), "human message names line:column\n{run}");
    // The other commands reject it the same way.
    let status = p.swift(&["status", "pipelines/bad.toml"]);
    assert_eq!(status.code, 2, "{status}");
}

#[test]
fn unknown_key_suggests_the_right_one() {
    rejects("[stages.a]\nkind = \"test-step\"\ntxet = \"x\"\n", &[], 3, 1, "did you mean `text`?");
}

#[test]
fn wrong_type_points_at_the_value() {
    rejects("[stages.a]\nkind = \"test-step\"\nsleep_ms = \"soon\"\n", &[], 3, 12, "invalid type");
}

#[test]
fn reference_to_a_missing_stage_suggests_a_name() {
    rejects(
        "[stages.alpha]\nkind = \"test-step\"\n[stages.b]\nkind = \"test-step\"\ninputs = [\"alhpa\"]\n",
        &[],
        5,
        11,
        "did you mean `alpha`?",
    );
}

#[test]
fn cycle_prints_its_path() {
    rejects(
        "[stages.a]\nkind = \"test-step\"\ninputs = [\"c\"]\n[stages.b]\nkind = \"test-step\"\ninputs = [\"a\"]\n[stages.c]\nkind = \"test-step\"\ninputs = [\"b\"]\n",
        &[],
        3,
        11,
        "a → c → b → a",
    );
}

#[test]
fn missing_input_file_is_named() {
    rejects("[stages.a]\nkind = \"test-step\"\nfiles = [\"data/absent.txt\"]\n", &[], 3, 10, "data/absent.txt");
}

#[test]
fn invalid_toml_is_located() {
    rejects("[stages.a]\nkind = \"test-step\"\ntext = \"unterminated\n", &[], 3, 21, "invalid TOML");
}

#[test]
fn unknown_kind_suggests_one() {
    rejects("[stages.a]\nkind = \"test-stpe\"\n", &[], 2, 8, "did you mean `test-step`?");
}

#[test]
fn unset_environment_variable_is_named() {
    rejects("[stages.a]\nkind = \"test-step\"\ntext = \"${SWIFT_SURELY_UNSET_VAR}\"\n", &[], 3, 8, "SWIFT_SURELY_UNSET_VAR");
}

#[test]
fn unknown_top_level_key() {
    rejects("[pipline]\nname = \"x\"\n[stages.a]\nkind = \"test-step\"\n", &[], 1, 2, "did you mean `pipeline`?");
}

#[test]
fn bad_set_override_names_the_stage() {
    let p = Project::new();
    p.write("pipelines/ok.toml", "[stages.alpha]\nkind = \"test-step\"\n");
    let run = p.run("pipelines/ok.toml", &["--set", "stages.alpah.text=x"], 2);
    assert_eq!(run.json()["error"]["file"], "--set");
    assert!(run.json()["error"]["message"].as_str().unwrap().contains("did you mean `alpha`?"), "{run}");
}

#[test]
fn unknown_stage_on_the_command_line_is_a_usage_error() {
    let p = Project::new();
    p.write("pipelines/ok.toml", "[stages.alpha]\nkind = \"test-step\"\n");
    let run = p.run("pipelines/ok.toml", &["--only", "alpah"], 2);
    assert!(run.stderr.contains("did you mean `alpha`?"), "{run}");
}

#[test]
fn devices_are_refused_where_they_were_chosen() {
    let eval = "[stages.e]\nkind = \"eval\"\nmodels = [\"m\"]\nsuites = { mmlu = \"data/present.txt\" }\n";
    // A CUDA device on a CPU-only build, at the stage's own key…
    rejects(&format!("{eval}device = \"cuda:0\"\n"), &[], 5, 10, "computes on the CPU only");
    // …at [pipeline] device…
    rejects(&format!("[pipeline]\ndevice = \"cuda:1\"\n{eval}"), &[], 2, 10, "computes on the CPU only");
    // …a device on a kind that computes on none…
    rejects("[stages.d]\nkind = \"test-step\"\ndevice = \"cpu\"\n", &[], 3, 1, "does not compute on a device");
    // …and a bad --device.
    let p = Project::new();
    p.write("pipelines/x.toml", "[stages.d]\nkind = \"test-step\"\n");
    let run = p.run("pipelines/x.toml", &["--device", "tpu"], 2);
    assert!(run.stderr.contains("--device") && run.stderr.contains("is not a device"), "{run}");
    let run = p.run("pipelines/x.toml", &["--device", "cpu"], 0);
    assert_eq!(run.status("d"), "ran", "{run}");
}

/// A dataset that is a FIFO, a device or a symbolic link loop is named for
/// what it is, at the key that gives it (not "Not a directory").
#[test]
fn special_files_and_link_loops_as_inputs_say_what_they_are() {
    let download = |path: &str| format!("[stages.a]\nkind = \"download\"\ndataset = \"{path}\"\n");
    rejects(&download("/dev/zero"), &[], 3, 11, "input `/dev/zero` is a character device, not a file or a folder");
    let p = Project::new();
    assert!(std::process::Command::new("mkfifo").arg(p.path("data.fifo")).status().unwrap().success());
    std::os::unix::fs::symlink("loop-b", p.path("loop-a")).unwrap();
    std::os::unix::fs::symlink("loop-a", p.path("loop-b")).unwrap();
    for (path, needle) in [("data.fifo", "is a named pipe (FIFO)"), ("loop-a", "is a symbolic link that leads nowhere")] {
        p.write("pipelines/bad.toml", &download(path));
        let run = p.run("pipelines/bad.toml", &[], 2);
        assert!(run.json()["error"]["message"].as_str().unwrap().contains(needle), "{run}");
    }
}
