//! Compiling a manifest into a DAG of stages: every stage typed by its kind,
//! every reference resolved to a stage's output, cycles rejected with their path,
//! and a topological order that follows the file where the graph allows.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use petgraph::graph::{DiGraph, NodeIndex};

use crate::error::{did_you_mean, ManifestError};
use crate::kind::{CompileCtx, InputSource, Registry, StagePlan};
use crate::manifest::Manifest;
use crate::placement::{DeviceSpec, Resources};

/// Where a compiled input comes from.
#[derive(Clone, Debug)]
pub enum InputRef {
    /// Output `output` of the stage at `stage` (an index into [`Pipeline::nodes`]).
    Stage {
        /// Producer index.
        stage: usize,
        /// Output name.
        output: String,
    },
    /// A local file or folder.
    Local {
        /// Absolute path.
        path: PathBuf,
        /// As written in the manifest.
        shown: String,
    },
}

/// A compiled input.
#[derive(Clone, Debug)]
pub struct NodeInput {
    /// Input name.
    pub name: String,
    /// Manifest key path it came from.
    pub field: Vec<String>,
    /// Its source.
    pub source: InputRef,
}

/// A compiled stage.
pub struct StageNode {
    /// Stage name.
    pub name: String,
    /// Kind name.
    pub kind: String,
    /// Kind version.
    pub kind_version: u32,
    /// The kind's plan.
    pub plan: Box<dyn StagePlan>,
    /// Inputs in declaration order.
    pub inputs: Vec<NodeInput>,
    /// The Slurm resources its manifest asks for: the stage's `resources` over
    /// `[pipeline.resources]` (the kind's defaults fill the rest at submission).
    pub resources: Resources,
    /// The device it computes on, for kinds that compute on one.
    pub device: Option<DeviceSpec>,
    /// Whether its kind can run as several data-parallel processes.
    pub data_parallel: bool,
    /// Whether its kind's outputs are the same bits on every machine
    /// ([`crate::kind::StageKind::portable`]); see [`Pipeline::portable_outputs`].
    pub portable: bool,
}

impl StageNode {
    /// Indices of the stages this one reads from.
    pub fn deps(&self) -> impl Iterator<Item = usize> + '_ {
        self.inputs.iter().filter_map(|i| match i.source {
            InputRef::Stage { stage, .. } => Some(stage),
            InputRef::Local { .. } => None,
        })
    }
}

/// A compiled pipeline.
pub struct Pipeline {
    /// The manifest it came from.
    pub manifest: Manifest,
    /// Stages in file order.
    pub nodes: Vec<StageNode>,
    /// Topological order (indices into `nodes`).
    pub order: Vec<usize>,
    graph: DiGraph<usize, ()>,
}

impl Pipeline {
    /// Whether each stage's outputs are the same bits on every machine: its
    /// kind's are, and so are those of every stage upstream of it.
    pub fn portable_outputs(&self) -> Vec<bool> {
        let mut portable = vec![true; self.nodes.len()];
        for &i in &self.order {
            portable[i] = self.nodes[i].portable && self.nodes[i].deps().all(|d| portable[d]);
        }
        portable
    }

    /// Compiles a manifest with the kinds of `registry`.
    pub fn compile(manifest: Manifest, registry: &Registry) -> Result<Self, ManifestError> {
        let locator = manifest.locator().clone();
        let names: Vec<&str> = manifest.stages.keys().map(String::as_str).collect();
        let index_of: HashMap<&str, usize> = names.iter().enumerate().map(|(i, &n)| (n, i)).collect();
        let mut compiled = Vec::new();
        for decl in manifest.stages.values() {
            let kind_path = vec!["stages".to_string(), decl.name.clone(), "kind".to_string()];
            let Some(kind) = registry.get(&decl.kind) else {
                let error = locator.error(&kind_path, false, format!("unknown stage kind `{}`", decl.kind));
                let known: Vec<&str> = registry.names().collect();
                return Err(match did_you_mean(&decl.kind, known.iter().copied()) {
                    Some(best) => error.with_help(format!("did you mean `{best}`?")),
                    None => error.with_help(format!("known kinds: {}", known.join(", "))),
                });
            };
            if decl.placement.device.is_some() && !kind.uses_device() {
                let at = ["stages", decl.name.as_str(), "device"].map(String::from);
                return Err(locator
                    .error(&at, true, format!("a `{}` stage does not compute on a device", decl.kind))
                    .with_help("remove `device`; it applies to finetune, quantize and eval stages"));
            }
            let mut ctx = CompileCtx::new(&manifest, &decl.name);
            let plan = kind.compile(&mut ctx, &decl.params)?;
            let device = kind.uses_device().then(|| manifest.device_of(&decl.name).0);
            let placement = (device, kind.data_parallel(), kind.portable());
            compiled.push((decl.name.clone(), kind.name().to_string(), kind.version(), plan, ctx.into_inputs(), placement));
        }

        let mut resolved_inputs = Vec::new();
        for (name, _, _, _, inputs, _) in &compiled {
            let mut resolved = Vec::new();
            for input in inputs {
                let source = match &input.source {
                    InputSource::Local { path, shown } => InputRef::Local { path: path.clone(), shown: shown.clone() },
                    InputSource::Stage { stage, expects } => {
                        let Some(&index) = index_of.get(stage.as_str()) else {
                            let error = locator.error(&input.field, false, format!("there is no stage `{stage}`"));
                            let others = names.iter().copied().filter(|n| n != name);
                            return Err(match did_you_mean(stage, others) {
                                Some(best) => error.with_help(format!("did you mean `{best}`?")),
                                None => error.with_help(format!("stages in this manifest: {}", names.join(", "))),
                            });
                        };
                        let producer = &compiled[index].3;
                        let Some(output) = producer.outputs().into_iter().find(|o| o.ty == *expects) else {
                            return Err(locator.error(
                                &input.field,
                                false,
                                format!(
                                    "stage `{stage}` ({}) does not yield {}, which `{}` expects",
                                    compiled[index].1,
                                    expects.noun(),
                                    input.field.last().map_or("this key", String::as_str)
                                ),
                            ));
                        };
                        InputRef::Stage { stage: index, output: output.name.to_string() }
                    }
                };
                resolved.push(NodeInput { name: input.name.clone(), field: input.field.clone(), source });
            }
            resolved_inputs.push(resolved);
        }
        let nodes: Vec<StageNode> = compiled
            .into_iter()
            .zip(resolved_inputs)
            .map(|((name, kind, kind_version, plan, _, (device, data_parallel, portable)), inputs)| {
                let resources = manifest.stages[&name].placement.resources.over(&manifest.pipeline.resources);
                StageNode { name, kind, kind_version, plan, inputs, resources, device, data_parallel, portable }
            })
            .collect();

        let mut graph = DiGraph::new();
        let ids: Vec<NodeIndex> = (0..nodes.len()).map(|i| graph.add_node(i)).collect();
        for (i, node) in nodes.iter().enumerate() {
            for dep in node.deps() {
                graph.update_edge(ids[dep], ids[i], ());
            }
        }
        if let Some(cycle) = find_cycle(&graph, &nodes) {
            let first = &nodes[cycle[0]];
            let next = cycle[1 % cycle.len()];
            let field = first
                .inputs
                .iter()
                .find(|i| matches!(i.source, InputRef::Stage { stage, .. } if stage == next))
                .map(|i| i.field.clone())
                .unwrap_or_default();
            let path: Vec<&str> = cycle.iter().chain(std::iter::once(&cycle[0])).map(|&i| nodes[i].name.as_str()).collect();
            return Err(locator
                .error(&field, false, format!("stages depend on each other in a cycle: {}", path.join(" → ")))
                .with_help("a stage cannot depend on its own output; remove one of these references"));
        }
        let order = stable_topological_order(&nodes);
        Ok(Self { manifest, nodes, order, graph })
    }

    /// The index of the stage called `name`.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// `name`'s index, or a usage error that suggests the closest name.
    pub fn require(&self, name: &str) -> Result<usize, String> {
        self.index(name).ok_or_else(|| {
            let names = self.nodes.iter().map(|n| n.name.as_str());
            match did_you_mean(name, names) {
                Some(best) => format!("there is no stage `{name}` in {}; did you mean `{best}`?", self.manifest.display_path()),
                None => format!("there is no stage `{name}` in {}", self.manifest.display_path()),
            }
        })
    }

    /// The stage and everything it depends on, transitively.
    pub fn with_ancestors(&self, index: usize) -> BTreeSet<usize> {
        self.reach(index, petgraph::Direction::Incoming)
    }

    /// The stage and everything that depends on it, transitively.
    pub fn with_descendants(&self, index: usize) -> BTreeSet<usize> {
        self.reach(index, petgraph::Direction::Outgoing)
    }

    fn reach(&self, index: usize, direction: petgraph::Direction) -> BTreeSet<usize> {
        let mut seen = BTreeSet::from([index]);
        let mut stack = vec![NodeIndex::new(index)];
        while let Some(node) = stack.pop() {
            for next in self.graph.neighbors_directed(node, direction) {
                if seen.insert(self.graph[next]) {
                    stack.push(next);
                }
            }
        }
        seen
    }

    /// Graphviz text of the DAG.
    pub fn to_dot(&self) -> String {
        let mut dot = format!("digraph {:?} {{\n  rankdir=LR;\n", self.manifest.name);
        for &i in &self.order {
            dot.push_str(&format!("  {:?} [label=\"{}\\n({})\"];\n", self.nodes[i].name, self.nodes[i].name, self.nodes[i].kind));
        }
        for &i in &self.order {
            for input in &self.nodes[i].inputs {
                if let InputRef::Stage { stage, output } = &input.source {
                    dot.push_str(&format!(
                        "  {:?} -> {:?} [label=\"{} → {}\"];\n",
                        self.nodes[*stage].name, self.nodes[i].name, output, input.name
                    ));
                }
            }
        }
        dot.push_str("}\n");
        dot
    }
}

/// Kahn's algorithm, always taking the ready stage that comes first in the file.
fn stable_topological_order(nodes: &[StageNode]) -> Vec<usize> {
    // Each stage's distinct parents, and who depends on each stage: O(stages + inputs).
    let mut remaining = Vec::with_capacity(nodes.len());
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    for (j, node) in nodes.iter().enumerate() {
        let parents: BTreeSet<usize> = node.deps().collect();
        remaining.push(parents.len());
        for parent in parents {
            dependents[parent].push(j);
        }
    }
    let mut ready: BTreeSet<usize> = (0..nodes.len()).filter(|&i| remaining[i] == 0).collect();
    let mut order = Vec::with_capacity(nodes.len());
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &j in &dependents[i] {
            remaining[j] -= 1;
            if remaining[j] == 0 {
                ready.insert(j);
            }
        }
    }
    order
}

/// One cycle, as stage indices in dependency order, if the graph has any.
fn find_cycle(graph: &DiGraph<usize, ()>, nodes: &[StageNode]) -> Option<Vec<usize>> {
    let scc = petgraph::algo::tarjan_scc(graph)
        .into_iter()
        .filter(|c| c.len() > 1 || graph.contains_edge(c[0], c[0]))
        .min_by_key(|c| c.iter().map(|n| graph[*n]).min())?;
    let members: BTreeSet<usize> = scc.iter().map(|n| graph[*n]).collect();
    let start = *members.first()?;
    // Walk "depends on" edges inside the component until we return to start.
    let mut path = vec![start];
    let mut seen = BTreeSet::from([start]);
    let mut current = start;
    loop {
        let next = nodes[current].deps().filter(|d| members.contains(d)).min()?;
        if next == start {
            return Some(path);
        }
        if !seen.insert(next) {
            let at = path.iter().position(|&p| p == next)?;
            return Some(path[at..].to_vec());
        }
        path.push(next);
        current = next;
    }
}
