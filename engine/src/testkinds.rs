//! Stage kinds for swift's own tests, compiled only with the `test-kinds`
//! feature (the root package's dev-dependency turns it on for `cargo test`).
//!
//! `test-step` concatenates its text and its inputs into `out.txt`, and can sleep
//! (checking for Ctrl-C), fail (always, or while a file exists, which a test
//! creates to make a rerun of the same key fail), claim a GPU slot, and append
//! `start`/`end` lines with timestamps to a trace file so tests can see what
//! ran and what overlapped. `test-float` is the same step standing for a kind
//! whose outputs follow the machine's floating point: it is not portable, and
//! appends `SWIFT_TEST_MACHINE` (when set) to its output, as another CPU would
//! change a trained adapter's last bits.

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use crate::error::ManifestError;
use crate::kind::{Cancelled, CompileCtx, OutputDecl, OutputType, OutputValue, Resource, RunCtx, StageKind, StagePlan, StageResult};

/// Every test-only kind.
pub fn kinds() -> Vec<Box<dyn StageKind>> {
    vec![Box::new(TestStep { float: false }), Box::new(TestStep { float: true })]
}

struct TestStep {
    /// `test-float`: not portable, and its output depends on `SWIFT_TEST_MACHINE`.
    float: bool,
}

#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct Params {
    #[serde(default)]
    inputs: Vec<String>,
    #[serde(default)]
    files: Vec<String>,
    #[serde(default)]
    text: String,
    #[serde(default)]
    sleep_ms: u64,
    #[serde(default)]
    fail: bool,
    #[serde(default)]
    fail_if_exists: Option<String>,
    #[serde(default)]
    gpu: Option<String>,
    #[serde(default)]
    trace: Option<String>,
    /// Keep sleeping when cancelled (a stage that does not stop at once).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    ignore_cancel: bool,
}

const OUTPUTS: &[OutputDecl] = &[OutputDecl { name: "out", ty: OutputType::Dataset }];

impl StageKind for TestStep {
    fn name(&self) -> &'static str {
        if self.float {
            "test-float"
        } else {
            "test-step"
        }
    }
    fn portable(&self) -> bool {
        !self.float
    }
    fn version(&self) -> u32 {
        1
    }
    fn outputs(&self) -> &'static [OutputDecl] {
        OUTPUTS
    }
    fn compile(&self, ctx: &mut CompileCtx<'_>, params: &toml::Table) -> Result<Box<dyn StagePlan>, ManifestError> {
        let params: Params = ctx.parse(params)?;
        for (i, stage) in params.inputs.iter().enumerate() {
            ctx.stage_input(&format!("in{i}"), &["inputs", &i.to_string()], stage, OutputType::Dataset);
        }
        for (i, file) in params.files.iter().enumerate() {
            ctx.local_input(&format!("file{i}"), &["files", &i.to_string()], file)?;
        }
        let trace = params.trace.as_ref().map(|t| ctx.root().join(t));
        Ok(Box::new(TestPlan { params, trace, root: ctx.root().to_path_buf(), float: self.float }))
    }
}

struct TestPlan {
    float: bool,
    params: Params,
    trace: Option<std::path::PathBuf>,
    root: std::path::PathBuf,
}

impl TestPlan {
    fn trace(&self, ctx: &RunCtx<'_>, event: &str) -> anyhow::Result<()> {
        if let Some(path) = &self.trace {
            let ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
            let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
            file.write_all(format!("{event} {} {ms} {}\n", ctx.stage, std::process::id()).as_bytes())?;
        }
        Ok(())
    }
}

impl StagePlan for TestPlan {
    fn params(&self) -> serde_json::Value {
        serde_json::to_value(&self.params).expect("params serialize")
    }
    fn outputs(&self) -> Vec<OutputDecl> {
        OUTPUTS.to_vec()
    }
    fn resource(&self) -> Resource {
        self.params.gpu.clone().map_or(Resource::Cpu, Resource::Gpu)
    }
    fn run(&self, ctx: &RunCtx<'_>) -> anyhow::Result<StageResult> {
        self.trace(ctx, "start")?;
        let steps = self.params.sleep_ms / 10;
        for step in 0..steps {
            if ctx.cancelled() && !self.params.ignore_cancel {
                self.trace(ctx, "cancelled")?;
                return Err(Cancelled.into());
            }
            ctx.progress(step, steps, "sleeping");
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.params.fail {
            anyhow::bail!("test-step failed because `fail = true`");
        }
        if let Some(path) = &self.params.fail_if_exists {
            if self.root.join(path).exists() {
                anyhow::bail!("test-step failed because {path} exists");
            }
        }
        let mut text = self.params.text.clone();
        for (name, input) in &ctx.inputs {
            let content = if input.path.is_dir() {
                let mut names: Vec<_> = std::fs::read_dir(&input.path)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
                names.sort();
                names.iter().map(std::fs::read_to_string).collect::<Result<Vec<_>, _>>()?.concat()
            } else {
                std::fs::read_to_string(&input.path)?
            };
            text.push_str(&format!("\n[{name}]\n{content}"));
        }
        if self.float {
            text.push_str(&std::env::var("SWIFT_TEST_MACHINE").unwrap_or_default());
        }
        let out = ctx.out_dir.join("out.txt");
        std::fs::write(&out, &text)?;
        self.trace(ctx, "end")?;
        let mut result = StageResult::default();
        result.outputs.insert("out".to_string(), OutputValue::Path(out));
        result.metrics.insert("bytes".to_string(), text.len().into());
        Ok(result)
    }
}
