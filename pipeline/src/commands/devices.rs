//! `awq devices`: the GPUs a placement would use — name, memory,
//! compute capability, driver and CUDA versions, NCCL, peer access between every pair.
//! Without a GPU it says so in one line and succeeds: the planner still works from
//! `--devices` and `--device-memory`.

use anyhow::Result;
use clap::Args;

/// Arguments of `awq devices`.
#[derive(Debug, Args)]
pub struct DevicesArgs {}

/// A GPU as the planner needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gpu {
    pub name: String,
    pub total_memory: u64,
}

/// The GPUs of this machine (none without the `cuda` feature or a driver).
pub fn gpus() -> Result<Vec<Gpu>> {
    #[cfg(feature = "cuda")]
    {
        Ok(cuda_kernels::devices::probe()
            .unwrap_or_default()
            .into_iter()
            .map(|d| Gpu {
                name: d.name,
                total_memory: d.total_memory,
            })
            .collect())
    }
    #[cfg(not(feature = "cuda"))]
    Ok(Vec::new())
}

/// Runs `awq devices`.
pub fn run(_: &DevicesArgs) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        use cuda_kernels::devices::{MIN_CAPABILITY, driver_version, peer_access, probe};
        use tp_runtime::planner::gib;
        let devices = match probe() {
            Ok(d) => d,
            Err(e) => {
                println!("no GPU: {e}; plans can still be made with --devices and --device-memory");
                return Ok(());
            }
        };
        let (major, minor) = driver_version()?;
        println!(
            "CUDA driver {major}.{minor}; NCCL {}",
            if tp_runtime::comm::nccl_available() {
                "found"
            } else {
                "not found (tp > 1 on GPUs needs it)"
            }
        );
        println!("| GPU | name | memory | free | capability | supported |");
        println!("|---:|---|---:|---:|---:|---|");
        for d in &devices {
            println!(
                "| {} | {} | {} | {} | {}.{} | {} |",
                d.ordinal,
                d.name,
                gib(d.total_memory),
                gib(d.free_memory),
                d.capability.0,
                d.capability.1,
                if d.supported() {
                    "yes".to_string()
                } else {
                    format!("no (needs {}.{})", MIN_CAPABILITY.0, MIN_CAPABILITY.1)
                }
            );
        }
        if devices.len() > 1 {
            println!("peer access (row reads column):");
            for a in &devices {
                let row: Vec<String> = devices
                    .iter()
                    .map(|b| match peer_access(a.ordinal, b.ordinal) {
                        Ok(true) => "yes".into(),
                        Ok(false) => "no".into(),
                        Err(e) => format!("? ({e})"),
                    })
                    .collect();
                println!("  {}: {}", a.ordinal, row.join(" "));
            }
        }
        let names: std::collections::BTreeSet<&str> = devices.iter().map(|d| d.name.as_str()).collect();
        if names.len() > 1 {
            crate::progress::log(format!(
                "warning: mixed GPU models ({}); plans use the smallest memory",
                names.into_iter().collect::<Vec<_>>().join(", ")
            ));
        }
        if let Some(bad) = devices.iter().find(|d| !d.supported()) {
            anyhow::bail!(
                "GPU {} ({}) has compute capability {}.{}; our kernels need {}.{} or newer",
                bad.ordinal,
                bad.name,
                bad.capability.0,
                bad.capability.1,
                MIN_CAPABILITY.0,
                MIN_CAPABILITY.1
            );
        }
        Ok(())
    }
    #[cfg(not(feature = "cuda"))]
    {
        println!(
            "no GPU: this build has no CUDA support (the `cuda` feature); plans can still be made with --devices and --device-memory"
        );
        Ok(())
    }
}
