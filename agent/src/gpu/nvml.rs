//! GPU discovery through NVML (the `nvml` cargo feature).
//!
//! Owns the translation from NVML's view of the node to [`Gpu`] records and
//! from NVML errors to the agent's [`Error`]. nvml-wrapper loads
//! `libnvidia-ml.so.1` at run time, so this module builds anywhere; only
//! [`NvmlGpus::discover`] needs a GPU node. Invariants: indices are NVML's
//! device indices `0..count`, contiguous even when a GPU has fallen off the
//! bus (it is reported `Unhealthy`, not left out), and product names use
//! GFD's spelling ([`gfd_product`]).
//!
//! Health at discovery comes from one cheap query, whether retired pages are
//! pending (an ECC error that needs a GPU reset). Watching NVML XID events
//! for health changes after discovery would feed [`crate::node::Node::set_gpu_health`],
//! like the fault-injection hook does; it is not part of this module.

use nvml_wrapper::Nvml;
use nvml_wrapper::error::NvmlError;
use proto::types::{Gpu, GpuHealth};

use super::{GpuSource, gfd_product};
use crate::{Error, Result};

const MIB: u64 = 1024 * 1024;
const FELL_OFF_THE_BUS: &str = "NVML: GPU has fallen off the bus";

/// GPUs discovered through NVML. Initialises NVML on each [`discover`]
/// (once, at startup) and shuts it down again afterwards.
///
/// [`discover`]: GpuSource::discover
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NvmlGpus;

impl GpuSource for NvmlGpus {
    fn discover(&self) -> Result<Vec<Gpu>> {
        discover_with(Nvml::init())
    }
}

/// Discovery from an NVML initialisation result; split out so that tests can
/// feed an initialisation that fails deterministically.
fn discover_with(init: std::result::Result<Nvml, NvmlError>) -> Result<Vec<Gpu>> {
    let nvml = init.map_err(|e| nvml_error("initialising NVML", &e))?;
    let count = nvml
        .device_count()
        .map_err(|e| nvml_error("counting GPUs", &e))?;
    let gpus = (0..count)
        .map(|index| match describe(&nvml, index) {
            Ok(gpu) => Ok(gpu),
            Err(NvmlError::GpuLost) => Ok(lost(index)),
            Err(e) => Err(nvml_error(&format!("reading GPU {index}"), &e)),
        })
        .collect::<Result<Vec<_>>>()?;
    tracing::info!(count, "discovered GPUs through NVML");
    Ok(gpus)
}

/// One GPU as NVML describes it.
fn describe(nvml: &Nvml, index: u32) -> std::result::Result<Gpu, NvmlError> {
    let device = nvml.device_by_index(index)?;
    let (health, reason) = retirement_health(device.are_pages_pending_retired());
    Ok(Gpu {
        index,
        uuid: device.uuid()?,
        product: gfd_product(&device.name()?),
        memory_mib: device.memory_info()?.total / MIB,
        health,
        reason,
    })
}

/// A GPU that fell off the bus: kept at its index so that the indices stay
/// those of `CUDA_VISIBLE_DEVICES`, and never placed on.
fn lost(index: u32) -> Gpu {
    Gpu {
        index,
        uuid: String::new(),
        product: String::new(),
        memory_mib: 0,
        health: GpuHealth::Unhealthy,
        reason: FELL_OFF_THE_BUS.into(),
    }
}

/// Health from NVML's "retired pages pending" query. Pending pages mean an
/// ECC error that only a GPU reset finishes handling, so no new work should
/// land there: `Degraded`. GPUs that do not support the query are `Healthy`;
/// one that cannot be read is `Unknown`, which is not usable either.
fn retirement_health(pending: std::result::Result<bool, NvmlError>) -> (GpuHealth, String) {
    match pending {
        Ok(false) | Err(NvmlError::NotSupported) => (GpuHealth::Healthy, String::new()),
        Ok(true) => (
            GpuHealth::Degraded,
            "NVML: retired pages pending; reset the GPU".into(),
        ),
        Err(NvmlError::GpuLost) => (GpuHealth::Unhealthy, FELL_OFF_THE_BUS.into()),
        Err(e) => (
            GpuHealth::Unknown,
            format!("NVML: retired-page status unreadable: {e}"),
        ),
    }
}

/// The agent error for an NVML failure while `doing` something, saying what
/// to do about it where the cause is the node rather than one GPU.
fn nvml_error(doing: &str, err: &NvmlError) -> Error {
    let message = match err {
        NvmlError::LibloadingError(_) | NvmlError::FailedToLoadSymbol(_) => format!(
            "NVML not available: libnvidia-ml.so.1 could not be loaded ({err}); \
             run on a GPU node or use --gpu-source sim"
        ),
        NvmlError::DriverNotLoaded => "NVML not available: the NVIDIA driver is not loaded; \
             run on a GPU node or use --gpu-source sim"
            .to_owned(),
        NvmlError::NoPermission => {
            "NVML: no permission to talk to the NVIDIA driver; check the device nodes \
             (/dev/nvidia*) the agent can open"
                .to_owned()
        }
        _ => format!("NVML: {doing} failed: {err}"),
    };
    Error::Config(message)
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::*;

    fn config_message(err: Error) -> String {
        match err {
            Error::Config(message) => message,
            other => panic!("expected a configuration error, got {other:?}"),
        }
    }

    #[test]
    fn a_missing_library_is_a_clear_error() {
        let init = Nvml::builder()
            .lib_path(OsStr::new("/nonexistent/libnvidia-ml.so.1"))
            .init();
        let message = config_message(discover_with(init).unwrap_err());
        assert!(message.starts_with("NVML not available"), "{message}");
        assert!(message.contains("--gpu-source sim"), "{message}");
    }

    /// The real source on a machine without libnvidia-ml: the same clear
    /// error. Skipped where the library loads (a GPU node), since discovery
    /// there is the GPU's business, not this test's.
    #[test]
    fn discovery_without_the_library_is_a_clear_error() {
        if !matches!(Nvml::init(), Err(NvmlError::LibloadingError(_))) {
            eprintln!("libnvidia-ml.so.1 loads here; skipping");
            return;
        }
        let message = config_message(NvmlGpus.discover().unwrap_err());
        assert!(message.starts_with("NVML not available"), "{message}");
    }

    #[test]
    fn driver_errors_say_what_to_do() {
        let message = config_message(nvml_error("initialising NVML", &NvmlError::DriverNotLoaded));
        assert!(message.contains("driver is not loaded"), "{message}");
        assert!(message.contains("--gpu-source sim"), "{message}");
        let message = config_message(nvml_error("reading GPU 3", &NvmlError::Unknown));
        assert!(
            message.starts_with("NVML: reading GPU 3 failed"),
            "{message}"
        );
    }

    #[test]
    fn pending_retired_pages_degrade_the_gpu() {
        assert_eq!(
            retirement_health(Ok(false)),
            (GpuHealth::Healthy, String::new())
        );
        assert_eq!(
            retirement_health(Err(NvmlError::NotSupported)).0,
            GpuHealth::Healthy
        );
        assert_eq!(retirement_health(Ok(true)).0, GpuHealth::Degraded);
        assert_eq!(
            retirement_health(Err(NvmlError::GpuLost)).0,
            GpuHealth::Unhealthy
        );
        let (health, reason) = retirement_health(Err(NvmlError::Unknown));
        assert_eq!(health, GpuHealth::Unknown);
        assert!(!reason.is_empty());
    }

    #[test]
    fn a_lost_gpu_keeps_its_index_and_is_unusable() {
        let gpu = lost(5);
        assert_eq!(gpu.index, 5);
        assert!(!gpu.health.is_usable());
        assert!(!gpu.reason.is_empty());
    }
}
