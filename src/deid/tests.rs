//! The methods against the tool's documented examples and test values, and the walk's rules
//! (first match wins, nested resources, labels, pruning).

use serde_json::{Value, json};

use super::{Deidentifier, Scope, methods, tree::Tree};

const SCOPE: Scope = Scope {
    file: "Patient-1.ndjson",
    folder: "export-1",
};

fn run(config: Value, resource: Value) -> Value {
    let engine = Deidentifier::new(&config.to_string(), b"job seed").unwrap();
    let out = engine.apply(&resource.to_string(), &SCOPE).unwrap();
    serde_json::from_str(&out).unwrap()
}

fn rules(rules: Value) -> Value {
    json!({"fhirVersion": "R4", "fhirPathRules": rules, "parameters": {
        "dateShiftKey": "dummy", "cryptoHashKey": "123", "encryptKey": "0123456789abcdef"}})
}

fn key(bytes: &[u8]) -> aws_lc_rs::hmac::Key {
    aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, bytes)
}

fn labels(resource: &Value) -> Vec<&str> {
    resource["meta"]["security"]
        .as_array()
        .map(|s| s.iter().filter_map(|c| c["code"].as_str()).collect())
        .unwrap_or_default()
}

#[test]
fn hmac_matches_the_tools_test_values() {
    let key = &key(b"123");
    assert_eq!(
        methods::hmac_hex(key, "abc"),
        "8f16771f9f8851b26f4d460fa17de93e2711c7e51337cb8a608a0f81e1c1b6ae"
    );
    assert_eq!(
        methods::hmac_hex(key, "ÆŊŋßſ♫∅"),
        "1a94823f0a0f00a4b1ca771c3446dc5e17958f4dae3588ace2bca8a843eb63d9"
    );
}

#[test]
fn references_keep_all_but_their_id() {
    let at = |r: &str| methods::transform_reference_id(r, |_| "@ID".into());
    assert_eq!(at("#p1"), "#@ID");
    assert_eq!(at("Patient/034AB16"), "Patient/@ID");
    assert_eq!(
        at("http://example.org/fhir/Observation/apo89654/_history/2"),
        "http://example.org/fhir/Observation/@ID/_history/2"
    );
    assert_eq!(
        at("urn:uuid:C757873D-EC9A-4326-A141-556F43239520"),
        "urn:uuid:@ID"
    );
    assert_eq!(at("urn:oid:1.2.3.4.5"), "urn:oid:@ID");
    for whole in [
        "034AB16",
        "Patient/AbcŴΉЙ",
        "urn:oid:1.2.3=4.5",
        "ftp://x/Patient/1",
    ] {
        assert_eq!(at(whole), "@ID", "{whole}");
    }
}

#[test]
fn date_shift_follows_the_tools_algorithm() {
    // The tool's format tests: key "dummy", no prefix, shifts by -21 days.
    assert_eq!(methods::DateShifter::new("dummy").days(""), -21);
    let config = rules(
        json!([{"path": "nodesByType('dateTime')", "method": "dateShift"},
        {"path": "nodesByType('date')", "method": "dateShift"}]),
    );
    let out = run(
        config.clone(),
        json!({"resourceType": "Patient", "birthDate": "2015-02-07",
            "deceasedDateTime": "2015-02-07T13:28:17.12345-05:00"}),
    );
    assert_eq!(out["birthDate"], "2015-01-17");
    assert_eq!(out["deceasedDateTime"], "2015-01-17T00:00:00.00000-05:00");
    assert_eq!(labels(&out), ["PERTURBED"]);
    // Without a day it cannot be shifted: redacted (to the year with partial dates).
    let out = run(
        config,
        json!({"resourceType": "Patient", "birthDate": "2015-02"}),
    );
    assert!(out.get("birthDate").is_none());
    assert_eq!(labels(&out), ["REDACTED"]);
}

#[test]
fn date_shift_scope_resource_uses_the_id_as_hashed_by_then() {
    let config = json!({"fhirPathRules": [
        {"path": "Resource.id", "method": "cryptoHash"},
        {"path": "nodesByType('date')", "method": "dateShift"}],
        "parameters": {"dateShiftKey": "k", "cryptoHashKey": "123"}});
    let out = run(
        config,
        json!({"resourceType": "Patient", "id": "abc", "birthDate": "2000-06-15"}),
    );
    let hashed = methods::hmac_hex(&key(b"123"), "abc");
    assert_eq!(out["id"], hashed.as_str());
    let days = methods::DateShifter::new("k").days(&hashed);
    let expected =
        chrono::NaiveDate::from_ymd_opt(2000, 6, 15).unwrap() + chrono::Duration::days(days);
    assert_eq!(out["birthDate"], expected.format("%Y-%m-%d").to_string());
    assert_eq!(labels(&out), ["CRYTOHASH", "PERTURBED"]);
}

#[test]
fn fixed_offsets_file_and_folder_scopes() {
    let resource = json!({"resourceType": "Patient", "birthDate": "2000-06-15"});
    let shift = |params: Value| {
        let config = json!({"fhirPathRules": [{"path": "Patient.birthDate", "method": "dateShift"}],
            "parameters": params});
        run(config, resource.clone())["birthDate"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        shift(json!({"dateShiftFixedOffsetInDays": 30})),
        "2000-07-15"
    );
    let by_file = methods::DateShifter::new("k").days("Patient-1.ndjson");
    let expected =
        chrono::NaiveDate::from_ymd_opt(2000, 6, 15).unwrap() + chrono::Duration::days(by_file);
    assert_eq!(
        shift(json!({"dateShiftKey": "k", "dateShiftScope": "file"})),
        expected.format("%Y-%m-%d").to_string()
    );
    let by_folder = methods::DateShifter::new("k").days("export-1");
    let expected =
        chrono::NaiveDate::from_ymd_opt(2000, 6, 15).unwrap() + chrono::Duration::days(by_folder);
    assert_eq!(
        shift(json!({"dateShiftKey": "k", "dateShiftScope": "folder"})),
        expected.format("%Y-%m-%d").to_string()
    );
}

#[test]
fn partial_redaction_of_dates_ages_and_zip_codes() {
    let config = json!({"fhirPathRules": [{"path": "Patient.address", "method": "redact"},
        {"path": "Patient.birthDate", "method": "redact"},
        {"path": "nodesByType('Age')", "method": "redact"}],
        "parameters": {"enablePartialDatesForRedact": true, "enablePartialZipCodesForRedact": true,
            "enablePartialAgesForRedact": true, "restrictedZipCodeTabulationAreas": ["203", "556"]}});
    let out = run(
        config.clone(),
        json!({"resourceType": "Patient", "birthDate": "2015-02-07",
            "address": [{"city": "Seattle", "postalCode": "98028-1830"}, {"postalCode": "20301-1830"}]}),
    );
    assert_eq!(out["birthDate"], "2015");
    assert_eq!(
        out["address"],
        json!([{"postalCode": "98000-0000"}, {"postalCode": "00000-0000"}])
    );
    assert_eq!(labels(&out), ["REDACTED", "ABSTRED"]);
    let out = run(
        config,
        json!({"resourceType": "Patient", "birthDate": "1925-02-07"}),
    );
    assert!(out.get("birthDate").is_none(), "over 89: all of it goes");
    let ages = rules(json!([{"path": "nodesByType('Age')", "method": "redact"}]));
    let mut ages = ages;
    ages["parameters"]["enablePartialAgesForRedact"] = json!(true);
    let condition = |age: u32| {
        json!({"resourceType": "Condition", "subject": {"reference": "Patient/1"},
            "onsetAge": {"value": age, "unit": "a"}})
    };
    assert_eq!(run(ages.clone(), condition(57))["onsetAge"]["value"], 57);
    assert!(run(ages, condition(92))["onsetAge"].get("value").is_none());
}

#[test]
fn first_rule_wins_and_reaches_everything_under_it() {
    let config = rules(json!([
        {"path": "nodesByType('HumanName').use", "method": "keep"},
        {"path": "nodesByType('Address').country", "method": "keep"},
        {"path": "nodesByType('HumanName')", "method": "redact"},
        {"path": "nodesByType('Address')", "method": "redact"},
        {"path": "nodesByType('ContactPoint').where(use='home')", "method": "redact"}]));
    let out = run(
        config,
        json!({"resourceType": "Patient", "id": "p", "meta": {"versionId": "1"},
            "name": [{"use": "official", "family": "Doe", "given": ["Jane"]}],
            "address": [{"line": ["1 Main St"], "city": "X", "country": "US"}],
            "telecom": [{"system": "phone", "value": "555", "use": "home"},
                        {"system": "email", "value": "a@b", "use": "work"}]}),
    );
    assert_eq!(out["name"], json!([{"use": "official"}]));
    assert_eq!(out["address"], json!([{"country": "US"}]));
    assert_eq!(
        out["telecom"],
        json!([{"system": "email", "value": "a@b", "use": "work"}])
    );
    assert_eq!(out["meta"]["versionId"], "1");
    assert_eq!(labels(&out), ["REDACTED"]);
}

#[test]
fn hashes_ids_and_references_alike() {
    let config = rules(json!([{"path": "Resource.id", "method": "cryptoHash"},
        {"path": "nodesByType('Reference').reference", "method": "cryptoHash"}]));
    let out = run(
        config,
        json!({"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "x"},
            "subject": {"reference": "Patient/p1", "display": "Jane"},
            "contained": [{"resourceType": "Device", "id": "d1"}], "device": {"reference": "#d1"}}),
    );
    let hash = |s: &str| methods::hmac_hex(&key(b"123"), s);
    assert_eq!(out["id"], hash("o1").as_str());
    assert_eq!(
        out["subject"]["reference"],
        format!("Patient/{}", hash("p1")).as_str()
    );
    assert_eq!(out["subject"]["display"], "Jane");
    assert_eq!(out["contained"][0]["id"], hash("d1").as_str());
    assert_eq!(
        out["device"]["reference"],
        format!("#{}", hash("d1")).as_str()
    );
    assert!(
        out["contained"][0].get("meta").is_none(),
        "contained resources get no labels"
    );
}

#[test]
fn bundle_entries_are_resources_of_their_own() {
    let config = rules(json!([{"path": "Bundle.entry.fullUrl", "method": "redact"},
        {"path": "nodesByType('HumanName')", "method": "redact"}]));
    let out = run(
        config,
        json!({"resourceType": "Bundle", "type": "collection", "entry": [
            {"fullUrl": "urn:uuid:x", "resource": {"resourceType": "Patient", "name": [{"family": "Doe"}]}}]}),
    );
    assert!(out["entry"][0].get("fullUrl").is_none());
    assert!(out["entry"][0]["resource"].get("name").is_none());
    assert_eq!(labels(&out["entry"][0]["resource"]), ["REDACTED"]);
    assert_eq!(labels(&out), ["REDACTED"]);
}

#[test]
fn encrypt_is_aes_cbc_with_the_iv_in_front() {
    let config = rules(json!([{"path": "nodesByType('Address').city", "method": "encrypt"}]));
    let resource = json!({"resourceType": "Patient", "address": [{"city": "Seattle"}]});
    let out = run(config.clone(), resource.clone());
    let sealed = out["address"][0]["city"].as_str().unwrap();
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(sealed)
        .unwrap();
    assert_eq!(bytes.len(), 32, "16 bytes of IV, one block of ciphertext");
    let key =
        aws_lc_rs::cipher::UnboundCipherKey::new(&aws_lc_rs::cipher::AES_128, b"0123456789abcdef")
            .unwrap();
    let decrypting = aws_lc_rs::cipher::PaddedBlockDecryptingKey::cbc_pkcs7(key).unwrap();
    let mut data = bytes[16..].to_vec();
    let iv: [u8; 16] = bytes[..16].try_into().unwrap();
    let plain = decrypting
        .decrypt(
            &mut data,
            aws_lc_rs::cipher::DecryptionContext::Iv128(iv.into()),
        )
        .unwrap();
    assert_eq!(plain, b"Seattle");
    assert_eq!(labels(&out), ["ENCRYPT"]);
    // Deterministic for a job: the same resource encrypts to the same bytes.
    assert_eq!(run(config, resource)["address"][0]["city"], sealed);
}

#[test]
fn substitute_primitives_and_fragments() {
    let config = rules(json!([
        {"path": "nodesByType('Address').country", "method": "keep"},
        {"path": "nodesByType('Address')", "method": "substitute",
         "replaceWith": {"use": "home", "city": "example city", "period": {"start": "2000-01-01"}}},
        {"path": "Patient.gender", "method": "substitute", "replaceWith": "unknown"}]));
    let out = run(
        config,
        json!({"resourceType": "Patient", "gender": "female",
            "address": [{"line": ["1 Main"], "city": "Seattle", "country": "US"}]}),
    );
    assert_eq!(out["gender"], "unknown");
    assert_eq!(
        out["address"],
        json!([{"city": "example city", "country": "US", "use": "home", "period": {"start": "2000-01-01"}}])
    );
    assert_eq!(labels(&out), ["SUBSTITUTED"]);
}

#[test]
fn perturb_stays_in_its_range_and_repeats() {
    let config = rules(
        json!([{"path": "Observation.value as Quantity", "method": "perturb",
        "span": 6, "rangeType": "fixed", "roundTo": 1},
        {"path": "Observation.component.value as Quantity", "method": "perturb",
        "span": 0.2, "rangeType": "proportional", "roundTo": 0}]),
    );
    let resource = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
        "valueQuantity": {"value": 100, "unit": "kg"},
        "component": [{"code": {"text": "y"}, "valueQuantity": {"value": 50}}]});
    let out = run(config.clone(), resource.clone());
    let value = out["valueQuantity"]["value"].as_f64().unwrap();
    assert!((97.0..=103.0).contains(&value), "{value}");
    let text = out["valueQuantity"]["value"].to_string();
    assert_eq!(text.split('.').nth(1).map(str::len), Some(1), "{text}");
    let component = out["component"][0]["valueQuantity"]["value"]
        .as_f64()
        .unwrap();
    assert!(
        (45.0..=55.0).contains(&component) && component.fract() == 0.0,
        "{component}"
    );
    assert_eq!(labels(&out), ["PERTURBED"]);
    assert_eq!(run(config, resource), out);
}

#[test]
fn generalize_cases_in_order() {
    let config = rules(json!([
        {"path": "Patient.communication.language.coding.code", "method": "generalize",
         "cases": {"$this in ('en-AU' | 'en-US')": "'en'", "$this in ('es-AR' | 'es-UY')": "'es'"},
         "otherValues": "redact"},
        {"path": "Patient.address.postalCode", "method": "generalize",
         "cases": {"$this.startsWith('123') or $this.startsWith('234')": "$this.substring(0,2)+'****'"},
         "otherValues": "keep"},
        {"path": "Patient.birthDate", "method": "generalize",
         "cases": {"$this >= @1990-01-01 and $this <= @2000-01-01": "@1990"}}]));
    let out = run(
        config,
        json!({"resourceType": "Patient", "birthDate": "1995-05-05",
            "address": [{"postalCode": "12345"}, {"postalCode": "99999"}],
            "communication": [{"language": {"coding": [{"code": "es-UY"}, {"code": "fr-FR"}]}}]}),
    );
    assert_eq!(out["birthDate"], "1990");
    assert_eq!(
        out["address"],
        json!([{"postalCode": "12****"}, {"postalCode": "99999"}])
    );
    assert_eq!(
        out["communication"][0]["language"]["coding"],
        json!([{"code": "es"}])
    );
    assert_eq!(labels(&out), ["GENERALIZED"]);
}

#[test]
fn processing_errors_raise_or_skip() {
    let failing = json!([{"path": "nodesByType('HumanName')", "method": "generalize",
        "cases": {"true": "'x'"}}]);
    let resource =
        json!({"resourceType": "Patient", "id": "p", "name": [{"family": "Doe"}]}).to_string();
    let raise = Deidentifier::new(&json!({"fhirPathRules": failing}).to_string(), b"s").unwrap();
    assert!(raise.apply(&resource, &SCOPE).is_err());
    let skip = Deidentifier::new(
        &json!({"processingErrors": "skip", "fhirPathRules": failing}).to_string(),
        b"s",
    )
    .unwrap();
    let out: Value = serde_json::from_str(&skip.apply(&resource, &SCOPE).unwrap()).unwrap();
    assert_eq!(
        out,
        json!({"resourceType": "Patient", "meta": {"security": [{"system":
            "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "REDACTED", "display": "redacted"}]}})
    );
}

#[test]
fn empty_keys_come_from_the_job_seed() {
    let config =
        json!({"fhirPathRules": [{"path": "Resource.id", "method": "cryptoHash"}]}).to_string();
    let resource = json!({"resourceType": "Patient", "id": "p"}).to_string();
    let a = Deidentifier::new(&config, b"job a")
        .unwrap()
        .apply(&resource, &SCOPE)
        .unwrap();
    let a2 = Deidentifier::new(&config, b"job a")
        .unwrap()
        .apply(&resource, &SCOPE)
        .unwrap();
    let b = Deidentifier::new(&config, b"job b")
        .unwrap()
        .apply(&resource, &SCOPE)
        .unwrap();
    assert_eq!(a, a2);
    assert_ne!(a, b);
}

#[test]
fn unchanged_resources_keep_their_bytes() {
    let line = r#"{"resourceType":"Observation","id":"o","meta":{"versionId":"1"},"status":"final","code":{"text":"x"},"valueQuantity":{"value":1.50}}"#;
    let engine = Deidentifier::new(&rules(json!([])).to_string(), b"s").unwrap();
    assert_eq!(engine.apply(line, &SCOPE).unwrap(), line);
    assert!(Tree::parse(line).is_ok());
}

#[test]
fn errors_say_where_not_what() {
    let mut config = rules(json!([{"path": "nodesByType('Age')", "method": "redact"}]));
    config["parameters"]["enablePartialAgesForRedact"] = json!(true);
    let engine = Deidentifier::new(&config.to_string(), b"s").unwrap();
    let resource = json!({"resourceType": "Condition", "subject": {"reference": "Patient/1"},
        "onsetAge": {"value": 45.5, "unit": "a"}});
    let error = engine.apply(&resource.to_string(), &SCOPE).unwrap_err().0;
    assert!(error.contains("Condition.onsetAge[0].value[0]"), "{error}");
    assert!(!error.contains("45.5"), "{error}");
}

fn masked() -> Value {
    json!({"extension": [{"url": super::tree::DATA_ABSENT_REASON, "valueCode": "masked"}]})
}

#[test]
fn an_emptied_required_element_stays_as_absent_data_unless_the_tool_output_is_asked_for() {
    let config = |tool: bool| {
        let mut c = rules(json!([
            {"path": "nodesByType('CodeableConcept').text", "method": "redact"},
            {"path": "Immunization.occurrence", "method": "redact"},
            {"path": "nodesByType('Annotation')", "method": "redact"},
            {"path": "nodesByType('Extension').url", "method": "redact"}
        ]));
        c["parameters"]["toolCompatibleOutput"] = json!(tool);
        c
    };
    let observation = json!({"resourceType": "Observation", "id": "o", "status": "final",
        "code": {"text": "a test"}, "note": [{"text": "said"}],
        "extension": [{"url": "http://x/e", "valueString": "kept"}]});
    let out = run(config(false), observation.clone());
    // Observation.code is required: masked. The note (optional) and the extension whose
    // `url` went are gone whole.
    assert_eq!(out["code"], masked());
    assert!(
        out.get("note").is_none() && out.get("extension").is_none(),
        "{out}"
    );
    let tool = run(config(true), observation);
    assert!(tool.get("code").is_none(), "{tool}");
    assert_eq!(tool["extension"], json!([{"valueString": "kept"}]));
    // A required choice of a primitive type: its `_` companion holds the extension.
    let immunization = json!({"resourceType": "Immunization", "id": "i", "status": "completed",
        "vaccineCode": {"coding": [{"code": "1"}]}, "patient": {"reference": "Patient/p"},
        "occurrenceDateTime": "2020-01-01"});
    let out = run(config(false), immunization);
    assert!(out.get("occurrenceDateTime").is_none());
    assert_eq!(out["_occurrenceDateTime"], masked());
}

#[test]
fn generalize_keeps_a_primitives_extension() {
    let config = rules(json!([
        {"path": "Patient.birthDate", "method": "generalize",
         "cases": {"$this >= @1990-01-01 and $this <= @2000-01-01": "@1990"}}]));
    let extension = json!({"extension": [{"url": "http://x/e", "valueString": "v"}]});
    let out = run(
        config,
        json!({"resourceType": "Patient", "birthDate": "1995-05-05", "_birthDate": extension}),
    );
    assert_eq!(out["birthDate"], "1990");
    assert_eq!(out["_birthDate"], extension);
}

#[test]
fn times_are_split_as_the_tools_pattern_splits_them() {
    let pattern = regex::Regex::new(
        r"^T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))",
    )
    .unwrap();
    let mut cases: Vec<String> = [
        "T12:30:00Z",
        "T12:30:00.123Z",
        "T23:59:60+14:00",
        "T00:00:00-13:59",
        "T24:00:00Z",
        "T12:60:00Z",
        "T12:30:61Z",
        "T12:30:00.Z",
        "T12:30:00+14:01",
        "T12:30:00+1400",
        "T12:30:00",
        "T1:30:00Z",
        "12:30:00Z",
        "T12:30:00Zextra",
        "T09:05:07.5-05:00x",
        "",
        "T",
        "T12:30:00+13:60",
        "T12:30:00+15:00",
        "T19:59:59.999999+00:00",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Every one-byte change of a valid time, too.
    let base = "T12:34:56.78+05:30";
    for i in 0..base.len() {
        for c in ['0', '1', '2', '4', '6', '9', ':', '.', 'Z', '+', '-', 'x'] {
            let mut s = base.to_string();
            s.replace_range(i..=i, &c.to_string());
            cases.push(s);
        }
    }
    for case in &cases {
        let expected = pattern.find(case).map(|m| m.as_str());
        assert_eq!(methods::time_prefix(case), expected, "{case}");
    }
}

#[test]
fn recent_hashes_are_the_hashes_and_stay_few_and_short() {
    let engine = Deidentifier::new(&rules(json!([])).to_string(), b"job seed").unwrap();
    let hash = |s: &str| methods::hmac_hex(&key(b"123"), s);
    let long = "x".repeat(10_000);
    for round in 0..2 {
        assert_eq!(engine.hash("p1", true), hash("p1"), "round {round}");
        assert_eq!(engine.hash(&long, true), hash(&long), "round {round}");
        assert_eq!(engine.hash("once", false), hash("once"), "round {round}");
    }
    assert!(!engine.hashes.lock().unwrap().contains_key("once"));
    for i in 0..10_000 {
        let value = format!("Patient/{i}");
        assert_eq!(engine.hash(&value, true), hash(&value));
    }
    let kept = engine.hashes.lock().unwrap();
    assert!(kept.len() <= 4096, "{} kept", kept.len());
    assert!(kept.keys().all(|k| k.len() <= 128));
}

#[test]
fn dates_of_people_over_89_go_whole_from_their_90th_birthday_on() {
    use chrono::Datelike;
    let today = chrono::Utc::now().date_naive();
    if today.month() == 2 && today.day() == 29 {
        return; // 90 years ago has no such day
    }
    let born = |years: i32, days: i64| {
        let birthday = today
            .with_year(today.year() - years)
            .expect("not 29 February");
        (birthday + chrono::Duration::days(days))
            .format("%Y-%m-%d")
            .to_string()
    };
    // 90 today, 90 yesterday: over 89. 90 tomorrow, 89: not.
    for (date, over) in [
        (born(90, 0), true),
        (born(90, -1), true),
        (born(90, 1), false),
        (born(89, 0), false),
    ] {
        let redacted = methods::redacted_date(&date, true, false);
        assert_eq!(redacted.is_none(), over, "{date}");
    }
}
