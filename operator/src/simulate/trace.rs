//! Load traces: phases of Poisson arrivals with nominal ISL and OSL.
//!
//! ```yaml
//! name: shift
//! phases:
//!   - {name: 8k1k, rate: 2.5, isl: 8192, osl: 1024, durationSeconds: 900}
//! ```
//!
//! Each request's ISL and OSL are drawn uniformly from 80-100% of the
//! phase's nominal values, as `rackscale bench` and InferenceX do.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A sequence of load phases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Trace {
    #[serde(default)]
    pub name: String,
    pub phases: Vec<Phase>,
}

/// Steady load for a while.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Phase {
    #[serde(default)]
    pub name: String,
    /// Mean arrivals per second (Poisson).
    pub rate: f64,
    /// Nominal input length in tokens.
    pub isl: u32,
    /// Nominal output length in tokens.
    pub osl: u32,
    pub duration_seconds: f64,
}

impl Trace {
    /// Parses and validates a YAML trace.
    pub fn from_yaml(text: &str) -> Result<Self> {
        let t: Trace =
            serde_yaml::from_str(text).map_err(|e| Error::Invalid(format!("trace YAML: {e}")))?;
        t.validate()?;
        Ok(t)
    }

    pub fn validate(&self) -> Result<()> {
        if self.phases.is_empty() {
            return Err(Error::Invalid("a trace needs at least one phase".into()));
        }
        for (i, p) in self.phases.iter().enumerate() {
            let what = if p.name.is_empty() {
                format!("phase {}", i + 1)
            } else {
                format!("phase {} ({})", i + 1, p.name)
            };
            if !(p.rate.is_finite() && p.rate >= 0.0) {
                return Err(Error::Invalid(format!(
                    "{what}: rate must be >= 0 requests/s"
                )));
            }
            if p.isl == 0 || p.osl == 0 {
                return Err(Error::Invalid(format!(
                    "{what}: isl and osl must be positive"
                )));
            }
            if !(p.duration_seconds.is_finite() && p.duration_seconds > 0.0) {
                return Err(Error::Invalid(format!(
                    "{what}: durationSeconds must be positive"
                )));
            }
        }
        Ok(())
    }

    pub fn duration_s(&self) -> f64 {
        self.phases.iter().map(|p| p.duration_seconds).sum()
    }

    /// Start time of each phase.
    pub fn starts(&self) -> Vec<f64> {
        let mut t = 0.0;
        self.phases
            .iter()
            .map(|p| {
                let s = t;
                t += p.duration_seconds;
                s
            })
            .collect()
    }

    /// Index of the phase running at `t` (the last one after the end).
    pub fn phase_at(&self, t: f64) -> usize {
        let mut end = 0.0;
        for (i, p) in self.phases.iter().enumerate() {
            end += p.duration_seconds;
            if t < end {
                return i;
            }
        }
        self.phases.len() - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_with_the_phase_named() {
        let t = Trace::from_yaml(
            "phases:\n  - {name: a, rate: 1.5, isl: 8192, osl: 1024, durationSeconds: 60}\n  - {rate: 2, isl: 100, osl: 10, durationSeconds: 30}\n",
        )
        .unwrap();
        assert_eq!(t.duration_s(), 90.0);
        assert_eq!(t.starts(), vec![0.0, 60.0]);
        assert_eq!(
            (t.phase_at(59.9), t.phase_at(60.0), t.phase_at(500.0)),
            (0, 1, 1)
        );
        let e = Trace::from_yaml(
            "phases:\n  - {name: b, rate: 1, isl: 0, osl: 1, durationSeconds: 1}\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("phase 1 (b)"), "{e}");
        assert!(Trace::from_yaml("phases: []").is_err());
        assert!(Trace::from_yaml("phases:\n  - {rate: 1, isl: 1, osl: 1, seconds: 1}\n").is_err());
    }
}
