//! The NCCL communicator on a real GPU. Reported as skipped (`testkit::skip`) where no CUDA driver or libnccl
//! can be loaded — unless `AWQ_REQUIRE_GPU=1` (set by `scripts/gpu-check.sh`), where that
//! is a failure.
#![cfg(feature = "cuda")]

use cudarc::driver::CudaContext;
use tp_runtime::comm::{Communicator, NcclCommunicator, nccl_available, new_unique_id};

fn gpu_present(test: &str) -> bool {
    if nccl_available() && CudaContext::device_count().is_ok_and(|n| n > 0) {
        return true;
    }
    testkit::skip::unavailable(
        test,
        testkit::skip::Condition::Gpu,
        "no CUDA driver, no GPU, or no libnccl on this machine",
    );
    false
}

#[test]
fn nccl_collectives_with_one_rank() {
    if !gpu_present("nccl_collectives_with_one_rank") {
        return;
    }
    let ctx = CudaContext::new(0).unwrap();
    let stream = ctx.default_stream();
    let comm = NcclCommunicator::new(stream.clone(), 0, 1, &new_unique_id().unwrap()).unwrap();
    let values: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5 - 7.0).collect();
    let mut buf = stream.clone_htod(&values).unwrap();
    comm.all_reduce_sum(&mut buf).unwrap();
    assert_eq!(stream.clone_dtoh(&buf).unwrap(), values);
    let mut gathered = stream.alloc_zeros::<f32>(values.len()).unwrap();
    comm.all_gather(&buf, &mut gathered).unwrap();
    assert_eq!(stream.clone_dtoh(&gathered).unwrap(), values);
    comm.broadcast(&mut buf, 0).unwrap();
    assert_eq!(stream.clone_dtoh(&buf).unwrap(), values);
    eprintln!(
        "NCCL all-reduce, all-gather and broadcast ran with world size 1 on {}",
        ctx.name().unwrap_or_default()
    );
}

/// Two ranks on one GPU: NCCL refuses this unless NCCL ≥ 2.30 and
/// NCCL_MULTI_RANK_GPU_ENABLE=1 (experimental); runs only when that variable is set.
#[test]
fn nccl_two_ranks_on_one_gpu() {
    if std::env::var("NCCL_MULTI_RANK_GPU_ENABLE").is_err() {
        testkit::skip::unavailable(
            "nccl_two_ranks_on_one_gpu",
            testkit::skip::Condition::Gpu,
            "two ranks on one GPU need NCCL_MULTI_RANK_GPU_ENABLE=1 (NCCL ≥ 2.30)",
        );
        return;
    }
    if !gpu_present("nccl_two_ranks_on_one_gpu") {
        return;
    }
    let id = new_unique_id().unwrap();
    let ctx = CudaContext::new(0).unwrap();
    let sums: Vec<Vec<f32>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|rank| {
                let ctx = ctx.clone();
                s.spawn(move || {
                    ctx.bind_to_thread().unwrap();
                    let stream = ctx.new_stream().unwrap();
                    let comm = NcclCommunicator::new(stream.clone(), rank, 2, &id).unwrap();
                    let mut buf = stream.clone_htod(&[rank as f32 + 1.0; 4]).unwrap();
                    comm.all_reduce_sum(&mut buf).unwrap();
                    stream.clone_dtoh(&buf).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(sums.iter().all(|s| s == &vec![3.0; 4]), "{sums:?}");
    eprintln!("NCCL all-reduce ran with two ranks on one GPU");
}
