//! Where stages run: the executor (`local` or `slurm`), the device a stage
//! computes on, and the Slurm resources its job asks for.
//!
//! None of this enters a stage key: the same inputs give the same outputs
//! wherever they are computed (the device is recorded in provenance).
//!
//! Precedence, highest first: the command line (`--executor`, `--device`), the
//! stage's table (`device`, `resources`), `[pipeline]` (`executor`,
//! `device`, `[pipeline.resources]`), then the defaults of the stage's kind.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Which engine runs the stages that miss the cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Executor {
    /// This process, on this machine (the default).
    #[default]
    Local,
    /// One Slurm job per stage, over a cache on a shared filesystem.
    Slurm,
}

impl FromStr for Executor {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "local" => Ok(Executor::Local),
            "slurm" => Ok(Executor::Slurm),
            other => Err(format!("unknown executor `{other}`: use `local` or `slurm`")),
        }
    }
}

/// What a stage's Slurm job asks for. Every field is optional: unset fields
/// fall back to `[pipeline.resources]`, then to the kind's defaults, then to the
/// cluster's own defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU cores (`--cpus-per-task`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Memory per node, Slurm's syntax: `500M`, `16G` (`--mem`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem: Option<String>,
    /// Wall-time limit, Slurm's syntax: `90`, `4:00:00`, `2-00:00:00` (`--time`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// GPUs per node (`--gpus-per-node`); default 1 for a stage on a CUDA device, else none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u32>,
    /// Nodes (`--nodes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<u32>,
    /// Processes per node (`--ntasks-per-node`); default 1, or for a
    /// data-parallel fine-tune one per GPU (`gpus`). Several processes in all
    /// make a data-parallel fine-tune.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tasks_per_node: Option<u32>,
    /// The partition (`--partition`); default: the cluster's default partition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// Extra `sbatch` arguments, appended as given (`["--qos=high"]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sbatch: Vec<String>,
}

impl Resources {
    /// `self`, with every unset field taken from `lower`; `sbatch` lists add up
    /// (the lower level's first).
    pub fn over(&self, lower: &Resources) -> Resources {
        Resources {
            cpus: self.cpus.or(lower.cpus),
            mem: self.mem.clone().or_else(|| lower.mem.clone()),
            time: self.time.clone().or_else(|| lower.time.clone()),
            gpus: self.gpus.or(lower.gpus),
            nodes: self.nodes.or(lower.nodes),
            tasks_per_node: self.tasks_per_node.or(lower.tasks_per_node),
            partition: self.partition.clone().or_else(|| lower.partition.clone()),
            sbatch: lower.sbatch.iter().chain(&self.sbatch).cloned().collect(),
        }
    }

    /// Processes per node: `tasks_per_node`, else one per GPU for a stage
    /// that trains data-parallel, else 1.
    pub fn tasks_per_node(&self, data_parallel: bool) -> u32 {
        let per_gpu = self.gpus.filter(|&g| g > 0 && data_parallel);
        self.tasks_per_node.or(per_gpu).unwrap_or(1)
    }

    /// How many processes the job starts: nodes × tasks per node.
    pub fn world_size(&self, data_parallel: bool) -> u32 {
        self.nodes.unwrap_or(1) * self.tasks_per_node(data_parallel)
    }

    /// Checks the values' syntax; the message names the field and the fix.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.cpus == Some(0) {
            return Err(("cpus", "`cpus` must be at least 1".to_string()));
        }
        if self.nodes == Some(0) {
            return Err(("nodes", "`nodes` must be at least 1".to_string()));
        }
        if self.tasks_per_node == Some(0) {
            return Err(("tasks_per_node", "`tasks_per_node` must be at least 1".to_string()));
        }
        if let Some(mem) = &self.mem {
            let digits = mem.trim_end_matches(['K', 'M', 'G', 'T']);
            if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) || mem.len() - digits.len() > 1 {
                return Err(("mem", format!("`mem = \"{mem}\"` is not Slurm's memory syntax: write e.g. \"16G\" or \"500M\"")));
            }
        }
        if let Some(time) = &self.time {
            let ok = !time.is_empty()
                && time.chars().all(|c| c.is_ascii_digit() || c == ':' || c == '-')
                && time.split([':', '-']).all(|part| !part.is_empty());
            if !ok {
                return Err((
                    "time",
                    format!("`time = \"{time}\"` is not Slurm's time syntax: write minutes (\"90\"), \"H:MM:SS\" or \"D-HH:MM:SS\""),
                ));
            }
        }
        if let Some(bad) = self.sbatch.iter().find(|a| !a.starts_with('-')) {
            return Err(("sbatch", format!("`sbatch` holds `{bad}`, which is not an option: write e.g. [\"--qos=high\"]")));
        }
        Ok(())
    }
}

/// Defaults per stage kind: what a stage of that kind usually needs. `cpus` is
/// lowered to what the partition's nodes have when the cluster says so.
pub fn kind_defaults(kind: &str) -> Resources {
    let (cpus, time) = match kind {
        "download" => (2, "4:00:00"),
        "preprocess" => (8, "4:00:00"),
        "finetune" => (8, "2-00:00:00"),
        "quantize" => (8, "12:00:00"),
        "eval" => (8, "12:00:00"),
        "export" => (4, "4:00:00"),
        _ => (1, "1:00:00"),
    };
    Resources { cpus: Some(cpus), time: Some(time.to_string()), ..Resources::default() }
}

/// A device a stage computes on, as written: `auto`, `cpu`, `cuda:N`, and for
/// `devices` a set of CUDA devices (`cuda:0-3`, `cuda:0,2`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// CUDA device 0 when this swift has CUDA and the machine a GPU, else the CPU.
    Auto,
    /// The CPU.
    Cpu,
    /// These CUDA devices (one for `cuda:N`).
    Cuda(Vec<u32>),
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a device: write \"auto\", \"cpu\", \"cuda:0\", or for several GPUs \"cuda:0-3\" or \"cuda:0,2\"");
        match s {
            "auto" => return Ok(DeviceSpec::Auto),
            "cpu" => return Ok(DeviceSpec::Cpu),
            "cuda" => return Ok(DeviceSpec::Cuda(vec![0])),
            _ => {}
        }
        let list = s.strip_prefix("cuda:").ok_or_else(bad)?;
        let mut ids = Vec::new();
        for part in list.split(',') {
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b): (u32, u32) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                    if a > b {
                        return Err(bad());
                    }
                    ids.extend(a..=b);
                }
                None => ids.push(part.parse().map_err(|_| bad())?),
            }
        }
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != ids.len() {
            return Err(format!("`{s}` names a device twice"));
        }
        Ok(DeviceSpec::Cuda(ids))
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(ids) => {
                let list: Vec<String> = ids.iter().map(u32::to_string).collect();
                write!(f, "cuda:{}", list.join(","))
            }
        }
    }
}

impl DeviceSpec {
    /// How many devices (1 for `auto` and `cpu`).
    pub fn count(&self) -> usize {
        match self {
            DeviceSpec::Cuda(ids) => ids.len(),
            _ => 1,
        }
    }

    /// Whether it asks for CUDA explicitly.
    pub fn is_cuda(&self) -> bool {
        matches!(self, DeviceSpec::Cuda(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_print() {
        assert_eq!("cuda:0-3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(vec![0, 1, 2, 3]));
        assert_eq!("cuda:2,0".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(vec![2, 0]));
        assert_eq!("cuda:1".parse::<DeviceSpec>().unwrap().to_string(), "cuda:1");
        assert_eq!("auto".parse::<DeviceSpec>().unwrap(), DeviceSpec::Auto);
        for bad in ["gpu", "cuda:", "cuda:3-1", "cuda:0,0", "cuda:x"] {
            assert!(bad.parse::<DeviceSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn resources_merge_upward_and_validate() {
        let stage = Resources { cpus: Some(4), sbatch: vec!["--qos=high".into()], ..Default::default() };
        let pipeline = Resources { cpus: Some(2), mem: Some("8G".into()), sbatch: vec!["--account=lab".into()], ..Default::default() };
        let merged = stage.over(&pipeline).over(&kind_defaults("finetune"));
        assert_eq!(merged.cpus, Some(4));
        assert_eq!(merged.mem.as_deref(), Some("8G"));
        assert_eq!(merged.time.as_deref(), Some("2-00:00:00"));
        assert_eq!(merged.sbatch, vec!["--account=lab", "--qos=high"]);
        assert!(merged.validate().is_ok());
        let gpus = Resources { gpus: Some(4), nodes: Some(2), ..Default::default() };
        assert_eq!((gpus.world_size(true), gpus.world_size(false)), (8, 2));
        assert_eq!(Resources { tasks_per_node: Some(2), ..gpus }.world_size(true), 4);
        for (bad, field) in [
            (Resources { mem: Some("16GB".into()), ..Default::default() }, "mem"),
            (Resources { time: Some("2h".into()), ..Default::default() }, "time"),
            (Resources { cpus: Some(0), ..Default::default() }, "cpus"),
            (Resources { sbatch: vec!["qos=high".into()], ..Default::default() }, "sbatch"),
        ] {
            assert_eq!(bad.validate().unwrap_err().0, field);
        }
    }
}
