//! Without the `rdma` feature: the same entry points, each failing with `Unsupported`
//! ("no RDMA device: ..."), so transport negotiation can move on.

use std::sync::Arc;

use farpool_core::{Error, Result};

use crate::error::no_device;
use crate::info::{DeviceInfo, DeviceSelector};

fn not_built() -> Error {
    no_device("farpool-rdma was built without the `rdma` feature")
}

/// List RDMA devices: always `Unsupported` in this build.
pub fn discover() -> Result<Vec<DeviceInfo>> {
    Err(not_built())
}

/// An opened RDMA device; cannot exist in a build without the `rdma` feature.
#[derive(Debug)]
pub struct Context {
    _never: std::convert::Infallible,
}

impl Context {
    /// Always `Unsupported` in this build.
    pub fn open(_sel: &DeviceSelector) -> Result<Arc<Context>> {
        Err(not_built())
    }
}
