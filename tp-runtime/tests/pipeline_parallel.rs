//! Pipeline stages and tensor-parallel ranks inside them, on the tiny reference models: the
//! logits of every placement equal one rank's, pre-sharded rank files read back exactly, the
//! bytes each rank loads are the planner's count, and a rank that fails ends its group
//! quickly, naming itself.

use std::path::Path;
use std::time::{Duration, Instant};

use checkpoint::ModelConfig;
use checkpoint::presharded::{MAPPING_KEY, Mapping, rank_file};
use tp_runtime::backend::Prediction;
use tp_runtime::group::{Fault, FaultKind};
use tp_runtime::load::write_rank_file;
use tp_runtime::{Batch, CpuBackend, Model, PlacementRequest, RankGroup, Scorer, SeqLayout};

fn request(tp: usize, pp: usize) -> PlacementRequest {
    PlacementRequest {
        tp: Some(tp),
        pp: Some(pp),
        layers: None,
    }
}

fn ids(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 2_654_435_761u32.wrapping_add(seed)) % 512)
        .collect()
}

/// Four batches of two sequences, with every next-token prediction.
fn batches() -> Vec<Batch> {
    (0..4)
        .map(|b| {
            let ids = [ids(40, b), ids(30, b + 10)].concat();
            let layout = SeqLayout::new(&[40, 30]).unwrap();
            let predictions = (0..70)
                .filter(|&r| r != 39 && r != 69)
                .map(|row| Prediction {
                    row,
                    target: ids[row + 1],
                })
                .collect();
            Batch {
                ids,
                layout,
                predictions,
            }
        })
        .collect()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn every_placement_scores_like_one_rank() {
    for name in testkit::TINY_MODELS {
        let tiny = testkit::tiny(name);
        let one = Model::load(&tiny.dir, CpuBackend::new()).unwrap();
        let want = one.score_batches(&batches()).unwrap();
        let layout = SeqLayout::single(50).unwrap();
        let logits = |m: &Model<CpuBackend>| {
            m.logits(&m.forward(&ids(50, 3), &layout).unwrap(), &[0, 25, 49])
                .unwrap()
        };
        let want_logits = logits(&one);
        for (tp, pp) in [(1, 2), (1, 3), (2, 3), (4, 2), (8, 1)] {
            let group = RankGroup::load_cpu(&tiny.dir, &request(tp, pp)).unwrap();
            let got = group.score_batches(&batches()).unwrap();
            assert!(
                max_diff(&want, &got) < 1e-4,
                "{name} tp {tp} pp {pp}: NLL differs by {}",
                max_diff(&want, &got)
            );
            let got_logits = group.logits(&ids(50, 3), &layout, &[0, 25, 49]).unwrap();
            assert!(
                max_diff(&want_logits, &got_logits) < 1e-4,
                "{name} tp {tp} pp {pp}: logits"
            );
            eprintln!(
                "{name} tp {tp} × pp {pp}: NLL ±{:.1e}, logits ±{:.1e} against one rank",
                max_diff(&want, &got),
                max_diff(&want_logits, &got_logits)
            );
            let stages = group.stage_seconds();
            assert_eq!(stages.len(), pp);
            assert!(stages.iter().all(|&s| s > 0.0), "{stages:?}");
        }
    }
}

/// Writes `dir` pre-sharded as `awq shard` does.
fn preshard(dir: &Path, out: &Path, tp: usize, pp: usize) {
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let placement = request(tp, pp).resolve(&config, None).unwrap();
    let checkpoint = checkpoint::Checkpoint::open(dir).unwrap();
    std::fs::create_dir_all(out).unwrap();
    for rank in placement.ranks() {
        write_rank_file(&checkpoint, &config, &rank, &out.join(rank_file(rank.rank))).unwrap();
    }
    let mapping = Mapping {
        world_size: placement.world_size(),
        tp,
        pp,
        stage_layers: placement
            .stages
            .stages()
            .iter()
            .map(|s| [s.start, s.end])
            .collect(),
        intermediate_padding: placement.shards.intermediate_padding(),
        files: (0..placement.world_size()).map(rank_file).collect(),
    };
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    value[MAPPING_KEY] = serde_json::to_value(&mapping).unwrap();
    std::fs::write(out.join("config.json"), value.to_string()).unwrap();
}

#[test]
fn pre_sharded_ranks_read_only_their_files_and_score_exactly() {
    let tiny = testkit::tiny("tiny-qwen2");
    let config = ModelConfig::from_file(&tiny.dir.join("config.json")).unwrap();
    let out = tiny.root().join("sharded");
    preshard(&tiny.dir, &out, 2, 2);
    let direct = RankGroup::load_cpu(&tiny.dir, &request(2, 2)).unwrap();
    let sharded = RankGroup::load_cpu(&out, &PlacementRequest::default()).unwrap();
    assert_eq!(sharded.placement(), direct.placement());
    // Bit-identical: the same tensors, read from other files.
    assert_eq!(
        direct.score_batches(&batches()).unwrap(),
        sharded.score_batches(&batches()).unwrap()
    );
    for (r, bytes) in sharded.rank_loaded_bytes().into_iter().enumerate() {
        // Each rank read all of its file's tensor data and nothing else; the planner predicts
        // the same count from the configuration alone.
        let file = checkpoint::Checkpoint::open_file(&out, &rank_file(r)).unwrap();
        assert_eq!(bytes, file.data_bytes(), "rank {r}");
        assert_eq!(bytes, direct.rank_loaded_bytes()[r], "rank {r}");
        let predicted = direct
            .placement()
            .rank(r)
            .weight_bytes(&config, checkpoint::Dtype::F32);
        assert_eq!(bytes, predicted, "rank {r}");
        assert_eq!(
            sharded.rank_files()[r],
            vec![out.join(rank_file(r))],
            "rank {r} opened other files"
        );
    }
    // Asking for another placement names both.
    let err = RankGroup::load_cpu(&out, &request(1, 2))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("pre-sharded for tp = 2, pp = 2") && err.contains("asked for tp = 1"),
        "{err}"
    );
    // A missing or truncated rank file is an error naming it.
    let rank3 = out.join(rank_file(3));
    let bytes = std::fs::read(&rank3).unwrap();
    std::fs::write(&rank3, &bytes[..bytes.len() / 2]).unwrap();
    let err = RankGroup::load_cpu(&out, &PlacementRequest::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("rank3.safetensors") && err.contains("not a valid safetensors"),
        "{err}"
    );
    std::fs::remove_file(&rank3).unwrap();
    let err = RankGroup::load_cpu(&out, &PlacementRequest::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("rank3.safetensors"), "{err}");
}

/// A corrupt tensor in one rank's file ends the load, naming the rank, the file and the tensor.
#[test]
fn a_corrupt_rank_file_names_the_rank() {
    let tiny = testkit::tiny("tiny-llama");
    let out = tiny.root().join("sharded");
    preshard(&tiny.dir, &out, 2, 2);
    // Overwrite the last tensor of rank 1's file (a layer weight) with NaN bytes.
    let path = out.join(rank_file(1));
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 64..].copy_from_slice(&[0xFF; 64]);
    std::fs::write(&path, bytes).unwrap();
    let start = Instant::now();
    let err = RankGroup::load_cpu(&out, &PlacementRequest::default())
        .err()
        .unwrap()
        .to_string();
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(
        err.contains("rank 1 failed") && err.contains("rank1.safetensors") && err.contains("non-finite"),
        "{err}"
    );
}

#[test]
fn a_failing_rank_ends_its_group_quickly_and_is_named() {
    let tiny = testkit::tiny("tiny-llama");
    for (tp, pp) in [(4, 1), (1, 3), (2, 3)] {
        for (rank, kind) in [
            (0, FaultKind::Error),
            (tp * pp - 1, FaultKind::Panic),
            (tp, FaultKind::Collective),
        ] {
            if kind == FaultKind::Collective && tp == 1 {
                continue;
            }
            let rank = rank.min(tp * pp - 1);
            let mut group = RankGroup::load_cpu(&tiny.dir, &request(tp, pp)).unwrap();
            group.inject(Fault { rank, batch: 1, kind });
            let start = Instant::now();
            let err = group.score_batches(&batches()).unwrap_err().to_string();
            let took = start.elapsed();
            assert!(
                took < Duration::from_secs(10),
                "tp {tp} pp {pp} {kind:?}: {took:?}"
            );
            let cause = match kind {
                FaultKind::Error => "injected failure",
                FaultKind::Panic => "panicked: injected panic",
                FaultKind::Collective => "injected collective failure",
            };
            assert!(
                err.contains(&format!("rank {rank} failed")) && err.contains(cause),
                "tp {tp} pp {pp} {kind:?} on rank {rank}: {err}"
            );
            eprintln!("tp {tp} × pp {pp}, {kind:?} on rank {rank}: ended in {took:?}: {err}");
            // The group is finished: a later call says so at once.
            let again = group.score_batches(&batches()).unwrap_err().to_string();
            assert!(again.contains(&format!("rank {rank} failed")), "{again}");
        }
    }
}
