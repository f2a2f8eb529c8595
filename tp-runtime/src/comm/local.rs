//! An in-process group: ranks are threads that meet at a barrier and exchange buffers
//! through shared slots. Sums run in rank order on every rank, so every rank gets the same
//! bits and the result does not depend on scheduling. The barrier gives up as soon as the
//! group's [`Abort`] flag is raised, so a rank that fails never leaves the others waiting.

use std::sync::{Arc, Condvar, Mutex};

use super::{Abort, Communicator};
use crate::{Error, Result};

/// A barrier that returns an error once the group is aborted.
struct Barrier {
    size: usize,
    state: Mutex<(usize, u64)>,
    released: Condvar,
}

impl Barrier {
    fn wait(&self, abort: &Abort, rank: usize) -> Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        abort.check(rank)?;
        let generation = state.1;
        state.0 += 1;
        if state.0 == self.size {
            *state = (0, generation + 1);
            self.released.notify_all();
            return Ok(());
        }
        while state.1 == generation {
            state = self
                .released
                .wait_timeout(state, Abort::POLL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            if state.1 == generation && abort.is_raised() {
                return Err(abort.error(rank));
            }
        }
        Ok(())
    }
}

struct Group {
    world_size: usize,
    barrier: Barrier,
    slots: Vec<Mutex<Vec<f32>>>,
    abort: Arc<Abort>,
}

/// One rank's handle on an in-process group.
pub struct LocalCommunicator {
    rank: usize,
    /// The rank's number in the failure reports (its place in the whole job).
    global_rank: usize,
    group: Arc<Group>,
    /// A failure to report at the next collective (injected by tests).
    fail_next: Mutex<Option<String>>,
}

impl LocalCommunicator {
    /// A group of `world_size` ranks with its own abort flag; hand one handle to each rank's
    /// thread.
    pub fn group(world_size: usize) -> Vec<LocalCommunicator> {
        Self::group_in(world_size, 0, Arc::new(Abort::new()))
    }

    /// A group of `world_size` ranks whose failures `abort` records; `first_rank` is the
    /// job-wide number of its rank 0 (a stage's ranks under pipeline parallelism).
    pub fn group_in(world_size: usize, first_rank: usize, abort: Arc<Abort>) -> Vec<LocalCommunicator> {
        let group = Arc::new(Group {
            world_size,
            barrier: Barrier {
                size: world_size,
                state: Mutex::new((0, 0)),
                released: Condvar::new(),
            },
            slots: (0..world_size).map(|_| Mutex::new(Vec::new())).collect(),
            abort,
        });
        (0..world_size)
            .map(|rank| LocalCommunicator {
                rank,
                global_rank: first_rank + rank,
                group: Arc::clone(&group),
                fail_next: Mutex::new(None),
            })
            .collect()
    }

    fn publish(&self, data: &[f32]) {
        let mut slot = self.group.slots[self.rank]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        slot.clear();
        slot.extend_from_slice(data);
    }

    fn slot(&self, rank: usize) -> std::sync::MutexGuard<'_, Vec<f32>> {
        self.group.slots[rank].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait(&self) -> Result<()> {
        self.group.barrier.wait(&self.group.abort, self.global_rank)
    }

    /// Makes this rank's next collective fail with `cause`, as a broken link or a driver
    /// error would: for tests of failure handling.
    pub fn fail_next(&self, cause: &str) {
        *self.fail_next.lock().unwrap_or_else(|e| e.into_inner()) = Some(cause.to_string());
    }

    /// The injected failure, if one is due.
    fn injected(&self) -> Result<()> {
        match self.fail_next.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(cause) => Err(self.fail(cause)),
            None => Ok(()),
        }
    }

    /// Records this rank's failure, so that the others stop waiting for it.
    fn fail(&self, message: String) -> Error {
        self.group.abort.raise(self.global_rank, message.clone());
        Error::Invalid(message)
    }
}

impl Communicator<[f32]> for LocalCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.group.world_size
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.injected()?;
        self.publish(buf);
        self.wait()?;
        buf.fill(0.0);
        for r in 0..self.group.world_size {
            let slot = self.slot(r);
            if slot.len() != buf.len() {
                let message = format!(
                    "all-reduce: rank {r} sent {} values, rank {} {}",
                    slot.len(),
                    self.rank,
                    buf.len()
                );
                drop(slot);
                return Err(self.fail(message));
            }
            buf.iter_mut().zip(slot.iter()).for_each(|(b, v)| *b += v);
        }
        // Nobody may overwrite a slot before everybody has read them all.
        self.wait()
    }

    fn all_gather(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        self.injected()?;
        if recv.len() != send.len() * self.group.world_size {
            return Err(self.fail(format!(
                "all-gather: {} values to send but room for {}",
                send.len(),
                recv.len()
            )));
        }
        self.publish(send);
        self.wait()?;
        for r in 0..self.group.world_size {
            let slot = self.slot(r);
            if slot.len() != send.len() {
                let message = format!(
                    "all-gather: rank {r} sent {} values, rank {} {}",
                    slot.len(),
                    self.rank,
                    send.len()
                );
                drop(slot);
                return Err(self.fail(message));
            }
            recv[r * send.len()..(r + 1) * send.len()].copy_from_slice(&slot);
        }
        self.wait()
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.injected()?;
        if root >= self.group.world_size {
            return Err(self.fail(format!("broadcast from rank {root} of {}", self.group.world_size)));
        }
        if self.rank == root {
            self.publish(buf);
        }
        self.wait()?;
        if self.rank != root {
            let slot = self.slot(root);
            if slot.len() != buf.len() {
                let message = format!(
                    "broadcast: rank {root} sent {} values, rank {} expects {}",
                    slot.len(),
                    self.rank,
                    buf.len()
                );
                drop(slot);
                return Err(self.fail(message));
            }
            buf.copy_from_slice(&slot);
        }
        self.wait()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn collectives_agree_across_threads() {
        let world = 3;
        let comms = LocalCommunicator::group(world);
        std::thread::scope(|s| {
            for comm in &comms {
                s.spawn(move || {
                    let r = comm.rank() as f32;
                    let mut x = vec![r, 10.0 * r];
                    comm.all_reduce_sum(&mut x).unwrap();
                    assert_eq!(x, vec![3.0, 30.0]);
                    let mut all = vec![0.0; 2 * world];
                    comm.all_gather(&[r, -r], &mut all).unwrap();
                    assert_eq!(all, vec![0.0, -0.0, 1.0, -1.0, 2.0, -2.0]);
                    let mut b = vec![r; 4];
                    comm.broadcast(&mut b, 2).unwrap();
                    assert_eq!(b, vec![2.0; 4]);
                    // Repeated rounds reuse the slots safely.
                    for round in 0..50 {
                        let mut y = vec![round as f32 + r];
                        comm.all_reduce_sum(&mut y).unwrap();
                        assert_eq!(y[0], 3.0 * round as f32 + 3.0);
                    }
                });
            }
        });
    }

    /// A rank whose all-gather fails its size check before the barrier (what used to leave
    /// the others waiting forever) ends the group: every rank returns an error naming it.
    #[test]
    fn a_failing_rank_releases_the_others() {
        let abort = Arc::new(Abort::new());
        let comms = LocalCommunicator::group_in(3, 6, Arc::clone(&abort));
        let start = Instant::now();
        let errors: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .iter()
                .map(|comm| {
                    s.spawn(move || {
                        let send = [1.0f32; 2];
                        let mut recv = vec![0.0; if comm.rank() == 1 { 5 } else { 6 }];
                        comm.all_gather(&send, &mut recv).unwrap_err().to_string()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(start.elapsed() < Duration::from_secs(2));
        assert!(errors[1].contains("room for 5"), "{}", errors[1]);
        for e in [&errors[0], &errors[2]] {
            assert!(
                e.contains("because rank 7 failed") && e.contains("room for 5"),
                "{e}"
            );
        }
        assert_eq!(abort.cause().unwrap().0, 7);
    }
}
