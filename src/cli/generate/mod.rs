//! `fhir-export generate`: a deterministic synthetic R4 population as ndjson, one file per type,
//! with real code systems (LOINC, SNOMED CT, RxNorm, CVX) and referential integrity.
//! Same `--patients` and `--seed` → byte-identical files.

mod codes;
mod patient;

use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufWriter, Write},
    path::{Path, PathBuf},
};

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use self::{codes::*, patient::patient_record};

#[derive(Debug, Clone, clap::Args)]
pub struct GenerateArgs {
    /// Number of patients (about 300–500 resources each).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub patients: u32,
    /// Seed of the pseudo-random generator.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Output directory (created if missing).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let counts = generate(&args)?;
    let total: u64 = counts.values().sum();
    for (t, n) in &counts {
        println!("{t:<20} {n:>10}");
    }
    println!("wrote {total} resources to {}", args.out.display());
    Ok(())
}

/// Writes the data set; returns the number of resources per type.
pub fn generate(args: &GenerateArgs) -> anyhow::Result<BTreeMap<&'static str, u64>> {
    std::fs::create_dir_all(&args.out).with_context(|| format!("{}", args.out.display()))?;
    let mut out = Writers::new(&args.out);
    let mut rng = Rng::new(args.seed);
    let organizations = (args.patients / 20).max(1);
    let practitioners = (args.patients / 10).max(2);
    let org_ids: Vec<String> = (0..organizations).map(|_| rng.uuid()).collect();
    let prac_ids: Vec<String> = (0..practitioners).map(|_| rng.uuid()).collect();
    for (i, id) in org_ids.iter().enumerate() {
        out.write("Organization", &organization(&mut rng, id, i))?;
    }
    for id in &prac_ids {
        out.write("Practitioner", &practitioner(&mut rng, id))?;
    }
    let mut patient_ids = Vec::with_capacity(args.patients as usize);
    for _ in 0..args.patients {
        let world = World {
            orgs: &org_ids,
            pracs: &prac_ids,
        };
        patient_ids.push(patient_record(&mut rng, &world, &mut out)?);
    }
    let group = json!({
        "resourceType": "Group",
        "id": rng.uuid(),
        "type": "person",
        "actual": true,
        "name": "All generated patients",
        "quantity": patient_ids.len(),
        "member": patient_ids.iter()
            .map(|id| json!({"entity": {"reference": format!("Patient/{id}")}}))
            .collect::<Vec<_>>(),
    });
    out.write("Group", &group)?;
    out.finish()
}

struct Writers {
    dir: PathBuf,
    files: BTreeMap<&'static str, (BufWriter<File>, u64)>,
}

impl Writers {
    fn new(dir: &Path) -> Writers {
        Writers {
            dir: dir.to_path_buf(),
            files: BTreeMap::new(),
        }
    }

    fn write(&mut self, resource_type: &'static str, resource: &Value) -> anyhow::Result<()> {
        if !self.files.contains_key(resource_type) {
            let path = self.dir.join(format!("{resource_type}.ndjson"));
            let file = File::create(&path).with_context(|| format!("{}", path.display()))?;
            self.files
                .insert(resource_type, (BufWriter::with_capacity(1 << 20, file), 0));
        }
        let (writer, count) = self.files.get_mut(resource_type).expect("inserted above");
        serde_json::to_writer(&mut *writer, resource)?;
        writer.write_all(b"\n")?;
        *count += 1;
        Ok(())
    }

    fn finish(self) -> anyhow::Result<BTreeMap<&'static str, u64>> {
        let mut counts = BTreeMap::new();
        for (t, (mut w, n)) in self.files {
            w.flush()?;
            counts.insert(t, n);
        }
        Ok(counts)
    }
}

/// SplitMix64: small, fast, and the same on every platform.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % ((hi - lo + 1) as u64)) as i64
    }

    fn float(&mut self, lo: f64, hi: f64) -> f64 {
        let unit = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        ((lo + unit * (hi - lo)) * 10.0).round() / 10.0
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.index(items.len())]
    }

    /// An index below `len`.
    fn index(&mut self, len: usize) -> usize {
        let len = u64::try_from(len).expect("a length fits 64 bits");
        usize::try_from(self.next() % len).expect("below a length")
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn uuid(&mut self) -> String {
        let (a, b) = (self.next(), self.next());
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            0x8000 | (b >> 48) & 0x3fff,
            b & 0xffff_ffff_ffff
        )
    }
}

struct World<'a> {
    orgs: &'a [String],
    pracs: &'a [String],
}

fn cc(system: &str, code: &str, display: &str) -> Value {
    json!({"coding": [{"system": system, "code": code, "display": display}], "text": display})
}

fn reference(resource_type: &str, id: &str) -> Value {
    json!({"reference": format!("{resource_type}/{id}")})
}

fn instant(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S+00:00").to_string()
}

fn organization(rng: &mut Rng, id: &str, i: usize) -> Value {
    let (city, state, zip) = *rng.pick(CITIES);
    json!({
        "resourceType": "Organization",
        "id": id,
        "identifier": [{"system": "https://example.org/fhir/sid/npi", "value": format!("{:010}", 1_000_000_000 + i)}],
        "active": true,
        "type": [cc("http://terminology.hl7.org/CodeSystem/organization-type", "prov", "Healthcare Provider")],
        "name": format!("{city} Community Health Center {}", i + 1),
        "telecom": [{"system": "phone", "value": format!("617-555-{:04}", rng.range(0, 9999))}],
        "address": [{"line": [format!("{} Main Street", rng.range(1, 999))], "city": city, "state": state, "postalCode": zip, "country": "US"}],
    })
}

fn practitioner(rng: &mut Rng, id: &str) -> Value {
    let female = rng.chance(50);
    let given = if female {
        rng.pick(GIVEN_F)
    } else {
        rng.pick(GIVEN_M)
    };
    json!({
        "resourceType": "Practitioner",
        "id": id,
        "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": format!("{}", rng.range(1_000_000_000, 1_999_999_999))}],
        "active": true,
        "name": [{"family": rng.pick(FAMILY), "given": [given], "prefix": ["Dr."]}],
        "gender": if female { "female" } else { "male" },
    })
}

#[cfg(test)]
mod tests;
