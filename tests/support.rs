//! Test helpers shared by every integration test module.

// Each test module uses a different subset of the helpers.
#![allow(dead_code)]

pub mod admin;
pub mod authz;
pub mod browser;
pub mod ca;
pub mod cli;
pub mod client;
pub mod fixture;
pub mod grants;
pub mod h2_frames;
pub mod kill;
pub mod pg;
pub mod prom;
pub mod proxy;
pub mod relay;
pub mod replicas;
pub mod rlimit;
pub mod serve;
pub mod token;
pub mod upstream;
pub mod wait;
pub mod websocket;
