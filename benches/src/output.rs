//! Writing result files.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

/// Create the parent directory of `path` if it has one.
pub fn create_parent(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(())
}

/// Write `value` as pretty JSON to `path`.
pub fn write_json(value: &impl Serialize, path: &Path) -> Result<()> {
    create_parent(path)?;
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}
