//! ferry (architecture map to be written)
pub mod config;
pub mod protocol;
