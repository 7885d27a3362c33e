//! NVFP4: the 4-bit floating-point format the routed experts are stored in.
//!
//! A tensor of `rows x cols` (cols a multiple of [`GROUP`]) is stored as
//! - `weight`: E2M1 codes packed two per byte, row-major, element `2i` in
//!   the low nibble and `2i + 1` in the high nibble (`rows x cols/2` bytes);
//! - `weight_scale`: one FP8 E4M3 scale per group of 16 consecutive
//!   elements of a row (`rows x cols/16` bytes);
//! - `weight_scale_2`: one FP32 scale for the whole tensor.
//!
//! An element decodes to `e2m1(code) * e4m3(group scale) * tensor scale`.
//! The quantiser picks the tensor scale so that the largest group scale is
//! E4M3's largest value (448) for a group holding the tensor's absolute
//! maximum: `tensor scale = amax / (6 * 448)`; a group of absolute maximum
//! `b` gets the E4M3 value nearest `b / (6 * tensor scale)`; each element the
//! E2M1 value nearest `x / (group scale * tensor scale)`, clamped to ±6.
//!
//! Error bound (checked by the round-trip test): with `S` the decoded
//! scale of an element's group, E2M1's largest gap is 2 (between 4 and 6),
//! so an element within ±6S is off by at most `S`; an element past 6S (the
//! group scale rounded down) is at most `b <= 6S * 16/15` and is clamped to
//! 6S, off by at most `0.4 S`. E4M3 keeps 3 mantissa bits, so a normal
//! scale is within a relative 2^-4 of the exact `b / 6`: `S <= (17/16)(b/6)`.
//! Hence `|x - x̂| <= (17/96) b` per element, plus, when the group scale is
//! an E4M3 subnormal (a group more than ~28,000x smaller than the tensor's
//! maximum), the subnormal's absolute rounding `2^-10 * tensor scale` times
//! the largest E2M1 value 6.

/// Elements sharing one FP8 scale.
pub const GROUP: usize = 16;
/// Largest E2M1 magnitude.
const E2M1_MAX: f32 = 6.0;
/// Largest finite E4M3 (FN) magnitude.
const E4M3_MAX: f32 = 448.0;
/// The eight E2M1 magnitudes, by code (sign in bit 3).
const E2M1: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// One quantised tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Nvfp4 {
    /// Rows (output features).
    pub rows: usize,
    /// Columns (input features), a multiple of [`GROUP`].
    pub cols: usize,
    /// Packed E2M1 codes, `rows * cols / 2` bytes.
    pub packed: Vec<u8>,
    /// E4M3 group scales, `rows * cols / GROUP` bytes.
    pub scales: Vec<u8>,
    /// The per-tensor FP32 scale.
    pub tensor_scale: f32,
}

/// The value of an E2M1 code (low 4 bits).
pub fn e2m1_decode(code: u8) -> f32 {
    let m = E2M1[usize::from(code & 7)];
    if code & 8 != 0 { -m } else { m }
}

/// The E2M1 code nearest `x` (ties to the even code), saturating at ±6.
pub fn e2m1_encode(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 8 } else { 0 };
    let a = x.abs();
    if a.is_nan() {
        return 0;
    }
    let mut best = 0u8;
    let mut best_err = f32::INFINITY;
    for (code, &m) in E2M1.iter().enumerate() {
        let err = (a - m).abs();
        // Codes ascend, so on a tie the even code wins when it comes second.
        if err < best_err || (err == best_err && code % 2 == 0) {
            best = code as u8;
            best_err = err;
        }
    }
    best | sign
}

/// The value of an FP8 E4M3 (FN: no infinities, one NaN) byte.
pub fn e4m3_decode(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((b >> 3) & 0xf);
    let man = f32::from(b & 7);
    if exp == 0xf && b & 7 == 7 {
        return f32::NAN;
    }
    let mag = if exp == 0 {
        man / 8.0 * 2f32.powi(-6)
    } else {
        (1.0 + man / 8.0) * 2f32.powi(exp - 7)
    };
    sign * mag
}

/// The E4M3 byte nearest a non-negative `x` (ties to the even code),
/// saturating at 448.
pub fn e4m3_encode(x: f32) -> u8 {
    let x = if x.is_nan() {
        0.0
    } else {
        x.clamp(0.0, E4M3_MAX)
    };
    let mut best = 0u8;
    let mut best_err = f32::INFINITY;
    // 0x7e is 448, the largest finite code; codes ascend with their value.
    for code in 0..=0x7eu8 {
        let err = (x - e4m3_decode(code)).abs();
        if err < best_err || (err == best_err && code % 2 == 0) {
            best = code;
            best_err = err;
        }
    }
    best
}

impl Nvfp4 {
    /// Quantises a row-major `rows x cols` tensor.
    pub fn quantize(values: &[f32], rows: usize, cols: usize) -> Result<Self, String> {
        if !cols.is_multiple_of(GROUP) || values.len() != rows * cols {
            return Err(format!(
                "NVFP4 needs {rows} x {cols} values with columns a multiple of {GROUP}; got {} values",
                values.len()
            ));
        }
        let amax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
        let tensor_scale = if amax > 0.0 && amax.is_finite() {
            amax / (E2M1_MAX * E4M3_MAX)
        } else {
            1.0
        };
        let mut packed = vec![0u8; values.len() / 2];
        let mut scales = Vec::with_capacity(values.len() / GROUP);
        for (g, group) in values.chunks(GROUP).enumerate() {
            let b = group.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale_code = e4m3_encode(b / (E2M1_MAX * tensor_scale));
            scales.push(scale_code);
            let s = e4m3_decode(scale_code) * tensor_scale;
            for (i, &v) in group.iter().enumerate() {
                let code = if s > 0.0 { e2m1_encode(v / s) } else { 0 };
                let at = g * GROUP + i;
                packed[at / 2] |= if at.is_multiple_of(2) {
                    code
                } else {
                    code << 4
                };
            }
        }
        Ok(Self {
            rows,
            cols,
            packed,
            scales,
            tensor_scale,
        })
    }

    /// Checks that the parts' sizes agree with `rows x cols`.
    pub fn check(&self) -> Result<(), String> {
        let n = self.rows * self.cols;
        if !self.cols.is_multiple_of(GROUP) {
            return Err(format!(
                "{} columns is not a multiple of {GROUP}",
                self.cols
            ));
        }
        if self.packed.len() != n / 2 {
            return Err(format!(
                "{} packed bytes for {} x {}; expected {}",
                self.packed.len(),
                self.rows,
                self.cols,
                n / 2
            ));
        }
        if self.scales.len() != n / GROUP {
            return Err(format!(
                "{} group scales for {} x {}; expected {}",
                self.scales.len(),
                self.rows,
                self.cols,
                n / GROUP
            ));
        }
        if !self.tensor_scale.is_finite() {
            return Err(format!("tensor scale {} is not finite", self.tensor_scale));
        }
        Ok(())
    }

    /// The row-major values the tensor stands for.
    pub fn dequantize(&self) -> Vec<f32> {
        let n = self.rows * self.cols;
        (0..n)
            .map(|at| {
                let byte = self.packed[at / 2];
                let code = if at.is_multiple_of(2) {
                    byte & 0xf
                } else {
                    byte >> 4
                };
                let s = e4m3_decode(self.scales[at / GROUP]) * self.tensor_scale;
                e2m1_decode(code) * s
            })
            .collect()
    }

    /// The largest error [`Self::quantize`] may make on an element of a
    /// group whose absolute maximum is `group_amax` (see the module docs).
    pub fn error_bound(&self, group_amax: f32) -> f32 {
        group_amax * 17.0 / 96.0 + E2M1_MAX * self.tensor_scale * 2f32.powi(-10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// splitmix64-driven normal samples (Box-Muller), heavy-tailed by a
    /// per-row magnitude so groups differ widely in scale.
    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::cpu::weights::Rng::new(seed);
        (0..n)
            .map(|i| {
                let row_mag = 10f32.powi((i / 64 % 7) as i32 - 3);
                rng.normal() * row_mag
            })
            .collect()
    }

    #[test]
    fn formats_decode_their_known_values() {
        let e2m1: Vec<f32> = (0..16).map(e2m1_decode).collect();
        assert_eq!(
            e2m1,
            [
                0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0,
                -6.0
            ]
        );
        assert_eq!(e4m3_decode(0x7e), 448.0);
        assert_eq!(e4m3_decode(0x38), 1.0);
        assert_eq!(e4m3_decode(0x01), 2f32.powi(-9));
        assert!(e4m3_decode(0x7f).is_nan());
        // Every finite code encodes back to itself.
        for code in 0..=0x7eu8 {
            assert_eq!(e4m3_encode(e4m3_decode(code)), code, "code {code:#x}");
        }
        assert_eq!(e2m1_encode(2.5), 4, "ties go to the even code (2.0)");
        assert_eq!(e2m1_encode(-100.0), 15, "saturates at -6");
        assert_eq!(e4m3_encode(1e6), 0x7e);
    }

    #[test]
    fn round_trip_stays_within_the_derived_bound() {
        let (rows, cols) = (48, 128);
        let values = random(rows * cols, 42);
        let q = Nvfp4::quantize(&values, rows, cols).expect("quantize");
        q.check().expect("sizes");
        assert_eq!(q.packed.len(), rows * cols / 2);
        assert_eq!(q.scales.len(), rows * cols / GROUP);
        let back = q.dequantize();
        let mut worst = 0f32;
        for (group, (orig, got)) in values.chunks(GROUP).zip(back.chunks(GROUP)).enumerate() {
            let b = orig.iter().fold(0f32, |m, v| m.max(v.abs()));
            let bound = q.error_bound(b);
            for (x, y) in orig.iter().zip(got) {
                let err = (x - y).abs();
                assert!(err <= bound, "group {group}: |{x} - {y}| = {err} > {bound}");
                if b > 0.0 {
                    worst = worst.max(err / b);
                }
            }
        }
        // The bound is not vacuous: real errors come close to it, and the
        // dequantised tensor is far from the trivial all-zero answer.
        assert!(worst > 0.05, "worst relative error {worst}");
        let energy: f32 = values.iter().map(|v| v * v).sum();
        let noise: f32 = values.iter().zip(&back).map(|(x, y)| (x - y).powi(2)).sum();
        assert!(noise / energy < 0.02, "noise/energy {}", noise / energy);
    }

    #[test]
    fn exactly_representable_values_survive() {
        // Values on the E2M1 grid of their group's scale keep their codes,
        // so they come back up to the FP32 rounding of the scales.
        let vals: Vec<f32> = (0..32).map(|i| e2m1_decode(i as u8 % 16) * 0.25).collect();
        let q = Nvfp4::quantize(&vals, 2, 16).expect("quantize");
        for (x, y) in vals.iter().zip(q.dequantize()) {
            assert!((x - y).abs() <= 1e-6, "{x} vs {y}");
        }
    }

    #[test]
    fn refuses_shapes_it_cannot_group() {
        assert!(Nvfp4::quantize(&[0.0; 10], 1, 10).is_err());
        let mut q = Nvfp4::quantize(&[1.0; 32], 2, 16).expect("quantize");
        q.scales.pop();
        assert!(q.check().is_err());
        assert_eq!(
            Nvfp4::quantize(&[0.0; 16], 1, 16).map(|q| q.dequantize()),
            Ok(vec![0.0; 16])
        );
    }
}
