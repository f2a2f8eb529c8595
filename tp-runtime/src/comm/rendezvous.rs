//! Sharing a group's NCCL id between processes, the way torchrun does: every process reads
//! `RANK`, `WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT`; rank 0 listens on
//! `MASTER_ADDR:MASTER_PORT` and hands the id to each other rank as it connects. NCCL itself
//! then connects the ranks, on one host or across nodes (see `docs/distributed.md`).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// A process's place in a group, from the torchrun environment variables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RendezvousEnv {
    pub rank: usize,
    pub world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
}

fn var(name: &str) -> Result<String> {
    std::env::var(name).map_err(|_| Error::Invalid(format!("environment variable {name} is not set")))
}

fn parse<T: std::str::FromStr>(name: &str, value: &str) -> Result<T> {
    value.trim().parse().map_err(|_| {
        Error::Invalid(format!(
            "environment variable {name} = `{value}` is not a valid number"
        ))
    })
}

impl RendezvousEnv {
    /// Reads `RANK`, `WORLD_SIZE`, `MASTER_ADDR` (default 127.0.0.1) and `MASTER_PORT`
    /// (default 29500).
    pub fn from_env() -> Result<Self> {
        let rank = parse("RANK", &var("RANK")?)?;
        let world_size = parse("WORLD_SIZE", &var("WORLD_SIZE")?)?;
        let master_addr = std::env::var("MASTER_ADDR").unwrap_or_else(|_| "127.0.0.1".into());
        let master_port = match std::env::var("MASTER_PORT") {
            Ok(p) => parse("MASTER_PORT", &p)?,
            Err(_) => 29500,
        };
        let env = RendezvousEnv {
            rank,
            world_size,
            master_addr,
            master_port,
        };
        if env.world_size == 0 || env.rank >= env.world_size {
            return Err(Error::Invalid(format!(
                "RANK {rank} is not in 0..WORLD_SIZE {world_size}"
            )));
        }
        Ok(env)
    }

    fn address(&self) -> String {
        format!("{}:{}", self.master_addr, self.master_port)
    }
}

fn io(what: &str, e: std::io::Error) -> Error {
    Error::Invalid(format!("rendezvous: {what}: {e}"))
}

/// Gives every rank the bytes rank 0 produces: rank 0 calls `produce`, listens, and sends the
/// bytes to each of the `world_size − 1` other ranks; they connect (retrying until
/// `timeout`) and receive them.
pub fn share(
    env: &RendezvousEnv,
    timeout: Duration,
    produce: impl FnOnce() -> Result<Vec<u8>>,
) -> Result<Vec<u8>> {
    if env.rank == 0 {
        let payload = produce()?;
        if env.world_size == 1 {
            return Ok(payload);
        }
        let listener = TcpListener::bind(env.address())
            .map_err(|e| io(&format!("listening on {}", env.address()), e))?;
        let mut seen = vec![false; env.world_size];
        for _ in 1..env.world_size {
            let (mut stream, peer) = listener.accept().map_err(|e| io("accepting a rank", e))?;
            stream
                .set_read_timeout(Some(timeout))
                .map_err(|e| io("setting a timeout", e))?;
            let mut rank = [0u8; 8];
            stream
                .read_exact(&mut rank)
                .map_err(|e| io(&format!("reading the rank of {peer}"), e))?;
            let rank = u64::from_le_bytes(rank) as usize;
            if rank == 0 || rank >= env.world_size || std::mem::replace(&mut seen[rank], true) {
                return Err(Error::Invalid(format!(
                    "rendezvous: {peer} claims rank {rank}, which is invalid or taken"
                )));
            }
            stream
                .write_all(&(payload.len() as u64).to_le_bytes())
                .and_then(|()| stream.write_all(&payload))
                .map_err(|e| io(&format!("sending to rank {rank}"), e))?;
        }
        Ok(payload)
    } else {
        let start = Instant::now();
        let addr = env
            .address()
            .to_socket_addrs()
            .map_err(|e| io(&format!("resolving {}", env.address()), e))?
            .next()
            .ok_or_else(|| Error::Invalid(format!("rendezvous: {} resolves to nothing", env.address())))?;
        let mut stream = loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                Ok(s) => break s,
                // Rank 0 may not be listening yet.
                Err(e) if start.elapsed() < timeout => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(io(&format!("connecting to rank 0 at {addr}"), e)),
            }
        };
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| io("setting a timeout", e))?;
        stream
            .write_all(&(env.rank as u64).to_le_bytes())
            .map_err(|e| io("sending our rank", e))?;
        let mut len = [0u8; 8];
        stream
            .read_exact(&mut len)
            .map_err(|e| io("reading the length", e))?;
        let len = u64::from_le_bytes(len) as usize;
        if len > 1 << 20 {
            return Err(Error::Invalid(format!(
                "rendezvous: rank 0 announced {len} bytes"
            )));
        }
        let mut payload = vec![0u8; len];
        stream
            .read_exact(&mut payload)
            .map_err(|e| io("reading the payload", e))?;
        Ok(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rank_receives_rank_zeros_bytes() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let world = 4;
        let results: Vec<Vec<u8>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..world)
                .map(|rank| {
                    s.spawn(move || {
                        let env = RendezvousEnv {
                            rank,
                            world_size: world,
                            master_addr: "127.0.0.1".into(),
                            master_port: port,
                        };
                        share(&env, Duration::from_secs(20), || Ok((0..128u8).rev().collect())).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let want: Vec<u8> = (0..128u8).rev().collect();
        assert!(results.iter().all(|r| *r == want));
    }

    #[test]
    fn bad_environment_is_an_error() {
        // SAFETY: this test alone touches these variables.
        unsafe {
            std::env::set_var("RANK", "3");
            std::env::set_var("WORLD_SIZE", "2");
        }
        let err = RendezvousEnv::from_env().unwrap_err().to_string();
        assert!(err.contains("RANK 3 is not in 0..WORLD_SIZE 2"), "{err}");
        unsafe {
            std::env::set_var("WORLD_SIZE", "two");
        }
        assert!(
            RendezvousEnv::from_env()
                .unwrap_err()
                .to_string()
                .contains("WORLD_SIZE")
        );
        unsafe {
            std::env::remove_var("RANK");
            std::env::remove_var("WORLD_SIZE");
        }
    }
}
