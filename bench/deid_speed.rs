//! De-identification alone, without the database or the storage: applies a configuration to
//! ndjson files (plain or gzipped) and reports resources per second on one core.
//!
//!   cargo run --release --example deid_speed -- CONFIG FILE.ndjson[.gz]...

use std::{io::Read, time::Instant};

use fhir_export::deid::{Deidentifier, Scope};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let config = std::fs::read_to_string(args.next().expect("a configuration file"))?;
    let engine = Deidentifier::new(&config, b"bench seed")?;
    let scope = Scope {
        file: "bench.ndjson",
        folder: "bench",
    };
    for path in args {
        let mut text = String::new();
        let file = std::fs::File::open(&path)?;
        if path.ends_with(".gz") {
            flate2::read::GzDecoder::new(file).read_to_string(&mut text)?;
        } else {
            std::io::BufReader::new(file).read_to_string(&mut text)?;
        }
        let (mut lines, mut bytes_in, mut bytes_out) = (0u64, 0usize, 0usize);
        let started = Instant::now();
        for line in text.lines() {
            let out = engine.apply(line, &scope)?;
            lines += 1;
            bytes_in += line.len();
            bytes_out += out.len();
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "{path}: {lines} resources in {secs:.2} s: {:.0} resources/s, {:.1} MB/s in, {bytes_out} bytes out",
            lines as f64 / secs,
            bytes_in as f64 / secs / 1e6
        );
    }
    Ok(())
}
