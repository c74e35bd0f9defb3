//! Black-box tests of the server over HTTP against real Postgres and Azurite, in one binary
//! (each test still runs in a process of its own under cargo-nextest). `common` is the harness.

mod common;

mod admin;
mod auth;
mod azure;
mod bulk_load;
mod bundle;
mod chaos;
mod cloud;
mod deid;
mod export;
mod faults;
mod fetch;
mod fuzz;
mod hostile;
mod lifecycle;
mod load;
mod logs;
mod metrics;
mod organized;
mod pages;
mod queue;
mod recovery;
mod rest;
mod standby;
mod stu3;
mod type_filter;
mod writers;
