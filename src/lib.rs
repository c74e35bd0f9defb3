//! fhir-export: a FHIR R4 server whose purpose is fast, exact bulk `$export`.
//! See README.md for the module map.

pub mod auth;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod containers;
pub mod db;
pub mod deid;
pub mod export;
pub mod fhir;
pub mod http;
pub mod liveness;
pub mod metrics;
pub mod server;
pub mod storage;
pub mod store;
pub mod telemetry;
pub mod worker;

pub use server::Server;
