use super::*;
use crate::deid::tree::Tree;

fn eval_on(json: &str, expr: &str) -> Vec<String> {
    let tree = Tree::parse(json).unwrap();
    let expr = parse(expr).unwrap();
    evaluate(&tree, &expr, &[Item::Node(0)])
        .unwrap()
        .iter()
        .map(|i| match i {
            Item::Node(id) => tree.location(*id),
            other => text_of(other),
        })
        .collect()
}

const OBS: &str = r#"{"resourceType":"Observation","status":"final","code":{"text":"x"},"valueQuantity":{"value":12.5,"unit":"kg"},"component":[{"code":{"text":"a"},"valueString":"s"},{"code":{"text":"b"},"valueQuantity":{"value":3}}]}"#;

#[test]
fn paths_choices_and_types() {
    assert_eq!(
        eval_on(OBS, "Observation.value"),
        ["Observation.valueQuantity[0]"]
    );
    assert_eq!(
        eval_on(OBS, "value.value"),
        ["Observation.valueQuantity[0].value[0]"]
    );
    assert_eq!(eval_on(OBS, "Resource.status"), ["Observation.status[0]"]);
    assert_eq!(
        eval_on(OBS, "component.value as Quantity"),
        ["Observation.component[1].valueQuantity[0]"]
    );
    assert_eq!(
        eval_on(OBS, "(nodesByType('Observation').value as Quantity).value"),
        ["Observation.valueQuantity[0].value[0]"]
    );
    assert_eq!(
        eval_on(OBS, "component.value.ofType(string)"),
        ["Observation.component[0].valueString[0]"]
    );
    assert_eq!(eval_on(OBS, "nodesByType('Quantity').count()"), ["2"]);
    assert_eq!(
        eval_on(OBS, "component.where(code.text='b').code | code"),
        ["Observation.component[1].code[0]", "Observation.code[0]"]
    );
    assert_eq!(
        eval_on(OBS, "nodesByName('unit')"),
        ["Observation.valueQuantity[0].unit[0]"]
    );
}

#[test]
fn values_and_functions() {
    let p = r#"{"resourceType":"Patient","birthDate":"1995-05-05","address":[{"postalCode":"12345"}],"communication":[{"language":{"coding":[{"code":"es-UY"}]}}]}"#;
    assert_eq!(
        eval_on(p, "birthDate >= @1990-01-01 and birthDate <= @2000-01-01"),
        ["true"]
    );
    assert_eq!(eval_on(p, "birthDate > @2000"), ["false"]);
    assert_eq!(
        eval_on(
            p,
            "communication.language.coding.code in ('es-AR' | 'es-ES' | 'es-UY')"
        ),
        ["true"]
    );
    assert_eq!(
        eval_on(p, "address.postalCode.substring(0,2)+'****'"),
        ["12****"]
    );
    assert_eq!(eval_on(p, "(18 div 10)*10"), ["10"]);
    assert_eq!(eval_on(p, "address.postalCode.startsWith('123')"), ["true"]);
    assert_eq!(
        eval_on(
            p,
            r"birthDate.replaceMatches('(?<year>\\d{2,4})-(?<month>\\d{1,2})-(?<day>\\d{1,2})\\b', '${year}-${month}')"
        ),
        ["1995-05"]
    );
}

#[test]
fn refuses_what_it_does_not_support() {
    for bad in [
        "Patient.name.aggregate($this)",
        "nodesByType('Adress')",
        "Patient.name as Humanname",
        "Patient.name[",
        "%resource.id",
        "Patient.name.where(",
    ] {
        assert!(parse(bad).is_err(), "{bad}");
    }
    // Nesting is bounded (the parser recurses).
    let deep = format!("{}1{}", "(".repeat(200), ")".repeat(200));
    assert!(parse(&deep).unwrap_err().contains("nest"));
    assert!(
        parse(&format!("{}1", "-".repeat(200)))
            .unwrap_err()
            .contains("nest")
    );
    assert!(parse(&format!("{}1{}", "(".repeat(60), ")".repeat(60))).is_ok());
    assert!(
        parse(&format!("1{}", "+1".repeat(100_000)))
            .unwrap_err()
            .contains("tokens")
    );
}
