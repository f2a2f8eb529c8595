//! KL divergence between a model and a base model: zero against itself; against a direct
//! computation from both models' full logits for a quantized tiny model; and through
//! `evaluate_checkpoint --kl-base`, whose report carries the statistics and whose perplexity
//! is the model's own.

use awq_pack::{GroupSize, QuantizeOptions, quantize};
use evaluation::kl::kl_divergence;
use evaluation::perplexity::{Protocol, WindowPlan, evaluate};
use evaluation::{Device, EvalRequest, evaluate_checkpoint};
use tp_runtime::{CpuBackend, Model, PlacementRequest, SeqLayout};

const CTX: usize = 32;

fn tokens() -> Vec<u32> {
    testkit::tiny::input_ids("tiny-llama", 1, 6 * CTX, 512).remove(0)
}

#[test]
fn a_model_does_not_diverge_from_itself() {
    let t = testkit::tiny("tiny-llama");
    let model = Model::load(&t.dir, CpuBackend::new()).unwrap();
    let tokens = tokens();
    let plan = WindowPlan::new(tokens.len(), CTX, None, Protocol::Full, None).unwrap();
    let s = kl_divergence(&model, &model, &tokens, &plan, |_, _| {}).unwrap();
    assert_eq!(s.predictions, 6 * (CTX - 1));
    assert!(
        s.kld.mean.abs() < 1e-12 && s.kld_spread.max.abs() < 1e-12,
        "{:?}",
        s.kld
    );
    assert_eq!(s.same_top.mean, 1.0);
    assert_eq!(s.delta_p.mean, 0.0);
    assert_eq!(s.ln_ppl_ratio.mean, 0.0);
    assert!((s.token_nll_correlation - 1.0).abs() < 1e-9);
    // Its perplexity is the one the NLL path computes.
    let ppl = evaluate(&model, &tokens, &plan, 1, |_, _| {}).unwrap().ppl;
    assert!(((s.ppl - ppl) / ppl).abs() < 1e-6, "{} vs {ppl}", s.ppl);
}

/// The statistics straight from both models' logits, every row, in f64.
fn direct(base: &Model<CpuBackend>, model: &Model<CpuBackend>, tokens: &[u32]) -> (f64, f64, f64, f64) {
    let rows: Vec<usize> = (0..CTX - 1).collect();
    let (mut kld, mut same, mut dp, mut n) = (0.0, 0.0, 0.0, 0.0);
    let mut max_kld = 0f64;
    for window in tokens.chunks_exact(CTX) {
        let layout = SeqLayout::single(CTX).unwrap();
        let p = base
            .logits(&base.forward(window, &layout).unwrap(), &rows)
            .unwrap();
        let q = model
            .logits(&model.forward(window, &layout).unwrap(), &rows)
            .unwrap();
        for (r, (p, q)) in p.iter().zip(&q).enumerate() {
            let softmax = |l: &[f32]| {
                let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let e: Vec<f64> = l.iter().map(|&x| (x as f64 - m).exp()).collect();
                let z: f64 = e.iter().sum();
                e.into_iter().map(|x| x / z).collect::<Vec<f64>>()
            };
            let (pp, qq) = (softmax(p), softmax(q));
            let row_kld: f64 = pp.iter().zip(&qq).map(|(a, b)| a * (a / b).ln()).sum();
            kld += row_kld;
            max_kld = max_kld.max(row_kld);
            let argmax = |v: &[f64]| (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b });
            same += f64::from(u8::from(argmax(&pp) == argmax(&qq)));
            let target = window[r + 1] as usize;
            dp += qq[target] - pp[target];
            n += 1.0;
        }
    }
    (kld / n, max_kld, same / n, dp / n)
}

/// The tiny model quantized with RTN at group size 16, beside it.
fn rtn_g16(t: &testkit::TinyModel) -> std::path::PathBuf {
    let rtn = t.root().join("rtn-g16");
    quantize(
        &t.dir,
        &rtn,
        &QuantizeOptions::rtn(GroupSize::new(16).unwrap()),
        |_| {},
    )
    .unwrap();
    rtn
}

#[test]
fn a_quantized_tiny_model_matches_the_direct_computation() {
    let t = testkit::tiny("tiny-llama");
    let rtn = rtn_g16(&t);
    let base = Model::load(&t.dir, CpuBackend::new()).unwrap();
    let model = Model::load(&rtn, CpuBackend::new()).unwrap();
    let tokens = tokens();
    let plan = WindowPlan::new(tokens.len(), CTX, None, Protocol::Full, None).unwrap();
    let s = kl_divergence(&base, &model, &tokens, &plan, |_, _| {}).unwrap();
    let (kld, max_kld, same, dp) = direct(&base, &model, &tokens);
    eprintln!(
        "tiny-llama RTN g16: mean KLD {} (direct {kld}), same top {} (direct {same})",
        s.kld.mean, s.same_top.mean
    );
    assert!(
        kld > 1e-4,
        "quantization should move the distributions (KLD {kld})"
    );
    assert!(((s.kld.mean - kld) / kld).abs() < 1e-6);
    assert!(((s.kld_spread.max - max_kld) / max_kld).abs() < 1e-6);
    assert_eq!(s.same_top.mean, same);
    assert!((s.delta_p.mean - dp).abs() < 1e-9);
    assert!(s.kld.uncertainty > 0.0 && s.kld_spread.median <= s.kld_spread.max);
}

#[test]
fn evaluate_checkpoint_reports_the_comparison() {
    let t = testkit::tiny_with_tokenizer("tiny-qwen2");
    let rtn = rtn_g16(&t);
    let data = t.root().join("eval.txt");
    std::fs::write(&data, testkit::synthetic_text(60)).unwrap();
    let request = |kl_base| EvalRequest {
        model: rtn.clone(),
        data: data.clone(),
        ctx: 64,
        windows: Some(4),
        protocol: Protocol::Full,
        batch: 1,
        device: Device::Cpu,
        placement: PlacementRequest::default(),
        kl_base,
        compute: tp_runtime::ComputeRequest::F32,
    };
    let plain = evaluate_checkpoint(&request(None), |_| {}).unwrap();
    assert!(plain.kl.is_none() && plain.kind == "perplexity");
    let compared = evaluate_checkpoint(&request(Some(t.dir.clone())), |_| {}).unwrap();
    assert_eq!(compared.kind, "kl");
    let kl = compared.kl.as_ref().expect("a kl section");
    assert!(kl.stats.kld.mean > 0.0 && kl.stats.same_top.mean > 0.5);
    assert_eq!(kl.base.dir, t.dir.display().to_string());
    // The model's perplexity from full logits is the NLL path's.
    assert!(
        ((compared.ppl - plain.ppl) / plain.ppl).abs() < 1e-5,
        "{} vs {}",
        compared.ppl,
        plain.ppl
    );
    // The base's own perplexity is what evaluating it gives.
    let base = evaluate_checkpoint(
        &EvalRequest {
            model: t.dir.clone(),
            ..request(None)
        },
        |_| {},
    )
    .unwrap();
    assert!(((kl.stats.ppl_base - base.ppl) / base.ppl).abs() < 1e-5);
}
