//! FHIR R4 knowledge: resource types, every element's type, validation, stamping, the Patient
//! compartment, OperationOutcome, instants. Pure functions; no I/O.

pub mod bulk;
pub mod compartment;
pub mod elements;
pub mod group;
pub mod instant;
pub mod model;
pub mod outcome;
#[rustfmt::skip]
pub mod r4;
#[rustfmt::skip]
pub mod r4_types;
pub mod raw_json;
pub mod resource;
pub mod search_param;
pub mod search_value;
mod table_types;
pub mod type_filter;
pub mod validate;

/// Is `name` an R4 resource type? (Asked for every reference de-identification hashes.)
pub fn is_resource_type(name: &str) -> bool {
    search_sorted(r4::RESOURCE_TYPES, name, |t| t).is_some()
}

/// Where `key` is among `items`, sorted by `key_of`. Most steps of the search are decided by
/// the first byte, without a call to compare the rest (which orders the same way: a different
/// first byte decides it). The R4 tables are searched so for every JSON key and reference.
pub fn search_sorted<T>(items: &[T], key: &str, key_of: impl Fn(&T) -> &str) -> Option<usize> {
    let key = key.as_bytes();
    let first = *key.first()?;
    items
        .binary_search_by(|item| {
            let item = key_of(item).as_bytes();
            item.first().cmp(&Some(&first)).then_with(|| item.cmp(key))
        })
        .ok()
}

/// Why request parameters (a kick-off's, a `_typeFilter` query's) are refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParamError {
    /// A value that is wrong.
    #[error("{0}")]
    Invalid(String),
    /// Something the IG allows that this server does not offer (here, or at all).
    #[error("{0}")]
    NotSupported(String),
}

#[cfg(test)]
mod tests {
    #[test]
    fn resource_types_are_sorted_and_known() {
        assert!(r4_sorted());
        assert!(super::is_resource_type("Patient"));
        assert!(super::is_resource_type("ExplanationOfBenefit"));
        assert!(!super::is_resource_type("patient"));
        assert!(!super::is_resource_type("Resource"));
        for t in super::r4::RESOURCE_TYPES {
            assert!(super::is_resource_type(t), "{t}");
            assert!(!super::is_resource_type(&t[..t.len() - 1]), "{t}");
            assert!(!super::is_resource_type(&format!("{t}x")), "{t}");
        }
        assert!(!super::is_resource_type(""));
    }

    fn r4_sorted() -> bool {
        super::r4::RESOURCE_TYPES.windows(2).all(|w| w[0] < w[1])
    }

    /// The committed tables are exactly what their generators make of the definitions (which
    /// `scripts/test` fetches into `target/tools/fhir-r4`).
    #[test]
    fn generated_tables_are_what_the_generators_make() {
        let root = env!("CARGO_MANIFEST_DIR");
        for (generator, version, table) in [
            ("gen_r4.py", "4.5.2", "r4.rs"),
            ("gen_r4_types.py", "5.2.13", "r4_types.rs"),
        ] {
            let definitions = format!("{root}/target/tools/fhir-r4/definitions-{version}");
            assert!(
                std::path::Path::new(&definitions).is_dir(),
                "{definitions} is missing (scripts/test fetches it)"
            );
            let made = std::process::Command::new("python3")
                .arg(format!("{root}/tools/{generator}"))
                .arg(&definitions)
                .output()
                .expect("python3 runs the generators");
            assert!(
                made.status.success(),
                "{generator}: {}",
                String::from_utf8_lossy(&made.stderr)
            );
            let committed = std::fs::read(format!("{root}/src/fhir/{table}")).unwrap();
            assert!(
                made.stdout == committed,
                "src/fhir/{table} differs from what {generator} makes"
            );
        }
    }
}
