//! Which entries a shard of a zoo runs. Every machine computes the same assignment from the
//! zoo file alone (and, for `--balance size`, the models' configurations), so shards need no
//! coordination.
//!
//! - round-robin (the default): entry `i` goes to shard `i mod N`. It needs nothing but the
//!   zoo file, so a CI job can plan its matrix before any model is downloaded;
//! - size: longest processing time first — entries by estimated cost, largest first (ties by
//!   file order), each to the shard with the least cost so far (ties to the lowest shard).

use std::path::Path;

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use crate::job::{EvalKind, Job};

/// How entries are spread over shards.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// Entry i to shard i mod N.
    #[default]
    RoundRobin,
    /// By estimated cost, largest first, each to the least loaded shard.
    Size,
}

/// Shard `index` of `count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// The whole zoo.
    pub const ALL: Shard = Shard { index: 0, count: 1 };
}

/// `--shard`: a given shard, or the scheduler's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShardArg {
    Given(Shard),
    /// From the environment ([`from_env`]).
    Auto,
}

/// Parses `K/N` (0 ≤ K < N) or `auto`.
pub fn parse_shard_arg(s: &str) -> Result<ShardArg, String> {
    if s == "auto" {
        return Ok(ShardArg::Auto);
    }
    parse_shard(s).map(ShardArg::Given)
}

fn parse_shard(s: &str) -> Result<Shard, String> {
    let (k, n) = s
        .split_once('/')
        .ok_or_else(|| format!("`{s}`: expected K/N or auto"))?;
    let number = |v: &str, what: &str| -> Result<usize, String> {
        v.trim()
            .parse()
            .map_err(|_| format!("`{s}`: {what} is not a number"))
    };
    let (index, count) = (number(k, "K")?, number(n, "N")?);
    if count == 0 || index >= count {
        return Err(format!("`{s}`: need 0 ≤ K < N"));
    }
    Ok(Shard { index, count })
}

/// The variables [`from_env`] reads, in the order it tries them.
pub const SHARD_VARIABLES: &str = "AWQ_SHARD (K/N); SLURM_ARRAY_TASK_ID with SLURM_ARRAY_TASK_COUNT \
    or SLURM_ARRAY_TASK_MIN and SLURM_ARRAY_TASK_MAX; JOB_COMPLETION_INDEX with AWQ_SHARD_COUNT";

/// The shard a scheduler gave this process: `AWQ_SHARD=K/N` (GitHub Actions matrices and
/// anything else), a Slurm job array (`SLURM_ARRAY_TASK_ID` counted from
/// `SLURM_ARRAY_TASK_MIN`, of `SLURM_ARRAY_TASK_COUNT` tasks or `MAX − MIN + 1`), or a
/// Kubernetes Indexed Job (`JOB_COMPLETION_INDEX` of `AWQ_SHARD_COUNT`, which the Job sets to
/// its `completions`). `var` reads a variable.
pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Shard, String> {
    let number = |name: &str| -> Result<Option<usize>, String> {
        match var(name) {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| format!("{name}={v:?} is not a number")),
        }
    };
    let checked = |index: usize, count: usize, from: &str| -> Result<Shard, String> {
        if count == 0 || index >= count {
            return Err(format!(
                "{from}: shard {index} of {count} (need 0 ≤ index < count)"
            ));
        }
        Ok(Shard { index, count })
    };
    if let Some(v) = var("AWQ_SHARD") {
        return parse_shard(&v).map_err(|e| format!("AWQ_SHARD: {e}"));
    }
    if let Some(id) = number("SLURM_ARRAY_TASK_ID")? {
        let min = number("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
        let count = match (number("SLURM_ARRAY_TASK_COUNT")?, number("SLURM_ARRAY_TASK_MAX")?) {
            (Some(count), _) => count,
            (None, Some(max)) if max >= min => max - min + 1,
            _ => {
                return Err(
                    "SLURM_ARRAY_TASK_ID is set but neither SLURM_ARRAY_TASK_COUNT nor \
                    SLURM_ARRAY_TASK_MIN/MAX says how many tasks the array has"
                        .into(),
                );
            }
        };
        if id < min {
            return Err(format!(
                "SLURM_ARRAY_TASK_ID={id} is below SLURM_ARRAY_TASK_MIN={min}"
            ));
        }
        return checked(id - min, count, "Slurm array");
    }
    if let Some(index) = number("JOB_COMPLETION_INDEX")? {
        let count = number("AWQ_SHARD_COUNT")?.ok_or(
            "JOB_COMPLETION_INDEX is set (a Kubernetes Indexed Job) but AWQ_SHARD_COUNT is not: \
             set it to the Job's completions",
        )?;
        return checked(index, count, "Kubernetes Indexed Job");
    }
    Err(format!(
        "--shard auto: no shard in the environment (looked for {SHARD_VARIABLES})"
    ))
}

/// Calibration tokens count this many times an evaluated token's work: the scale search runs
/// each layer's groups over the calibration blocks once per grid point. Measured on
/// SmolLM2-135M (128 blocks of 512, 20 grid points): quantization ≈ 3.3× the time per token
/// of evaluation.
pub const CALIBRATION_WEIGHT: f64 = 4.0;

/// The estimated cost of a job, in parameter·tokens: its model's parameters times the
/// calibration tokens of an AWQ quantization (weighted by [`CALIBRATION_WEIGHT`]) plus every
/// evaluated token (twice for a `kl` evaluation, which runs two models). An evaluation of the
/// whole text counts a token per 4 bytes of it.
pub fn cost(job: &Job) -> f64 {
    let parameters = job.model_config.parameters() as f64;
    let calibration = job.quant.as_ref().map_or(0.0, |q| match q.calib_path {
        Some(_) => (q.options.calib.samples * q.options.calib.seq_len) as f64 * CALIBRATION_WEIGHT,
        None => 0.0,
    });
    let evaluated: f64 = job
        .evals
        .iter()
        .map(|e| {
            let tokens = match e.windows {
                Some(w) => (w * e.ctx) as f64,
                None => file_len(&e.data) as f64 / 4.0,
            };
            tokens * if e.kind == EvalKind::Kl { 2.0 } else { 1.0 }
        })
        .sum();
    parameters * (calibration + evaluated)
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// The shard of each entry, given each entry's cost (needed for [`Balance::Size`]).
pub fn assign(costs: &[Option<f64>], count: usize, balance: Balance) -> Result<Vec<usize>, usize> {
    match balance {
        Balance::RoundRobin => Ok((0..costs.len()).map(|i| i % count).collect()),
        Balance::Size => {
            let mut order: Vec<(usize, f64)> = costs
                .iter()
                .enumerate()
                .map(|(i, c)| c.map(|c| (i, c)).ok_or(i))
                .collect::<Result<_, _>>()?;
            order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let mut load = vec![0f64; count];
            let mut shard = vec![0; costs.len()];
            for (i, c) in order {
                let lightest = (0..count)
                    .min_by(|&a, &b| load[a].total_cmp(&load[b]).then(a.cmp(&b)))
                    .expect("at least one shard");
                load[lightest] += c;
                shard[i] = lightest;
            }
            Ok(shard)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn schedulers_give_the_shard() {
        let shard = |pairs: &[(&str, &str)]| from_env(env(pairs));
        assert_eq!(shard(&[("AWQ_SHARD", "2/5")]), Ok(Shard { index: 2, count: 5 }));
        // Slurm: --array=1-4 gives MIN 1, MAX 4; task 3 is shard 2 of 4.
        let slurm = [
            ("SLURM_ARRAY_TASK_ID", "3"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_MAX", "4"),
        ];
        assert_eq!(shard(&slurm), Ok(Shard { index: 2, count: 4 }));
        let slurm = [("SLURM_ARRAY_TASK_ID", "0"), ("SLURM_ARRAY_TASK_COUNT", "3")];
        assert_eq!(shard(&slurm), Ok(Shard { index: 0, count: 3 }));
        let k8s = [("JOB_COMPLETION_INDEX", "1"), ("AWQ_SHARD_COUNT", "2")];
        assert_eq!(shard(&k8s), Ok(Shard { index: 1, count: 2 }));
        // AWQ_SHARD wins over a scheduler's variables.
        assert_eq!(
            shard(&[
                ("AWQ_SHARD", "0/2"),
                ("JOB_COMPLETION_INDEX", "1"),
                ("AWQ_SHARD_COUNT", "2")
            ]),
            Ok(Shard { index: 0, count: 2 })
        );
    }

    #[test]
    fn missing_or_inconsistent_environments_name_the_variables() {
        let err = from_env(env(&[])).unwrap_err();
        assert!(
            err.contains("AWQ_SHARD")
                && err.contains("SLURM_ARRAY_TASK_ID")
                && err.contains("JOB_COMPLETION_INDEX"),
            "{err}"
        );
        assert!(
            from_env(env(&[("JOB_COMPLETION_INDEX", "0")]))
                .unwrap_err()
                .contains("AWQ_SHARD_COUNT")
        );
        assert!(from_env(env(&[("JOB_COMPLETION_INDEX", "2"), ("AWQ_SHARD_COUNT", "2")])).is_err());
        assert!(
            from_env(env(&[("SLURM_ARRAY_TASK_ID", "5")]))
                .unwrap_err()
                .contains("SLURM_ARRAY_TASK_COUNT")
        );
        assert!(
            from_env(env(&[
                ("SLURM_ARRAY_TASK_ID", "x"),
                ("SLURM_ARRAY_TASK_COUNT", "2")
            ]))
            .is_err()
        );
        assert!(
            from_env(env(&[("AWQ_SHARD", "3/3")]))
                .unwrap_err()
                .contains("AWQ_SHARD")
        );
        assert_eq!(parse_shard_arg("auto"), Ok(ShardArg::Auto));
        assert!(parse_shard_arg("1/0").is_err());
    }

    #[test]
    fn every_entry_lands_in_exactly_one_shard() {
        let costs: Vec<Option<f64>> = [70.0, 7.0, 7.0, 13.0, 1.0, 8.0, 0.5, 70.0, 3.0]
            .map(Some)
            .to_vec();
        for balance in [Balance::RoundRobin, Balance::Size] {
            for count in 1..=4 {
                let shard = assign(&costs, count, balance).unwrap();
                assert_eq!(shard.len(), costs.len());
                assert!(shard.iter().all(|&s| s < count));
            }
        }
        // Longest first: the two 70s go to different shards, the small ones fill the gaps.
        let shard = assign(&costs, 2, Balance::Size).unwrap();
        assert_ne!(shard[0], shard[7]);
        let load = |s: usize| -> f64 {
            costs
                .iter()
                .zip(&shard)
                .filter(|(_, k)| **k == s)
                .map(|(c, _)| c.unwrap())
                .sum()
        };
        assert!((load(0) - load(1)).abs() <= 13.0, "{} vs {}", load(0), load(1));
        let rr = assign(&costs, 3, Balance::RoundRobin).unwrap();
        assert_eq!(rr, vec![0, 1, 2, 0, 1, 2, 0, 1, 2]);
        // An unknown cost is refused, naming the entry.
        assert_eq!(assign(&[Some(1.0), None], 2, Balance::Size), Err(1));
    }
}
