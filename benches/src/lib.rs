//! farpool bench
#![forbid(unsafe_code)]
