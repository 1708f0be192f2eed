//! The ranks of a data-parallel stage: which of how many processes this one
//! is, and where rank 0 listens for the others.
//!
//! A local run is a world of one. Under Slurm, a stage whose job spans several
//! tasks (`resources = { nodes = N, tasks_per_node = T }`) is started once per
//! task by `srun`; each task reads its place from Slurm's variables:
//! `SLURM_PROCID` (rank), `SLURM_NTASKS` (size), `SLURM_LOCALID` (rank on its
//! node), and the first host of `SLURM_JOB_NODELIST` as rank 0's address. The
//! port is `SWIFT_DP_PORT` if set, else 20000 + `SLURM_JOB_ID` mod 10000, so
//! that two jobs sharing a node rarely collide (ranks also check the job id).

use std::collections::HashMap;

/// One process's place in a data-parallel world.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct World {
    /// This process's rank, `0..size`.
    pub rank: usize,
    /// How many processes train together.
    pub size: usize,
    /// The rank among the processes on this node (picks the GPU).
    pub local_rank: usize,
    /// Where rank 0 listens: host and port.
    pub master: (String, u16),
    /// What the ranks of one job share and other jobs do not (the Slurm job
    /// id): a rank of another job that reaches this port is turned away.
    pub job: u64,
}

impl Default for World {
    fn default() -> Self {
        Self::single()
    }
}

impl World {
    /// A world of one: this process alone.
    pub fn single() -> Self {
        Self { rank: 0, size: 1, local_rank: 0, master: ("127.0.0.1".to_string(), 0), job: 0 }
    }

    /// Whether this process writes results (rank 0).
    pub fn is_leader(&self) -> bool {
        self.rank == 0
    }

    /// The world Slurm's variables describe (`vars` is the environment), or a
    /// world of one outside a multi-task job step.
    pub fn from_slurm(vars: &HashMap<String, String>) -> Result<Self, String> {
        let get = |name: &str| vars.get(name).map(String::as_str);
        let number = |name: &str| -> Result<Option<usize>, String> {
            get(name).map(|v| v.trim().parse::<usize>().map_err(|_| format!("{name}={v} is not a number"))).transpose()
        };
        let size = number("SLURM_NTASKS")?.or(number("SLURM_NPROCS")?).unwrap_or(1);
        if size <= 1 {
            return Ok(Self::single());
        }
        let rank = number("SLURM_PROCID")?.ok_or("SLURM_NTASKS is set but SLURM_PROCID is not: start each task with `srun`")?;
        if rank >= size {
            return Err(format!("SLURM_PROCID={rank} is not below SLURM_NTASKS={size}"));
        }
        let local_rank = number("SLURM_LOCALID")?.unwrap_or(0);
        let nodes = get("SLURM_STEP_NODELIST").or(get("SLURM_JOB_NODELIST")).ok_or("SLURM_JOB_NODELIST is not set")?;
        let host = first_host(nodes).ok_or_else(|| format!("cannot read the first host of the node list `{nodes}`"))?;
        let job = number("SLURM_JOB_ID")?.unwrap_or(0) as u64;
        let port = match get("SWIFT_DP_PORT") {
            Some(p) => p.parse::<u16>().map_err(|_| format!("SWIFT_DP_PORT={p} is not a port"))?,
            // Below Linux's ephemeral ports (32768 and up).
            None => 20000 + (job % 10000) as u16,
        };
        Ok(Self { rank, size, local_rank, master: (host, port), job })
    }

    /// Rank 0's socket address (IPv4 first: rank 0 listens on IPv4): its host
    /// name resolved, or, for a node name the resolver does not know, the
    /// `NodeAddr` Slurm has for that node.
    pub fn master_address(&self) -> Result<std::net::SocketAddr, String> {
        use std::net::ToSocketAddrs;
        let (host, port) = (&self.master.0, self.master.1);
        let first = |addresses: std::vec::IntoIter<std::net::SocketAddr>| {
            let all: Vec<_> = addresses.collect();
            all.iter().find(|a| a.is_ipv4()).or(all.first()).copied()
        };
        if let Some(address) = (host.as_str(), port).to_socket_addrs().ok().and_then(first) {
            return Ok(address);
        }
        let out = std::process::Command::new("scontrol")
            .args(["show", "node", "-o", host])
            .output()
            .map_err(|e| format!("cannot resolve rank 0's host `{host}`, and cannot ask Slurm for its address: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let node_addr = text.split_whitespace().find_map(|f| f.strip_prefix("NodeAddr="));
        node_addr
            .and_then(|a| first((a, port).to_socket_addrs().ok()?))
            .ok_or_else(|| format!("cannot resolve rank 0's host `{host}` (not by name, not by Slurm's NodeAddr)"))
    }

    /// Which of a step's `rows` rows (indices `0..rows` within the step) this
    /// rank computes: every `size`-th, starting at its rank. Together the ranks
    /// cover each row exactly once, so the step's summed gradient is the one a
    /// world of one computes.
    pub fn shard(&self, rows: usize) -> impl Iterator<Item = usize> {
        (self.rank..rows).step_by(self.size)
    }
}

/// The first host of a Slurm node list: `node1`, `node[1-4]`, `gpu[07,09-12]`,
/// `a,b`, `rack1-[03-04]`.
pub fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    // The first comma outside brackets ends the first entry.
    let mut depth = 0;
    let end = list
        .char_indices()
        .find(|&(_, c)| {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                _ => {}
            }
            c == ',' && depth == 0
        })
        .map_or(list.len(), |(i, _)| i);
    let entry = &list[..end];
    let host = match entry.split_once('[') {
        None => entry.to_string(),
        Some((prefix, rest)) => {
            let (ranges, suffix) = rest.split_once(']')?;
            let first = ranges.split([',', '-']).next()?;
            format!("{prefix}{first}{suffix}")
        }
    };
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn node_lists_give_their_first_host() {
        assert_eq!(first_host("localhost").as_deref(), Some("localhost"));
        assert_eq!(first_host("node[1-4]").as_deref(), Some("node1"));
        assert_eq!(first_host("gpu[07,09-12],cpu3").as_deref(), Some("gpu07"));
        assert_eq!(first_host("a,b").as_deref(), Some("a"));
        assert_eq!(first_host("rack1-[03-04]").as_deref(), Some("rack1-03"));
        assert_eq!(first_host("").as_deref(), None);
    }

    #[test]
    fn slurm_variables_give_rank_size_and_master() {
        let world = World::from_slurm(&vars(&[
            ("SLURM_NTASKS", "8"),
            ("SLURM_PROCID", "5"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "gpu[01-02]"),
            ("SLURM_JOB_ID", "123456"),
        ]))
        .unwrap();
        assert_eq!(world, World { rank: 5, size: 8, local_rank: 1, master: ("gpu01".into(), 20000 + 3456), job: 123456 });
        assert!(!world.is_leader());
        let pinned = World::from_slurm(&vars(&[("SLURM_NTASKS", "2"), ("SLURM_PROCID", "0"), ("SLURM_JOB_NODELIST", "n1"), ("SWIFT_DP_PORT", "4000")])).unwrap();
        assert_eq!(pinned.master, ("n1".into(), 4000));
        let local = World { master: ("localhost".into(), 4000), ..pinned.clone() };
        assert_eq!(local.master_address().unwrap().port(), 4000);
        // Outside a multi-task step (a plain sbatch job): a world of one.
        assert_eq!(World::from_slurm(&vars(&[("SLURM_JOB_ID", "7")])).unwrap(), World::single());
        assert_eq!(World::from_slurm(&vars(&[("SLURM_NTASKS", "1"), ("SLURM_PROCID", "0")])).unwrap(), World::single());
        assert!(World::from_slurm(&vars(&[("SLURM_NTASKS", "2"), ("SLURM_JOB_NODELIST", "n1")])).unwrap_err().contains("srun"));
        assert!(World::from_slurm(&vars(&[("SLURM_NTASKS", "2"), ("SLURM_PROCID", "2"), ("SLURM_JOB_NODELIST", "n1")])).is_err());
    }

    #[test]
    fn shards_cover_every_row_once_in_the_single_process_order() {
        for size in 1..=4 {
            for rows in [0, 1, 4, 7, 8] {
                let mut seen: Vec<usize> = (0..size)
                    .flat_map(|rank| World { rank, size, local_rank: 0, master: ("h".into(), 1), job: 1 }.shard(rows).collect::<Vec<_>>())
                    .collect();
                seen.sort_unstable();
                assert_eq!(seen, (0..rows).collect::<Vec<_>>(), "{size} ranks over {rows} rows");
            }
        }
        assert_eq!(World::single().shard(3).collect::<Vec<_>>(), [0, 1, 2]);
    }
}
