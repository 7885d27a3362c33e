//! Hardware catalog: the per-GPU facts the model needs for each SKU.
//!
//! Figures are per GPU unless a field says otherwise. Rack-scale SKUs
//! (GB200/GB300 NVL72) have a 72-GPU NVLink domain of 18 four-GPU trays;
//! single-node SKUs (B200, H200 HGX) have an 8-GPU domain that is one node.
//! An EP or TP group never spans a domain, so `gpus_per_domain` bounds every
//! worker shape.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::{Error, Result};

const GB: f64 = 1e9;
const TB: f64 = 1e12;
const PFLOPS: f64 = 1e15;

/// A GPU system the planner knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Sku {
    Gb200,
    Gb300,
    B200,
    H200,
}

impl Sku {
    /// Every SKU in the catalog, rack-scale first.
    pub const ALL: [Sku; 4] = [Sku::Gb200, Sku::Gb300, Sku::B200, Sku::H200];

    /// The short, lowercase name used in CLI flags, CRDs and CSV files.
    pub fn as_str(self) -> &'static str {
        match self {
            Sku::Gb200 => "gb200",
            Sku::Gb300 => "gb300",
            Sku::B200 => "b200",
            Sku::H200 => "h200",
        }
    }

    /// The catalog entry for this SKU.
    pub fn hardware(self) -> Hardware {
        match self {
            Sku::Gb200 => Hardware {
                sku: self,
                name: "NVIDIA GB200 NVL72",
                hbm_bytes: 192.0 * GB,
                usable_hbm_bytes: 186.0 * GB,
                hbm_bandwidth: 8.0 * TB,
                fp4_flops: 10.0 * PFLOPS,
                fp8_flops: 5.0 * PFLOPS,
                bf16_flops: 2.5 * PFLOPS,
                nvlink_bandwidth: 900.0 * GB,
                scaleout_bandwidth: 400e9 / 8.0,
                gpus_per_tray: 4,
                gpus_per_domain: 72,
                host_memory_per_tray_bytes: 960.0 * GB,
                tco_usd_per_gpu_hour: 2.21,
            },
            Sku::Gb300 => Hardware {
                sku: self,
                name: "NVIDIA GB300 NVL72",
                hbm_bytes: 288.0 * GB,
                usable_hbm_bytes: 279.0 * GB,
                hbm_bandwidth: 8.0 * TB,
                fp4_flops: 15.0 * PFLOPS,
                fp8_flops: 5.0 * PFLOPS,
                bf16_flops: 2.5 * PFLOPS,
                nvlink_bandwidth: 900.0 * GB,
                scaleout_bandwidth: 800e9 / 8.0,
                gpus_per_tray: 4,
                gpus_per_domain: 72,
                host_memory_per_tray_bytes: 960.0 * GB,
                tco_usd_per_gpu_hour: 2.65,
            },
            // HGX B200: 8 GPUs on NVLink 5 in one node. TCO is an estimate
            // (no InferenceX figure is given for it).
            Sku::B200 => Hardware {
                sku: self,
                name: "NVIDIA HGX B200",
                hbm_bytes: 180.0 * GB,
                usable_hbm_bytes: 174.0 * GB,
                hbm_bandwidth: 8.0 * TB,
                fp4_flops: 9.0 * PFLOPS,
                fp8_flops: 4.5 * PFLOPS,
                bf16_flops: 2.25 * PFLOPS,
                nvlink_bandwidth: 900.0 * GB,
                scaleout_bandwidth: 400e9 / 8.0,
                gpus_per_tray: 8,
                gpus_per_domain: 8,
                host_memory_per_tray_bytes: 2048.0 * GB,
                tco_usd_per_gpu_hour: 1.95,
            },
            // HGX H200: Hopper has no FP4 tensor cores, so FP4 weights run
            // through FP8 math (weights stay 4-bit in memory).
            Sku::H200 => Hardware {
                sku: self,
                name: "NVIDIA HGX H200",
                hbm_bytes: 141.0 * GB,
                usable_hbm_bytes: 136.0 * GB,
                hbm_bandwidth: 4.8 * TB,
                fp4_flops: 1.979 * PFLOPS,
                fp8_flops: 1.979 * PFLOPS,
                bf16_flops: 0.989 * PFLOPS,
                nvlink_bandwidth: 450.0 * GB,
                scaleout_bandwidth: 400e9 / 8.0,
                gpus_per_tray: 8,
                gpus_per_domain: 8,
                host_memory_per_tray_bytes: 2048.0 * GB,
                tco_usd_per_gpu_hour: 1.60,
            },
        }
    }
}

impl fmt::Display for Sku {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Sku {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let norm = s.trim().to_ascii_lowercase().replace(['-', '_', ' '], "");
        let sku = match norm.as_str() {
            "gb200" | "gb200nvl72" | "nvidiagb200" => Sku::Gb200,
            "gb300" | "gb300nvl72" | "nvidiagb300" => Sku::Gb300,
            "b200" | "hgxb200" | "nvidiab200" => Sku::B200,
            "h200" | "hgxh200" | "nvidiah200" => Sku::H200,
            _ => {
                return Err(Error::UnknownSku {
                    given: s.to_string(),
                    known: Sku::ALL
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        };
        Ok(sku)
    }
}

/// Per-GPU capabilities of one SKU. Bandwidths are bytes/s per direction,
/// compute is dense FLOP/s.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Hardware {
    pub sku: Sku,
    pub name: &'static str,
    /// HBM capacity as sold.
    pub hbm_bytes: f64,
    /// What remains for weights, KV and activations after the driver and
    /// runtime take theirs.
    pub usable_hbm_bytes: f64,
    pub hbm_bandwidth: f64,
    pub fp4_flops: f64,
    pub fp8_flops: f64,
    pub bf16_flops: f64,
    /// NVLink bandwidth per GPU per direction (inside the domain).
    pub nvlink_bandwidth: f64,
    /// Scale-out NIC bandwidth per GPU per direction (across domains).
    pub scaleout_bandwidth: f64,
    pub gpus_per_tray: u32,
    /// GPUs sharing one NVLink domain: the widest possible EP or TP group.
    pub gpus_per_domain: u32,
    pub host_memory_per_tray_bytes: f64,
    pub tco_usd_per_gpu_hour: f64,
}

impl Hardware {
    /// Bandwidth between two GPUs of a group of `width` GPUs: NVLink when
    /// the group fits in one domain, scale-out otherwise.
    pub fn group_link_bandwidth(&self, width: u32) -> f64 {
        if width <= self.gpus_per_domain {
            self.nvlink_bandwidth
        } else {
            self.scaleout_bandwidth
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_aliases_and_rejects_unknown() {
        assert_eq!("GB300".parse::<Sku>().unwrap(), Sku::Gb300);
        assert_eq!("gb200-nvl72".parse::<Sku>().unwrap(), Sku::Gb200);
        let err = "mi300x".parse::<Sku>().unwrap_err().to_string();
        assert!(err.contains("mi300x") && err.contains("gb300"), "{err}");
    }

    #[test]
    fn gb300_differs_from_gb200_in_hbm_and_fp4_only() {
        let (a, b) = (Sku::Gb200.hardware(), Sku::Gb300.hardware());
        assert!((b.hbm_bytes / a.hbm_bytes - 1.5).abs() < 1e-9);
        assert!((b.fp4_flops / a.fp4_flops - 1.5).abs() < 1e-9);
        assert_eq!(a.hbm_bandwidth, b.hbm_bandwidth);
        assert_eq!(a.fp8_flops, b.fp8_flops);
        assert_eq!(a.gpus_per_domain, 72);
        assert_eq!(a.group_link_bandwidth(64), a.nvlink_bandwidth);
        assert_eq!(a.group_link_bandwidth(144), a.scaleout_bandwidth);
    }
}
