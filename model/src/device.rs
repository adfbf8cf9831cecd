//! Choosing where the model computes: `--device cpu | cuda | cuda:0,1,…`.
//!
//! Without `--device`, a machine whose driver reports GPUs uses them all, and any other uses the
//! CPU. An explicit `cuda` on a machine without a usable GPU is an error naming what is missing
//! (the driver library, the GPUs), never a panic.

use std::fmt;
use std::str::FromStr;

use crate::backend::cuda;
use crate::error::{Error, Result};

/// A device request as written on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The CPU backend (all cores, or the rayon pool's size).
    Cpu,
    /// GPUs: all of them (`cuda`) or the listed ordinals (`cuda:0,2`).
    Cuda(Option<Vec<usize>>),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim();
        let allowed = "allowed: cpu, cuda (every GPU), cuda:N or cuda:N,M,… (GPU ordinals)";
        match s.to_ascii_lowercase().as_str() {
            "cpu" => return Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => return Ok(DeviceSpec::Cuda(None)),
            _ => {}
        }
        let Some(list) = s.strip_prefix("cuda:") else {
            return Err(format!("unknown device {s:?}; {allowed}"));
        };
        let mut ids = Vec::new();
        for part in list.split(',') {
            let id: usize = part
                .trim()
                .parse()
                .map_err(|_| format!("{part:?} in {s:?} is not a GPU ordinal; {allowed}"))?;
            if ids.contains(&id) {
                return Err(format!("GPU {id} is listed twice in {s:?}"));
            }
            ids.push(id);
        }
        Ok(DeviceSpec::Cuda(Some(ids)))
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(None) => f.write_str("cuda"),
            DeviceSpec::Cuda(Some(ids)) => {
                let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
                write!(f, "cuda:{}", ids.join(","))
            }
        }
    }
}

/// Where a command computes, after checking the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    Cpu,
    /// GPU ordinals, in the order given.
    Cuda(Vec<usize>),
}

impl Placement {
    /// How many devices (ranks) this placement has: the CPU counts as one.
    pub fn len(&self) -> usize {
        match self {
            Placement::Cpu => 1,
            Placement::Cuda(ids) => ids.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Placement::Cpu => f.write_str("cpu"),
            Placement::Cuda(ids) => {
                let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
                write!(f, "cuda:{}", ids.join(","))
            }
        }
    }
}

/// Resolve a request (`None`: the default) against this machine.
pub fn resolve(spec: Option<&DeviceSpec>) -> Result<Placement> {
    match spec {
        None => Ok(match cuda::devices() {
            Ok(d) if !d.is_empty() => Placement::Cuda(d.iter().map(|d| d.ordinal).collect()),
            _ => Placement::Cpu,
        }),
        Some(DeviceSpec::Cpu) => Ok(Placement::Cpu),
        Some(DeviceSpec::Cuda(want)) => {
            let have = cuda::devices()?;
            match want {
                None => Ok(Placement::Cuda(have.iter().map(|d| d.ordinal).collect())),
                Some(ids) => {
                    if let Some(bad) = ids.iter().find(|i| **i >= have.len()) {
                        return Err(Error::device(
                            format!("cuda:{bad}"),
                            format!(
                                "this machine has {} GPU(s): cuda:0..=cuda:{}",
                                have.len(),
                                have.len() - 1
                            ),
                        ));
                    }
                    Ok(Placement::Cuda(ids.clone()))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form_and_names_the_allowed_ones() {
        assert_eq!("cpu".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
        assert_eq!("CUDA".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(None)));
        assert_eq!(
            "cuda:0,3".parse::<DeviceSpec>(),
            Ok(DeviceSpec::Cuda(Some(vec![0, 3])))
        );
        assert_eq!(
            "cuda:1".parse::<DeviceSpec>().unwrap().to_string(),
            "cuda:1"
        );
        let e = "tpu".parse::<DeviceSpec>().unwrap_err();
        assert!(
            e.contains("\"tpu\"") && e.contains("allowed: cpu, cuda"),
            "{e}"
        );
        let e = "cuda:x".parse::<DeviceSpec>().unwrap_err();
        assert!(e.contains("not a GPU ordinal"), "{e}");
        let e = "cuda:1,1".parse::<DeviceSpec>().unwrap_err();
        assert!(e.contains("twice"), "{e}");
    }

    #[test]
    fn cpu_is_always_available() {
        assert_eq!(resolve(Some(&DeviceSpec::Cpu)).unwrap(), Placement::Cpu);
    }

    /// Without the driver, `cuda` is an error that names the driver library and the default is
    /// the CPU; with it, the default is every GPU the driver reports.
    #[test]
    fn cuda_follows_the_driver() {
        if cuda::driver_present() {
            let n = cuda::devices().map(|d| d.len()).unwrap_or(0);
            let default = resolve(None).unwrap();
            assert_eq!(
                default,
                if n > 0 {
                    Placement::Cuda((0..n).collect())
                } else {
                    Placement::Cpu
                }
            );
        } else {
            let e = resolve(Some(&DeviceSpec::Cuda(None)))
                .unwrap_err()
                .to_string();
            assert!(e.contains("device cuda") && e.contains("libcuda.so"), "{e}");
            assert_eq!(resolve(None).unwrap(), Placement::Cpu);
        }
    }
}
