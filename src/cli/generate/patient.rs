//! One patient's record: the Patient, conditions, allergies, and encounters with what happened
//! in them. Every draw comes from the run's one random sequence, in a fixed order.

use chrono::{DateTime, Duration, NaiveDate, TimeZone, Utc};
use serde_json::{Value, json};

use super::{Rng, World, Writers, cc, codes::*, instant, reference};

/// One patient and everything that happened to them. Returns the patient's id.
pub(super) fn patient_record(
    rng: &mut Rng,
    world: &World,
    out: &mut Writers,
) -> anyhow::Result<String> {
    let id = rng.uuid();
    let female = rng.chance(50);
    let end = Utc
        .with_ymd_and_hms(2025, 12, 31, 0, 0, 0)
        .single()
        .expect("valid date");
    let birth = NaiveDate::from_ymd_opt(
        i32::try_from(rng.range(1935, 2015)).expect("a year"),
        u32::try_from(rng.range(1, 12)).expect("a month"),
        u32::try_from(rng.range(1, 28)).expect("a day"),
    )
    .expect("valid date");
    let born = Utc.from_utc_datetime(&birth.and_hms_opt(8, 0, 0).expect("valid time"));
    let patient = patient(rng, world, &id, female, birth, end);
    out.write("Patient", &patient)?;
    let life = Life {
        subject: reference("Patient", &id),
        born,
        span_days: (end - born).num_days().max(30),
    };
    let conditions = conditions(rng, out, &life)?;
    allergies(rng, out, &life)?;
    for _ in 0..rng.range(25, 45) {
        encounter(rng, world, out, &life, &conditions)?;
    }
    Ok(id)
}

/// Who a patient's resources are about, and the span of days they happen in.
struct Life {
    subject: Value,
    born: DateTime<Utc>,
    span_days: i64,
}

fn patient(
    rng: &mut Rng,
    world: &World,
    id: &str,
    female: bool,
    birth: NaiveDate,
    end: DateTime<Utc>,
) -> Value {
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
    patient
}

/// The patient's conditions: their ids and which of `CONDITIONS` each is.
fn conditions(
    rng: &mut Rng,
    out: &mut Writers,
    life: &Life,
) -> anyhow::Result<Vec<(String, usize)>> {
    let (subject, born, span_days) = (&life.subject, life.born, life.span_days);
    let conditions: Vec<(String, usize)> = (0..rng.range(3, 12))
        .map(|_| (rng.uuid(), rng.index(CONDITIONS.len())))
        .collect();
    for (cid, which) in &conditions {
        let (code, display) = CONDITIONS[*which];
        let onset = born + Duration::days(rng.range(0, span_days));
        let active = rng.chance(40);
        let mut condition = json!({
            "resourceType": "Condition",
            "id": cid,
            "clinicalStatus": cc("http://terminology.hl7.org/CodeSystem/condition-clinical", if active { "active" } else { "resolved" }, if active { "Active" } else { "Resolved" }),
            "verificationStatus": cc("http://terminology.hl7.org/CodeSystem/condition-ver-status", "confirmed", "Confirmed"),
            "category": [cc("http://terminology.hl7.org/CodeSystem/condition-category", "encounter-diagnosis", "Encounter Diagnosis")],
            "code": cc(SNOMED, code, display),
            "subject": subject,
            "onsetDateTime": instant(onset),
            "recordedDate": instant(onset),
        });
        // A resolved condition ended, as real records say (R4's con-4 ties the two together).
        if !active {
            condition["abatementDateTime"] = json!(instant(onset + Duration::days(30)));
        }
        out.write("Condition", &condition)?;
    }

    Ok(conditions)
}

fn allergies(rng: &mut Rng, out: &mut Writers, life: &Life) -> anyhow::Result<()> {
    let (subject, born, span_days) = (&life.subject, life.born, life.span_days);
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

    Ok(())
}

/// What one encounter and its findings have in common.
struct Visit {
    subject: Value,
    encounter: Value,
    practitioner: String,
    start: DateTime<Utc>,
    stop: DateTime<Utc>,
}

impl Visit {
    /// Subject, encounter reference, practitioner id, start and end.
    fn parts(&self) -> (&Value, &Value, &str, DateTime<Utc>, DateTime<Utc>) {
        (
            &self.subject,
            &self.encounter,
            &self.practitioner,
            self.start,
            self.stop,
        )
    }
}

/// An encounter, its observations and report, and what it may have ordered.
fn encounter(
    rng: &mut Rng,
    world: &World,
    out: &mut Writers,
    life: &Life,
    conditions: &[(String, usize)],
) -> anyhow::Result<()> {
    let (subject, born, span_days) = (&life.subject, life.born, life.span_days);
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

    let visit = Visit {
        subject: subject.clone(),
        encounter: encounter_ref,
        practitioner: prac,
        start,
        stop,
    };
    observations(rng, out, &visit)?;
    orders(rng, out, &visit, conditions)
}

/// Eight observations; the laboratory ones reported in a DiagnosticReport.
fn observations(rng: &mut Rng, out: &mut Writers, visit: &Visit) -> anyhow::Result<()> {
    let (subject, encounter_ref, prac, start, stop) = visit.parts();
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
            "performer": [reference("Practitioner", prac)],
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
            "performer": [reference("Practitioner", prac)],
            "result": results,
        }))?;
    }
    Ok(())
}

/// A prescription, a procedure and an immunization, each by chance.
fn orders(
    rng: &mut Rng,
    out: &mut Writers,
    visit: &Visit,
    conditions: &[(String, usize)],
) -> anyhow::Result<()> {
    let (subject, encounter_ref, prac, start, stop) = visit.parts();
    if rng.chance(45) {
        let (code, display) = *rng.pick(MEDICATIONS);
        let (cid, which) = rng.pick(conditions).clone();
        out.write("MedicationRequest", &json!({
            "resourceType": "MedicationRequest",
            "id": rng.uuid(),
            "status": if rng.chance(30) { "active" } else { "completed" },
            "intent": "order",
            "medicationCodeableConcept": cc("http://www.nlm.nih.gov/research/umls/rxnorm", code, display),
            "subject": subject,
            "encounter": encounter_ref,
            "authoredOn": instant(start),
            "requester": reference("Practitioner", prac),
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
                "performer": [{"actor": reference("Practitioner", prac)}],
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
    Ok(())
}
