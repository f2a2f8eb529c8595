//! SmolLM2-135M, f32 and an AWQ-format g64 checkpoint (round to nearest, so that the
//! checkpoint takes seconds to make), split over pipeline stages and tensor-parallel ranks:
//! every placement gives the one-rank perplexity on 3 windows of 512 within 1e-5 and window
//! 0's logits within 1e-4, and every rank loads exactly the bytes the planner predicts.

use std::path::Path;

use awq_pack::{GroupSize, QuantizeOptions, quantize};
use checkpoint::{ModelConfig, Tokenizer};
use evaluation::perplexity::{Protocol, WindowPlan, evaluate};
use tp_runtime::planner::DtypeName;
use tp_runtime::{CpuBackend, Model, PlacementRequest, RankGroup, SeqLayout};

const PLACEMENTS: [(usize, usize); 6] = [(1, 2), (1, 3), (1, 4), (1, 30), (3, 2), (3, 4)];

fn request(tp: usize, pp: usize) -> PlacementRequest {
    PlacementRequest {
        tp: Some(tp),
        pp: Some(pp),
        layers: None,
    }
}

fn check(model: &Path, tokens: &[u32]) {
    let plan = WindowPlan::new(tokens.len(), 512, Some(3), Protocol::Full, None).unwrap();
    let config = ModelConfig::from_file(&model.join("config.json")).unwrap();
    let dense = DtypeName::of(&config).dtype();
    let one = Model::load(model, CpuBackend::new()).unwrap();
    let want = evaluate(&one, tokens, &plan, 2, |_, _| {}).unwrap().ppl;
    let layout = SeqLayout::single(512).unwrap();
    let rows = [0, 100, 255, 400, 511];
    let want_logits = one
        .logits(&one.forward(&tokens[..512], &layout).unwrap(), &rows)
        .unwrap();
    drop(one);
    for (tp, pp) in PLACEMENTS {
        let group = RankGroup::load_cpu(model, &request(tp, pp)).unwrap();
        if pp == 4 {
            assert_eq!(group.placement().stages.counts(), vec![8, 8, 7, 7]);
        }
        let got = evaluate(&group, tokens, &plan, 2, |_, _| {}).unwrap().ppl;
        let rel = ((got - want) / want).abs();
        assert!(
            rel < 1e-5,
            "{} tp {tp} × pp {pp}: PPL {got} vs {want}",
            model.display()
        );
        let logits = group.logits(&tokens[..512], &layout, &rows).unwrap();
        let diff = logits
            .iter()
            .flatten()
            .zip(want_logits.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            diff < 1e-4,
            "{} tp {tp} × pp {pp}: window-0 logits differ by {diff}",
            model.display()
        );
        // The planner's count of each rank's bytes, from the configuration alone, is what the
        // rank read.
        for (r, loaded) in group.rank_loaded_bytes().into_iter().enumerate() {
            let predicted = group.placement().rank(r).weight_bytes(&config, dense);
            assert_eq!(
                loaded,
                predicted,
                "{} tp {tp} × pp {pp}: rank {r}",
                model.display()
            );
        }
        eprintln!(
            "{}: tp {tp} × pp {pp} (layers {:?}): PPL {got:.6} vs {want:.6} ({rel:.1e}), logits ±{diff:.1e}, stage seconds {:?}",
            model.display(),
            group.placement().stages.counts(),
            group.stage_seconds()
        );
    }
}

#[test]
fn smollm2_placements_agree_with_one_rank() {
    let model = testkit::smollm2_f32();
    let text = std::fs::read_to_string(testkit::wiki_test()).unwrap();
    let tokens = Tokenizer::from_dir(&model).unwrap().encode(&text, false).unwrap();
    check(&model, &tokens);

    let tmp = tempfile::tempdir().unwrap();
    let rtn = tmp.path().join("rtn-g64");
    let options = QuantizeOptions::rtn(GroupSize::new(64).unwrap());
    quantize(&model, &rtn, &options, |_| {}).unwrap();
    check(&rtn, &tokens);
}
