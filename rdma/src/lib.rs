//! placeholder, filled by a later change
#![forbid(unsafe_code)]
