use super::*;
use serde_json::json;

#[test]
fn token_forms() {
    let cc =
        json!({"coding": [{"system": "http://loinc.org", "code": "8867-4"}], "text": "Heart rate"});
    let t = |v: &str| Token::parse(v).unwrap();
    assert!(t("http://loinc.org|8867-4").matches(&cc));
    assert!(t("8867-4").matches(&cc));
    assert!(t("http://loinc.org|").matches(&cc));
    assert!(!t("|8867-4").matches(&cc));
    assert!(!t("http://snomed.info/sct|8867-4").matches(&cc));
    assert!(!t("8867").matches(&cc));
    assert!(t("|x").matches(&json!({"code": "x"})));
    let identifier = json!({"system": "urn:mrn", "value": "123"});
    assert!(t("urn:mrn|123").matches(&identifier));
    assert!(!t("urn:other|123").matches(&identifier));
    assert!(t("final").matches(&json!("final")));
    assert!(!t("http://x|final").matches(&json!("final")));
    assert!(t("true").matches(&json!(true)));
    assert!(!t("true").matches(&json!(false)));
    let phone = json!({"system": "email", "value": "a@b.c", "use": "work"});
    assert!(t("a@b.c").matches(&phone));
    assert!(Token::parse("|").is_err());
}

#[test]
fn strings_fold_case_and_accents() {
    let name = json!({"family": "Müller", "given": ["Élodie", "Anne"], "use": "official"});
    let starts = |v: &str| string_matches(StringMatch::StartsWith, &fold(v), &name);
    assert!(starts("mul"));
    assert!(starts("ELO"));
    assert!(starts("anne"));
    assert!(!starts("ller"));
    assert!(!starts("official"));
    assert!(string_matches(StringMatch::Contains, &fold("LLE"), &name));
    assert!(string_matches(StringMatch::Exact, "Müller", &name));
    assert!(!string_matches(StringMatch::Exact, "muller", &name));
}

#[test]
fn reference_forms() {
    let base = "http://fhir.example/r4";
    let r = json!({"reference": "Patient/123"});
    let p = |v: &str, m: Option<&str>| ReferenceValue::parse(v, base, m).unwrap();
    assert!(p("Patient/123", None).matches(&r, base));
    assert!(p("123", None).matches(&r, base));
    assert!(p("123", Some("Patient")).matches(&r, base));
    assert!(!p("123", Some("Group")).matches(&r, base));
    assert!(p("http://fhir.example/r4/Patient/123", None).matches(&r, base));
    assert!(!p("http://other/Patient/123", None).matches(&r, base));
    let abs = json!({"reference": "http://other/Patient/123"});
    assert!(p("http://other/Patient/123", None).matches(&abs, base));
    assert!(!p("Patient/123", None).matches(&abs, base));
    let ours = json!({"reference": "http://fhir.example/r4/Patient/123/_history/2"});
    assert!(p("Patient/123", None).matches(&ours, base));
    assert!(ReferenceValue::parse("Nope/1", base, None).is_err());
    assert!(ReferenceValue::parse("Patient/", base, None).is_err());
    assert!(ReferenceValue::parse("Group/1", base, Some("Patient")).is_err());
}

#[test]
fn date_precision_and_prefixes() {
    let d = |v: &str| DateValue::parse(v, Utc::now()).unwrap();
    let day = json!("2020-03-04");
    let instant = json!("2020-03-04T10:00:00Z");
    assert!(d("2020").matches(&day));
    assert!(d("2020-03").matches(&instant));
    assert!(d("2020-03-04").matches(&instant));
    assert!(!d("2020-03-04T10:00:00Z").matches(&day)); // the day is wider than the second
    assert!(d("2020-03-04T10:00").matches(&instant));
    assert!(d("2020-03-04T12:00:00+02:00").matches(&instant));
    assert!(d("ne2020-03-05").matches(&day));
    assert!(!d("ne2020-03").matches(&day));
    assert!(d("gt2020-03-03").matches(&day));
    assert!(!d("gt2020-03-04").matches(&day));
    assert!(d("ge2020-03-04").matches(&day));
    assert!(d("lt2020-03-05").matches(&day));
    assert!(!d("lt2020-03-04").matches(&day));
    assert!(d("le2020-03-04").matches(&day));
    assert!(d("sa2020-03-03").matches(&day));
    assert!(!d("sa2020-03-04").matches(&day));
    assert!(d("eb2020-03-05").matches(&day));
    assert!(!d("eb2020-03-04").matches(&day));
    // Ten years ago give or take a year: ±10 % of the distance from now.
    let decade_ago = (Utc::now() - TimeDelta::days(3650))
        .format("%Y-%m-%d")
        .to_string();
    let close = (Utc::now() - TimeDelta::days(3650 + 200))
        .format("%Y-%m-%d")
        .to_string();
    let far = (Utc::now() - TimeDelta::days(3650 + 500))
        .format("%Y-%m-%d")
        .to_string();
    let ap = DateValue::parse(&format!("ap{decade_ago}"), Utc::now()).unwrap();
    assert!(ap.matches(&json!(close)));
    assert!(!ap.matches(&json!(far)));
    assert!(DateValue::parse("2020-13", Utc::now()).is_err());
    assert!(DateValue::parse("soon", Utc::now()).is_err());
}

#[test]
fn odd_text_is_no_date_and_no_panic() {
    for text in [
        "2020-01-01é",
        "2020-01-01T1é:00",
        "é",
        "2é20",
        "2020-0é",
        "2020-01-01T10:00:00.5é",
        "",
        "T",
        "2020-01-01T",
    ] {
        assert!(DateValue::parse(text, Utc::now()).is_err(), "{text}");
        assert!(
            !DateValue::parse("2020", Utc::now())
                .unwrap()
                .matches(&json!(text)),
            "{text}"
        );
        assert!(super::super::instant::range(text).is_none(), "{text}");
    }
}

#[test]
fn periods_overlap_by_prefix() {
    let d = |v: &str| DateValue::parse(v, Utc::now()).unwrap();
    let period = json!({"start": "2020-01-10", "end": "2020-01-20"});
    assert!(d("2020-01").matches(&period));
    assert!(!d("2020-01-15").matches(&period)); // eq needs the period inside the value
    assert!(d("gt2020-01-15").matches(&period));
    assert!(d("lt2020-01-15").matches(&period));
    assert!(!d("sa2020-01-15").matches(&period));
    assert!(d("sa2020-01-09").matches(&period));
    assert!(d("eb2020-01-21").matches(&period));
    let open = json!({"start": "2020-01-10"});
    assert!(d("gt2030").matches(&open));
    assert!(!d("eb2030").matches(&open));
    assert!(!d("2020").matches(&json!({"start": "not a date"})));
}

#[test]
fn numbers_and_quantities() {
    let n = |v: &str| NumberValue::parse(v, true).unwrap();
    let q = json!({"value": 100.2, "system": "http://unitsofmeasure.org", "code": "mg", "unit": "milligram"});
    assert!(n("100").matches(&q)); // [99.5, 100.5)
    assert!(!n("100.0").matches(&q)); // [99.95, 100.05)
    assert!(n("100.2|http://unitsofmeasure.org|mg").matches(&q));
    assert!(n("100.2||mg").matches(&q));
    assert!(n("100.2||milligram").matches(&q));
    assert!(!n("100.2|http://other|mg").matches(&q));
    assert!(!n("100.2||g").matches(&q));
    assert!(n("gt100").matches(&q));
    assert!(!n("lt100").matches(&q));
    assert!(n("ge100.2").matches(&q));
    assert!(n("le100.2").matches(&q));
    assert!(n("ne50").matches(&q));
    assert!(n("ap95").matches(&q));
    assert!(!n("ap80").matches(&q));
    assert!(n("1e2").matches(&q)); // [50, 150)
    assert!(n("5").matches(&json!(5)));
    assert!(n("ge10").matches(&json!({"low": {"value": 5}, "high": {"value": 15}})));
    assert!(NumberValue::parse("abc", false).is_err());
    assert!(NumberValue::parse("5|mg", true).is_err());
    // Extreme exponents: no overflow, and a tiny step does not match everything.
    let tiny = n("1.5e-2147483648");
    assert_eq!(tiny.half_step, 0.0);
    assert!(!tiny.matches(&q));
    assert!(!n("1.5e-99999999999999999999999").matches(&json!(0)));
    assert!(
        NumberValue::parse("1e+2147483647", true).is_err(),
        "not finite"
    );
    assert!(NumberValue::parse("1e--5", true).is_err());
}

#[test]
fn uris() {
    let u = json!("http://hl7.org/fhir/StructureDefinition/bp");
    assert!(uri_matches(
        UriMatch::Exact,
        "http://hl7.org/fhir/StructureDefinition/bp",
        &u
    ));
    assert!(uri_matches(UriMatch::Below, "http://hl7.org/fhir/", &u));
    assert!(!uri_matches(UriMatch::Exact, "http://hl7.org/fhir/", &u));
    assert!(uri_matches(
        UriMatch::Above,
        "http://hl7.org/fhir/StructureDefinition/bp/x",
        &u
    ));
}
