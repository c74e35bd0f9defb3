//! `fhir-export generate`: a deterministic synthetic R4 population as ndjson, one file per type,
//! with real code systems (LOINC, SNOMED CT, RxNorm, CVX) and referential integrity.
//! Same `--patients` and `--seed` → byte-identical files.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufWriter, Write},
    path::{Path, PathBuf},
};

use anyhow::Context;
use chrono::{DateTime, Duration, NaiveDate, TimeZone, Utc};
use serde_json::{Value, json};

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
        &items[(self.next() % items.len() as u64) as usize]
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

const GIVEN_F: &[&str] = &[
    "Maria", "Emma", "Olivia", "Sofia", "Amara", "Hannah", "Mei", "Leila",
];
const GIVEN_M: &[&str] = &[
    "James", "Noah", "Liam", "Mateo", "Kenji", "Omar", "Lukas", "Ethan",
];
const FAMILY: &[&str] = &[
    "Smith",
    "Garcia",
    "Nguyen",
    "Müller",
    "Okafor",
    "Kowalski",
    "Haddad",
    "Tanaka",
    "Silva",
    "Johansson",
    "Rossi",
    "Dubois",
];
const CITIES: &[(&str, &str, &str)] = &[
    ("Boston", "MA", "02118"),
    ("Springfield", "MA", "01103"),
    ("Worcester", "MA", "01608"),
    ("Cambridge", "MA", "02139"),
    ("Lowell", "MA", "01852"),
];
/// (LOINC, display, unit, low, high)
const VITALS: &[(&str, &str, &str, f64, f64)] = &[
    ("8867-4", "Heart rate", "/min", 55.0, 110.0),
    ("9279-1", "Respiratory rate", "/min", 12.0, 22.0),
    ("8310-5", "Body temperature", "Cel", 36.1, 38.4),
    ("29463-7", "Body weight", "kg", 45.0, 120.0),
    ("8302-2", "Body height", "cm", 150.0, 195.0),
    (
        "39156-5",
        "Body mass index (BMI) [Ratio]",
        "kg/m2",
        18.0,
        38.0,
    ),
    (
        "2339-0",
        "Glucose [Mass/volume] in Blood",
        "mg/dL",
        70.0,
        180.0,
    ),
    (
        "2093-3",
        "Cholesterol [Mass/volume] in Serum or Plasma",
        "mg/dL",
        140.0,
        260.0,
    ),
    (
        "4548-4",
        "Hemoglobin A1c/Hemoglobin.total in Blood",
        "%",
        4.5,
        9.5,
    ),
];
/// (SNOMED CT, display)
const CONDITIONS: &[(&str, &str)] = &[
    ("44054006", "Diabetes mellitus type 2"),
    ("38341003", "Hypertensive disorder"),
    ("195662009", "Acute viral pharyngitis"),
    ("10509002", "Acute bronchitis"),
    ("55822004", "Hyperlipidemia"),
    ("40055000", "Chronic sinusitis"),
    ("195967001", "Asthma"),
    ("271737000", "Anemia"),
    ("35489007", "Depressive disorder"),
    ("239873007", "Osteoarthritis of knee"),
];
/// (RxNorm, display)
const MEDICATIONS: &[(&str, &str)] = &[
    (
        "860975",
        "24 HR Metformin hydrochloride 500 MG Extended Release Oral Tablet",
    ),
    ("314076", "lisinopril 10 MG Oral Tablet"),
    ("197361", "amlodipine 5 MG Oral Tablet"),
    ("259255", "atorvastatin 80 MG Oral Tablet"),
    ("308136", "amoxicillin 500 MG Oral Capsule"),
    ("313782", "Acetaminophen 325 MG Oral Tablet"),
    (
        "895994",
        "120 ACTUAT Fluticasone propionate 0.044 MG/ACTUAT Metered Dose Inhaler",
    ),
    ("310965", "Ibuprofen 200 MG Oral Tablet"),
];
/// (SNOMED CT, display)
const PROCEDURES: &[(&str, &str)] = &[
    ("430193006", "Medication Reconciliation (procedure)"),
    ("117015009", "Throat culture (procedure)"),
    ("73761001", "Colonoscopy"),
    ("71651007", "Mammography (procedure)"),
    ("36969009", "Placement of stent in coronary artery"),
    ("76601001", "Intramuscular injection"),
];
/// (CVX, display)
const VACCINES: &[(&str, &str)] = &[
    ("140", "Influenza, seasonal, injectable, preservative free"),
    ("113", "Td (adult) preservative free"),
    ("133", "Pneumococcal conjugate PCV 13"),
    (
        "208",
        "SARS-COV-2 (COVID-19) vaccine, mRNA, spike protein, LNP, preservative free",
    ),
    ("43", "Hep B, adult"),
];
/// (SNOMED CT, display)
const ALLERGIES: &[(&str, &str)] = &[
    ("91936005", "Allergy to penicillin"),
    ("300913006", "Shellfish allergy"),
    ("232347008", "Dander (animal) allergy"),
    ("419474003", "Allergy to mould"),
];
/// (class code, SNOMED type code, display)
const ENCOUNTER_TYPES: &[(&str, &str, &str)] = &[
    ("AMB", "185349003", "Encounter for check up (procedure)"),
    ("AMB", "185345009", "Encounter for symptom"),
    ("AMB", "410620009", "Well child visit (procedure)"),
    ("EMER", "50849002", "Emergency room admission (procedure)"),
    ("IMP", "32485007", "Hospital admission (procedure)"),
];

fn cc(system: &str, code: &str, display: &str) -> Value {
    json!({"coding": [{"system": system, "code": code, "display": display}], "text": display})
}

fn reference(resource_type: &str, id: &str) -> Value {
    json!({"reference": format!("{resource_type}/{id}")})
}

fn instant(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S+00:00").to_string()
}

const SNOMED: &str = "http://snomed.info/sct";
const LOINC: &str = "http://loinc.org";

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

/// One patient and everything that happened to them. Returns the patient's id.
fn patient_record(rng: &mut Rng, world: &World, out: &mut Writers) -> anyhow::Result<String> {
    let id = rng.uuid();
    let female = rng.chance(50);
    let end = Utc
        .with_ymd_and_hms(2025, 12, 31, 0, 0, 0)
        .single()
        .expect("valid date");
    let birth = NaiveDate::from_ymd_opt(
        rng.range(1935, 2015) as i32,
        rng.range(1, 12) as u32,
        rng.range(1, 28) as u32,
    )
    .expect("valid date");
    let born = Utc.from_utc_datetime(&birth.and_hms_opt(8, 0, 0).expect("valid time"));
    let (city, state, zip) = *rng.pick(CITIES);
    let given = if female {
        rng.pick(GIVEN_F)
    } else {
        rng.pick(GIVEN_M)
    };
    let family = rng.pick(FAMILY);
    let mut patient = json!({
        "resourceType": "Patient",
        "id": id,
        "identifier": [
            {"type": cc("http://terminology.hl7.org/CodeSystem/v2-0203", "MR", "Medical Record Number"),
             "system": "https://example.org/fhir/sid/mrn", "value": format!("MRN{}", rng.range(100_000, 999_999))},
            {"type": cc("http://terminology.hl7.org/CodeSystem/v2-0203", "SS", "Social Security Number"),
             "system": "http://hl7.org/fhir/sid/us-ssn", "value": format!("999-{:02}-{:04}", rng.range(10, 99), rng.range(0, 9999))}
        ],
        "name": [{"use": "official", "family": family, "given": [given]}],
        "telecom": [{"system": "phone", "value": format!("555-{:03}-{:04}", rng.range(100, 999), rng.range(0, 9999)), "use": "home"}],
        "gender": if female { "female" } else { "male" },
        "birthDate": birth.to_string(),
        "address": [{"line": [format!("{} Elm Street", rng.range(1, 999))], "city": city, "state": state, "postalCode": zip, "country": "US"}],
        "maritalStatus": cc("http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", "M", "Married"),
        "communication": [{"language": cc("urn:ietf:bcp:47", "en-US", "English (United States)")}],
        "generalPractitioner": [reference("Practitioner", rng.pick(world.pracs).as_str())],
        "managingOrganization": reference("Organization", rng.pick(world.orgs).as_str()),
    });
    if rng.chance(3) {
        patient["deceasedDateTime"] = json!(instant(end - Duration::days(rng.range(1, 900))));
    }
    out.write("Patient", &patient)?;
    let subject = reference("Patient", &id);
    let span_days = (end - born).num_days().max(30);

    let conditions: Vec<(String, usize)> = (0..rng.range(3, 12))
        .map(|_| (rng.uuid(), (rng.next() % CONDITIONS.len() as u64) as usize))
        .collect();
    for (cid, which) in &conditions {
        let (code, display) = CONDITIONS[*which];
        let onset = born + Duration::days(rng.range(0, span_days));
        let active = rng.chance(40);
        out.write("Condition", &json!({
            "resourceType": "Condition",
            "id": cid,
            "clinicalStatus": cc("http://terminology.hl7.org/CodeSystem/condition-clinical", if active { "active" } else { "resolved" }, if active { "Active" } else { "Resolved" }),
            "verificationStatus": cc("http://terminology.hl7.org/CodeSystem/condition-ver-status", "confirmed", "Confirmed"),
            "category": [cc("http://terminology.hl7.org/CodeSystem/condition-category", "encounter-diagnosis", "Encounter Diagnosis")],
            "code": cc(SNOMED, code, display),
            "subject": subject,
            "onsetDateTime": instant(onset),
            "recordedDate": instant(onset),
        }))?;
    }

    for _ in 0..rng.range(0, 3) {
        let (code, display) = *rng.pick(ALLERGIES);
        out.write("AllergyIntolerance", &json!({
            "resourceType": "AllergyIntolerance",
            "id": rng.uuid(),
            "clinicalStatus": cc("http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "active", "Active"),
            "verificationStatus": cc("http://terminology.hl7.org/CodeSystem/allergyintolerance-verification", "confirmed", "Confirmed"),
            "type": "allergy",
            "category": ["environment"],
            "criticality": if rng.chance(20) { "high" } else { "low" },
            "code": cc(SNOMED, code, display),
            "patient": subject,
            "recordedDate": instant(born + Duration::days(rng.range(0, span_days))),
        }))?;
    }

    for _ in 0..rng.range(25, 45) {
        let eid = rng.uuid();
        let (class, type_code, type_display) = *rng.pick(ENCOUNTER_TYPES);
        let start =
            born + Duration::days(rng.range(0, span_days)) + Duration::minutes(rng.range(0, 600));
        let stop = start + Duration::minutes(rng.range(15, 240));
        let prac = rng.pick(world.pracs).clone();
        let encounter_ref = reference("Encounter", &eid);
        out.write("Encounter", &json!({
            "resourceType": "Encounter",
            "id": eid,
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": class},
            "type": [cc(SNOMED, type_code, type_display)],
            "subject": subject,
            "participant": [{"type": [cc("http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "PPRF", "primary performer")], "individual": reference("Practitioner", &prac)}],
            "period": {"start": instant(start), "end": instant(stop)},
            "reasonCode": [cc(SNOMED, type_code, type_display)],
            "serviceProvider": reference("Organization", rng.pick(world.orgs).as_str()),
        }))?;

        let mut results = Vec::new();
        for _ in 0..8 {
            let (code, display, unit, lo, hi) = *rng.pick(VITALS);
            let oid = rng.uuid();
            let category = if code.starts_with('2') || code == "4548-4" {
                "laboratory"
            } else {
                "vital-signs"
            };
            out.write("Observation", &json!({
                "resourceType": "Observation",
                "id": oid,
                "status": "final",
                "category": [cc("http://terminology.hl7.org/CodeSystem/observation-category", category, category)],
                "code": cc(LOINC, code, display),
                "subject": subject,
                "encounter": encounter_ref,
                "effectiveDateTime": instant(start),
                "issued": instant(stop),
                "performer": [reference("Practitioner", &prac)],
                "valueQuantity": {"value": rng.float(lo, hi), "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
            }))?;
            if category == "laboratory" {
                results.push(reference("Observation", &oid));
            }
        }
        if !results.is_empty() {
            out.write("DiagnosticReport", &json!({
                "resourceType": "DiagnosticReport",
                "id": rng.uuid(),
                "status": "final",
                "category": [cc("http://terminology.hl7.org/CodeSystem/v2-0074", "LAB", "Laboratory")],
                "code": cc(LOINC, "51990-0", "Basic metabolic panel - Blood"),
                "subject": subject,
                "encounter": encounter_ref,
                "effectiveDateTime": instant(start),
                "issued": instant(stop),
                "performer": [reference("Practitioner", &prac)],
                "result": results,
            }))?;
        }
        if rng.chance(45) {
            let (code, display) = *rng.pick(MEDICATIONS);
            let (cid, which) = rng.pick(&conditions).clone();
            out.write("MedicationRequest", &json!({
                "resourceType": "MedicationRequest",
                "id": rng.uuid(),
                "status": if rng.chance(30) { "active" } else { "completed" },
                "intent": "order",
                "medicationCodeableConcept": cc("http://www.nlm.nih.gov/research/umls/rxnorm", code, display),
                "subject": subject,
                "encounter": encounter_ref,
                "authoredOn": instant(start),
                "requester": reference("Practitioner", &prac),
                "reasonReference": [{"reference": format!("Condition/{cid}"), "display": CONDITIONS[which].1}],
                "dosageInstruction": [{"sequence": 1, "timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}}, "asNeededBoolean": false}],
            }))?;
        }
        if rng.chance(35) {
            let (code, display) = *rng.pick(PROCEDURES);
            out.write(
                "Procedure",
                &json!({
                    "resourceType": "Procedure",
                    "id": rng.uuid(),
                    "status": "completed",
                    "code": cc(SNOMED, code, display),
                    "subject": subject,
                    "encounter": encounter_ref,
                    "performedPeriod": {"start": instant(start), "end": instant(stop)},
                    "performer": [{"actor": reference("Practitioner", &prac)}],
                }),
            )?;
        }
        if rng.chance(30) {
            let (code, display) = *rng.pick(VACCINES);
            out.write(
                "Immunization",
                &json!({
                    "resourceType": "Immunization",
                    "id": rng.uuid(),
                    "status": "completed",
                    "vaccineCode": cc("http://hl7.org/fhir/sid/cvx", code, display),
                    "patient": subject,
                    "encounter": encounter_ref,
                    "occurrenceDateTime": instant(start),
                    "primarySource": true,
                }),
            )?;
        }
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_look_like_v4() {
        let mut rng = Rng::new(7);
        let u = rng.uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!(uuid::Uuid::parse_str(&u).is_ok());
    }
}
