//! `awq eval`: perplexity of a checkpoint on a text file, with a reproducible JSON report.

use anyhow::Result;
use evaluation::kl::KlStats;
use evaluation::provenance;

use crate::cli::EvalArgs;
use crate::progress::{self, log};

/// Runs `awq eval`.
pub fn run(args: &EvalArgs) -> Result<()> {
    provenance::set_threads(args.threads)?;
    let report = progress::evaluate(&args.request())?;
    println!(
        "PPL {:.4}  (mean NLL {:.6}, {} predictions, {} windows of {}, protocol {}) {:.1} tokens/s on {}",
        report.ppl,
        report.mean_nll,
        report.predictions,
        report.windows,
        report.ctx,
        report.protocol,
        report.tokens_per_second,
        report.backend
    );
    if let Some(kl) = &report.kl {
        print_kl(&kl.stats, &kl.base.dir);
    }
    if let Some(path) = &args.json {
        evaluation::report::write(path, &report)?;
        log(format!("report written to {}", path.display()));
    }
    Ok(())
}

/// The KL-divergence statistics as `llama-perplexity --kl-divergence` lists them.
pub fn print_kl(s: &KlStats, base: &str) {
    let pct = |x: f64| 100.0 * x;
    println!("against {base} ({} predictions):", s.predictions);
    println!("| statistic | value |");
    println!("|---|---:|");
    println!("| PPL(Q) / PPL(base) | {:.4} / {:.4} |", s.ppl, s.ppl_base);
    println!(
        "| mean ln(PPL(Q)/PPL(base)) | {:.6} ± {:.6} |",
        s.ln_ppl_ratio.mean, s.ln_ppl_ratio.uncertainty
    );
    println!(
        "| correlation of token NLLs / window ln PPL | {:.2} % / {:.2} % |",
        pct(s.token_nll_correlation),
        pct(s.window_ln_ppl_correlation)
    );
    println!("| mean KLD | {:.6} ± {:.6} |", s.kld.mean, s.kld.uncertainty);
    println!("| max KLD | {:.6} |", s.kld_spread.max);
    for (f, v) in &s.kld_spread.percentiles {
        println!("| {:.1} % KLD | {v:.6} |", pct(*f));
    }
    println!("| median KLD | {:.6} |", s.kld_spread.median);
    println!(
        "| mean Δp | {:.3} ± {:.3} % |",
        pct(s.delta_p.mean),
        pct(s.delta_p.uncertainty)
    );
    println!(
        "| RMS Δp | {:.3} ± {:.3} % |",
        pct(s.delta_p_rms.mean),
        pct(s.delta_p_rms.uncertainty)
    );
    println!(
        "| Δp min / median / max | {:.3} / {:.3} / {:.3} % |",
        pct(s.delta_p_spread.min),
        pct(s.delta_p_spread.median),
        pct(s.delta_p_spread.max)
    );
    for (f, v) in &s.delta_p_spread.percentiles {
        println!("| {:.1} % Δp | {:.3} % |", pct(*f), pct(*v));
    }
    println!(
        "| same top token | {:.3} ± {:.3} % |",
        pct(s.same_top.mean),
        pct(s.same_top.uncertainty)
    );
}
