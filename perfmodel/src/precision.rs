//! Storage and math precisions of weight classes.
//!
//! Bytes per parameter include block scales: NVFP4 stores E2M1 values with one
//! FP8 E4M3 scale per 16 elements (plus a per-tensor FP32 scale, negligible);
//! FP8 blocks store E4M3 values with one scale per 128x128 block.

use serde::Serialize;

use crate::hardware::Hardware;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Nvfp4,
    Fp8,
    Bf16,
}

impl Precision {
    /// Bytes per parameter including scales.
    pub fn bytes_per_param(self) -> f64 {
        match self {
            Precision::Nvfp4 => 0.5 + 1.0 / 16.0,
            Precision::Fp8 => 1.0 + 4.0 / (128.0 * 128.0),
            Precision::Bf16 => 2.0,
        }
    }

    /// Dense tensor-core throughput for GEMMs whose weights use this precision.
    pub fn flops(self, hw: &Hardware) -> f64 {
        match self {
            Precision::Nvfp4 => hw.fp4_flops,
            Precision::Fp8 => hw.fp8_flops,
            Precision::Bf16 => hw.bf16_flops,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvfp4_is_a_bit_over_half_a_byte() {
        assert!((Precision::Nvfp4.bytes_per_param() - 0.5625).abs() < 1e-12);
        assert!(Precision::Fp8.bytes_per_param() > 1.0 && Precision::Fp8.bytes_per_param() < 1.001);
    }
}
