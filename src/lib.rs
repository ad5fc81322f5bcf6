//! ferry (architecture map to be written)
pub mod cloud;
pub mod config;
pub mod protocol;
