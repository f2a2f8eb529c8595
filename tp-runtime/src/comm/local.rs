//! An in-process group: ranks are threads that meet at a barrier and exchange buffers
//! through shared slots. Sums run in rank order on every rank, so every rank gets the same
//! bits and the result does not depend on scheduling.

use std::sync::{Arc, Barrier, Mutex};

use super::Communicator;
use crate::{Error, Result};

struct Group {
    world_size: usize,
    barrier: Barrier,
    slots: Vec<Mutex<Vec<f32>>>,
}

/// One rank's handle on an in-process group.
pub struct LocalCommunicator {
    rank: usize,
    group: Arc<Group>,
}

impl LocalCommunicator {
    /// A group of `world_size` ranks; hand one handle to each rank's thread.
    pub fn group(world_size: usize) -> Vec<LocalCommunicator> {
        let group = Arc::new(Group {
            world_size,
            barrier: Barrier::new(world_size),
            slots: (0..world_size).map(|_| Mutex::new(Vec::new())).collect(),
        });
        (0..world_size)
            .map(|rank| LocalCommunicator {
                rank,
                group: Arc::clone(&group),
            })
            .collect()
    }

    fn publish(&self, data: &[f32]) {
        let mut slot = self.group.slots[self.rank].lock().expect("slot lock");
        slot.clear();
        slot.extend_from_slice(data);
    }

    fn slot(&self, rank: usize) -> std::sync::MutexGuard<'_, Vec<f32>> {
        self.group.slots[rank].lock().expect("slot lock")
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
        self.publish(buf);
        self.group.barrier.wait();
        buf.fill(0.0);
        for r in 0..self.group.world_size {
            let slot = self.slot(r);
            if slot.len() != buf.len() {
                return Err(Error::Invalid(format!(
                    "all-reduce: rank {r} sent {} values, rank {} {}",
                    slot.len(),
                    self.rank,
                    buf.len()
                )));
            }
            buf.iter_mut().zip(slot.iter()).for_each(|(b, v)| *b += v);
        }
        // Nobody may overwrite a slot before everybody has read them all.
        self.group.barrier.wait();
        Ok(())
    }

    fn all_gather(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        if recv.len() != send.len() * self.group.world_size {
            return Err(Error::Invalid(format!(
                "all-gather: {} values to send but room for {}",
                send.len(),
                recv.len()
            )));
        }
        self.publish(send);
        self.group.barrier.wait();
        for (r, out) in recv
            .chunks_exact_mut(send.len().max(1))
            .enumerate()
            .take(self.group.world_size)
        {
            out.copy_from_slice(&self.slot(r));
        }
        self.group.barrier.wait();
        Ok(())
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        if root >= self.group.world_size {
            return Err(Error::Invalid(format!(
                "broadcast from rank {root} of {}",
                self.group.world_size
            )));
        }
        if self.rank == root {
            self.publish(buf);
        }
        self.group.barrier.wait();
        if self.rank != root {
            buf.copy_from_slice(&self.slot(root));
        }
        self.group.barrier.wait();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
