//! Stage kinds that are part of swift's design but not in this build yet. They
//! are registered so that their names and outputs are known (and `swift dag`
//! can show a full pipeline), and a manifest that uses one gets a clear error
//! instead of "unknown kind".

use swift_engine::kind::{CompileCtx, OutputDecl, OutputType, StageKind, StagePlan};
use swift_engine::ManifestError;

/// A kind whose implementation is still to come.
pub struct Planned {
    name: &'static str,
    outputs: &'static [OutputDecl],
}

impl StageKind for Planned {
    fn name(&self) -> &'static str {
        self.name
    }
    fn version(&self) -> u32 {
        0
    }
    fn outputs(&self) -> &'static [OutputDecl] {
        self.outputs
    }
    fn compile(&self, ctx: &mut CompileCtx<'_>, _params: &toml::Table) -> Result<Box<dyn StagePlan>, ManifestError> {
        Err(ctx
            .error(&["kind"], format!("stage kind `{}` is not available in this build of swift yet", self.name))
            .with_help("this build runs `download`, `preprocess`, `finetune`, `quantize` and `eval` stages; see docs/manifest.md for what each kind will do"))
    }
}

const fn out(name: &'static str, ty: OutputType) -> OutputDecl {
    OutputDecl { name, ty }
}

const EXPORT: &[OutputDecl] = &[out("export", OutputType::Export)];

/// The kinds still to come, with the outputs ARCHITECTURE.md gives them.
pub fn kinds() -> Vec<Planned> {
    [("export", EXPORT)]
        .into_iter()
        .map(|(name, outputs)| Planned { name, outputs })
        .collect()
}
