//! Summing gradients across the ranks of a data-parallel world.
//!
//! A world of one does nothing. CPU ranks meet over TCP at rank 0's address
//! ([`World::master`]): every rank sends its buffer to rank 0, which adds them
//! in rank order and sends the sum back, so every rank applies the same
//! update and the sum's rounding does not depend on which rank finished first.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use swift_engine::kind::Cancelled;
use swift_engine::world::World;

/// The first bytes every rank sends rank 0: the protocol and its version.
const HELLO: &[u8; 8] = b"swiftdp2";
/// How long rank 0 waits for a connection's greeting.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// How long ranks wait for each other to start (Slurm starts a job's tasks
/// together, but loading a large model takes a while).
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(900);

/// This process's place in a data-parallel world and its link to the others.
pub struct Parallel {
    /// Rank and size.
    pub world: World,
    /// The link.
    pub collective: Collective,
}

impl Parallel {
    /// A world of one.
    pub fn single() -> Self {
        Self { world: World::single(), collective: Collective::Solo }
    }

    /// Joins `world` (see [`Collective::join`]).
    pub fn join(world: &World, timeout: Duration, cancelled: &dyn Fn() -> bool) -> anyhow::Result<Self> {
        Ok(Self { world: world.clone(), collective: Collective::join(world, timeout, cancelled)? })
    }
}

/// How the ranks of a world sum their buffers.
pub enum Collective {
    /// A world of one.
    Solo,
    /// Rank 0 of a TCP group: streams to ranks 1.. in rank order.
    Leader(Vec<TcpStream>),
    /// Another rank of a TCP group: the stream to rank 0.
    Follower(TcpStream),
}

impl Collective {
    /// Joins the world: rank 0 waits for every other rank, the others connect
    /// to it (retrying while it starts), each within `timeout`; returns
    /// [`Cancelled`] as soon as `cancelled` says so.
    pub fn join(world: &World, timeout: Duration, cancelled: &dyn Fn() -> bool) -> anyhow::Result<Self> {
        if world.size <= 1 {
            return Ok(Self::Solo);
        }
        let (host, port) = &world.master;
        let deadline = Instant::now() + timeout;
        if world.is_leader() {
            let listener = TcpListener::bind(("0.0.0.0", *port)).with_context(|| format!("rank 0 cannot listen on port {port}"))?;
            listener.set_nonblocking(true)?;
            let mut peers: Vec<Option<TcpStream>> = (1..world.size).map(|_| None).collect();
            while peers.iter().any(Option::is_none) {
                match listener.accept() {
                    Ok((mut stream, from)) => {
                        stream.set_nonblocking(false)?;
                        stream.set_nodelay(true)?;
                        stream.set_read_timeout(Some(HELLO_TIMEOUT))?;
                        // Anything but a rank of this job (a stray client, a job
                        // that drew the same port) is turned away, not joined.
                        let Some((rank, size, job)) = read_hello(&mut stream) else { continue };
                        if job != world.job {
                            eprintln!("swift: turned away a rank of job {job} at {from} (this is job {})", world.job);
                            continue;
                        }
                        if size != world.size || rank == 0 || rank >= world.size || peers[rank - 1].is_some() {
                            bail!("a process of this job joined as rank {rank} of {size}, but this world has {} ranks", world.size);
                        }
                        stream.set_read_timeout(None)?;
                        peers[rank - 1] = Some(stream);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if cancelled() {
                            return Err(Cancelled.into());
                        }
                        if Instant::now() > deadline {
                            let missing: Vec<String> = peers.iter().enumerate().filter(|(_, p)| p.is_none()).map(|(i, _)| (i + 1).to_string()).collect();
                            bail!("ranks {} did not join rank 0 on port {port} within {}s", missing.join(", "), timeout.as_secs());
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(e).context("accepting a rank"),
                }
            }
            Ok(Self::Leader(peers.into_iter().map(|p| p.expect("every rank joined")).collect()))
        } else {
            let address = world.master_address().map_err(|e| anyhow::anyhow!(e))?;
            let mut stream = loop {
                match TcpStream::connect_timeout(&address, Duration::from_secs(5)) {
                    Ok(stream) => break stream,
                    Err(_) if cancelled() => return Err(Cancelled.into()),
                    Err(e) if Instant::now() > deadline => {
                        return Err(e).with_context(|| format!("rank {} cannot reach rank 0 at {host}:{port}", world.rank))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            };
            stream.set_nodelay(true)?;
            stream.write_all(HELLO)?;
            stream.write_all(&(world.rank as u64).to_le_bytes())?;
            stream.write_all(&(world.size as u64).to_le_bytes())?;
            stream.write_all(&world.job.to_le_bytes())?;
            Ok(Self::Follower(stream))
        }
    }

    /// Replaces `values` on every rank by the sum over all ranks. `step`
    /// tags the exchange: ranks at different steps (one resumed from another
    /// checkpoint) are an error, never a silent mix.
    pub fn all_reduce_sum(&mut self, step: u64, values: &mut [f32]) -> anyhow::Result<()> {
        match self {
            Self::Solo => Ok(()),
            Self::Leader(peers) => {
                let mut incoming = vec![0f32; values.len()];
                for (i, peer) in peers.iter_mut().enumerate() {
                    let theirs = read_floats(peer, &mut incoming).with_context(|| format!("receiving rank {}'s gradients", i + 1))?;
                    if theirs != step {
                        bail!("rank {} is at step {theirs} and rank 0 at step {step}: they did not resume from the same checkpoint", i + 1);
                    }
                    values.iter_mut().zip(&incoming).for_each(|(v, x)| *v += x);
                }
                for (i, peer) in peers.iter_mut().enumerate() {
                    write_floats(peer, step, values).with_context(|| format!("sending rank {} the summed gradients", i + 1))?;
                }
                Ok(())
            }
            Self::Follower(leader) => {
                write_floats(leader, step, values).context("sending gradients to rank 0")?;
                read_floats(leader, values).context("receiving the summed gradients from rank 0").map(|_| ())
            }
        }
    }
}

/// A greeting's rank, size and job, or `None` if it is not a swift rank's.
fn read_hello(stream: &mut TcpStream) -> Option<(usize, usize, u64)> {
    let mut hello = [0u8; 32];
    stream.read_exact(&mut hello).ok()?;
    if &hello[..8] != HELLO {
        return None;
    }
    let number = |bytes: &[u8]| u64::from_le_bytes(bytes.try_into().expect("8 bytes"));
    Some((number(&hello[8..16]) as usize, number(&hello[16..24]) as usize, number(&hello[24..32])))
}

/// One exchange: the step, the count, the values.
fn write_floats(stream: &mut TcpStream, step: u64, values: &[f32]) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(16 + values.len() * 4);
    bytes.extend_from_slice(&step.to_le_bytes());
    bytes.extend_from_slice(&(values.len() as u64).to_le_bytes());
    for v in values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    stream.write_all(&bytes)
}

/// Reads one exchange into `values`; returns its step.
fn read_floats(stream: &mut TcpStream, values: &mut [f32]) -> anyhow::Result<u64> {
    let mut head = [0u8; 16];
    stream.read_exact(&mut head)?;
    let step = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
    let len = u64::from_le_bytes(head[8..].try_into().expect("8 bytes")) as usize;
    if len != values.len() {
        bail!("a rank sent {len} values where {} were expected: the ranks train different adapters", values.len());
    }
    let mut bytes = vec![0u8; len * 4];
    stream.read_exact(&mut bytes)?;
    for (v, chunk) in values.iter_mut().zip(bytes.chunks_exact(4)) {
        *v = f32::from_le_bytes(chunk.try_into().expect("4 bytes"));
    }
    Ok(step)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A free loopback port.
    pub(crate) fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    #[test]
    fn every_rank_gets_the_sum_in_rank_order() {
        let port = free_port();
        let size = 3;
        let handles: Vec<_> = (0..size)
            .map(|rank| {
                std::thread::spawn(move || {
                    let world = World { rank, size, local_rank: rank, master: ("localhost".into(), port), job: 7 };
                    let mut group = Collective::join(&world, Duration::from_secs(20), &|| false).unwrap();
                    let mut values = vec![rank as f32 + 1.0, 0.1 * rank as f32, 1e8];
                    group.all_reduce_sum(0, &mut values).unwrap();
                    // A mismatched length is an error, not a hang or garbage
                    // (rank 2 sends a wrong length here).
                    let mut again = vec![1.0; if rank == 2 { 3 } else { 2 }];
                    let result = group.all_reduce_sum(1, &mut again);
                    (values, result.is_ok())
                })
            })
            .collect();
        let results: Vec<(Vec<f32>, bool)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let expected = vec![6.0, (0.0f32 + 0.1) + 0.2, (1e8f32 + 1e8) + 1e8];
        for (values, _) in &results {
            assert_eq!(values, &expected);
        }
        assert!(!results[0].1, "rank 0 notices rank 2's wrong length");
    }

    #[test]
    fn ranks_of_another_job_are_turned_away_and_steps_must_agree() {
        let port = free_port();
        let world = move |rank, job| World { rank, size: 2, local_rank: rank, master: ("localhost".into(), port), job };
        let leader = std::thread::spawn(move || {
            let mut group = Collective::join(&world(0, 7), Duration::from_secs(20), &|| false).unwrap();
            group.all_reduce_sum(3, &mut [1.0]).map_err(|e| format!("{e:#}"))
        });
        std::thread::sleep(Duration::from_millis(200));
        // A rank of job 8 that drew the same port is turned away…
        let stray = std::thread::spawn(move || {
            let mut group = Collective::join(&world(1, 8), Duration::from_secs(20), &|| false).unwrap();
            group.all_reduce_sum(3, &mut [1.0]).is_err()
        });
        assert!(stray.join().unwrap(), "the stray rank's exchange fails");
        // …and the real rank 1, one step behind, is an error on rank 0.
        let mut group = Collective::join(&world(1, 7), Duration::from_secs(20), &|| false).unwrap();
        assert!(group.all_reduce_sum(2, &mut [1.0]).is_err());
        let error = leader.join().unwrap().unwrap_err();
        assert!(error.contains("rank 1 is at step 2 and rank 0 at step 3"), "{error}");
    }

    #[test]
    fn a_world_of_one_changes_nothing_and_a_missing_rank_times_out() {
        let mut solo = Collective::join(&World::single(), Duration::from_secs(1), &|| false).unwrap();
        let mut values = vec![1.5, -2.0];
        solo.all_reduce_sum(0, &mut values).unwrap();
        assert_eq!(values, [1.5, -2.0]);
        let world = World { rank: 0, size: 2, local_rank: 0, master: ("localhost".into(), free_port()), job: 7 };
        let error = Collective::join(&world, Duration::from_millis(300), &|| false).err().unwrap();
        assert!(format!("{error:#}").contains("ranks 1 did not join"), "{error:#}");
        let follower = World { rank: 1, ..world };
        let error = Collective::join(&follower, Duration::from_secs(60), &|| true).err().unwrap();
        assert!(error.is::<Cancelled>(), "{error:#}");
    }
}
