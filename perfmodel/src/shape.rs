//! Worker shapes: how one worker's GPUs split the model.
//!
//! A prefill worker uses tensor parallelism (TP = t). A decode worker either
//! runs data-parallel attention with expert parallelism across its ranks
//! (EP = e: every rank keeps the non-expert weights, routed experts are split
//! e ways) or plain tensor parallelism. A worker never spans an NVLink domain.

use std::fmt;

use serde::{Serialize, Serializer};

use crate::hardware::Hardware;
use crate::model::ModelProfile;
use crate::{Error, Result};

/// Which pool a worker serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Prefill,
    Decode,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        })
    }
}

/// How a worker's ranks split the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Parallelism {
    /// Tensor parallel across `0` GPUs (weights and heads split).
    Tp(u32),
    /// Data-parallel attention with routed experts split across `0` GPUs.
    Ep(u32),
}

impl Parallelism {
    pub fn gpus(self) -> u32 {
        match self {
            Parallelism::Tp(n) | Parallelism::Ep(n) => n,
        }
    }
}

impl fmt::Display for Parallelism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Parallelism::Tp(n) => write!(f, "TP{n}"),
            Parallelism::Ep(n) => write!(f, "DEP{n}"),
        }
    }
}

impl Serialize for Parallelism {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// One worker: its role and how its GPUs split the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct WorkerShape {
    pub role: Role,
    pub parallelism: Parallelism,
}

impl WorkerShape {
    pub fn prefill_tp(tp: u32) -> Self {
        Self {
            role: Role::Prefill,
            parallelism: Parallelism::Tp(tp),
        }
    }

    pub fn decode_ep(ep: u32) -> Self {
        Self {
            role: Role::Decode,
            parallelism: Parallelism::Ep(ep),
        }
    }

    pub fn decode_tp(tp: u32) -> Self {
        Self {
            role: Role::Decode,
            parallelism: Parallelism::Tp(tp),
        }
    }

    pub fn gpus(&self) -> u32 {
        self.parallelism.gpus()
    }

    /// Checks the shape against the model and the NVLink domain.
    pub fn validate(&self, model: &ModelProfile, hw: &Hardware) -> Result<()> {
        let n = self.gpus();
        if n == 0 {
            return Err(Error::InvalidShape(format!(
                "{self}: width must be at least 1"
            )));
        }
        if matches!(self.parallelism, Parallelism::Tp(_)) && !n.is_power_of_two() {
            return Err(Error::InvalidShape(format!(
                "{self}: a TP width must be a power of two (heads split evenly)"
            )));
        }
        if n > hw.gpus_per_domain {
            return Err(Error::InvalidShape(format!(
                "{self}: {n} GPUs exceed the {}-GPU NVLink domain of {}",
                hw.gpus_per_domain, hw.name
            )));
        }
        if let Parallelism::Ep(e) = self.parallelism
            && !model.routed_experts.is_multiple_of(e)
        {
            return Err(Error::InvalidShape(format!(
                "{self}: EP width {e} does not divide the {} routed experts",
                model.routed_experts
            )));
        }
        Ok(())
    }
}

impl fmt::Display for WorkerShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.role, self.parallelism)
    }
}
