//! Compute backends. The CPU backend is the reference and the default without a GPU; the CUDA
//! backend runs the same graphs with hand-written kernels and cuBLASLt.

pub mod cpu;
pub mod cuda;

use crate::{Error, Result};

/// Where a model runs. Selection is explicit in the API; `Device::auto()` picks CUDA only when a
/// usable GPU and compiled kernels exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Device::Cuda(n)),
                _ => Err(Error::Input(format!(
                    "unknown device `{s}` (expected cpu, cuda or cuda:N)"
                ))),
            },
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}
