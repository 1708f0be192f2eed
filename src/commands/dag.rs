//! `swift dag`: the stage graph as text or Graphviz.

use swift_engine::pipeline::InputRef;

use super::{compile_or_exit, Exit, ManifestArgs};

/// Arguments of `swift dag`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    manifest: ManifestArgs,
    /// Print Graphviz `dot` text.
    #[arg(long)]
    dot: bool,
}

pub fn exec(args: Args) -> anyhow::Result<Exit> {
    let pipeline = match compile_or_exit(&args.manifest, false) {
        Ok(pipeline) => pipeline,
        Err(exit) => return Ok(exit),
    };
    if args.dot {
        out!("{}", pipeline.to_dot());
        return Ok(Exit::Success);
    }
    outln!("{} ({} stages, in run order)", pipeline.manifest.name, pipeline.nodes.len());
    for &i in &pipeline.order {
        let node = &pipeline.nodes[i];
        let sources: Vec<String> = node
            .inputs
            .iter()
            .map(|input| match &input.source {
                InputRef::Stage { stage, output } => format!("{}.{output}", pipeline.nodes[*stage].name),
                InputRef::Local { shown, .. } => shown.clone(),
            })
            .collect();
        let outputs: Vec<&str> = node.plan.outputs().iter().map(|o| o.name).collect();
        outln!("  {} ({}) ← [{}] → [{}]", node.name, node.kind, sources.join(", "), outputs.join(", "));
    }
    Ok(Exit::Success)
}
