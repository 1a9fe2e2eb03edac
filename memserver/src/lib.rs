//! farpool memory server
#![forbid(unsafe_code)]
