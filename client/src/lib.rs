//! farpool client
#![forbid(unsafe_code)]
