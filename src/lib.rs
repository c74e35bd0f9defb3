//! fhir-export: a FHIR R4 server whose purpose is fast, exact bulk `$export`.
//! See README.md for the module map.

// House rules, enforced by `cargo clippy -- -D warnings` (`clippy.toml`: 80 lines at most).
#![warn(clippy::too_many_lines, clippy::cast_possible_truncation)]

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

#[cfg(test)]
mod house_rules {
    /// Hand-written source files stay under 600 lines (the generated tables are data).
    #[test]
    fn no_hand_written_file_is_over_600_lines() {
        fn walk(dir: &std::path::Path, long: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, long);
                    continue;
                }
                let generated = ["r4.rs", "r4_types.rs"]
                    .iter()
                    .any(|name| path.ends_with(format!("fhir/{name}")));
                let lines = std::fs::read_to_string(&path).unwrap().lines().count();
                if !generated && lines > 600 {
                    long.push(format!("{} ({lines} lines)", path.display()));
                }
            }
        }
        let mut long = Vec::new();
        walk(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut long,
        );
        assert!(long.is_empty(), "{long:?}");
    }
}
