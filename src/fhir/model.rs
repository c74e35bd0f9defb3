//! The R4 type of every element (generated into `r4_types`): what a JSON key of a node of
//! some type is, and how types derive from one another. De-identification walks resources
//! with it.

use std::sync::LazyLock;

use rustc_hash::FxHashMap;

use super::r4_types::{BASES, ELEMENTS, PRIMITIVES};
pub use super::table_types::ElementType;

/// `ELEMENTS` by type key, a primitive's children being those of Element: checks and
/// de-identification look types up for every object they read, and a binary search over long
/// keys with shared prefixes was most of a load's time.
static BY_TYPE: LazyLock<FxHashMap<&'static str, &'static [ElementType]>> = LazyLock::new(|| {
    let mut by_type: FxHashMap<_, _> = ELEMENTS.iter().map(|(t, e)| (*t, *e)).collect();
    let element = by_type["Element"];
    by_type.extend(PRIMITIVES.iter().map(|p| (*p, element)));
    by_type
});

/// The element of `type_key` (a type name or a backbone element's path) under `key`.
pub fn element(type_key: &str, key: &str) -> Option<&'static ElementType> {
    find(elements_of(type_key)?, key)
}

/// The element under `key` among a type's `elements` (see `elements_of`).
pub fn find(elements: &'static [ElementType], key: &str) -> Option<&'static ElementType> {
    super::search_sorted(elements, key, |e| e.key).map(|i| &elements[i])
}

/// The elements of `type_key`, to look several keys up in.
pub fn elements_of(type_key: &str) -> Option<&'static [ElementType]> {
    BY_TYPE.get(type_key).copied()
}

pub fn is_primitive(ty: &str) -> bool {
    PRIMITIVES.binary_search(&ty).is_ok()
}

/// Is `name` a type this model knows (a datatype, a resource, or an abstract base)?
pub fn is_type(name: &str) -> bool {
    BY_TYPE.contains_key(name)
}

/// Is `ty` the type `ancestor` or derived from it (`Age` is a `Quantity`, `Patient` a
/// `DomainResource` and a `Resource`)?
pub fn is_a(ty: &str, ancestor: &str) -> bool {
    let mut ty = ty;
    loop {
        if ty == ancestor {
            return true;
        }
        match BASES.binary_search_by(|(t, _)| t.cmp(&ty)) {
            Ok(i) => ty = BASES[i].1,
            Err(_) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_sorted() {
        assert!(PRIMITIVES.windows(2).all(|w| w[0] < w[1]));
        assert!(BASES.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(ELEMENTS.windows(2).all(|w| w[0].0 < w[1].0));
        for (t, elements) in ELEMENTS {
            assert!(elements.windows(2).all(|w| w[0].key < w[1].key), "{t}");
        }
    }

    #[test]
    fn choice_backbone_and_nested_resources() {
        let value = element("Observation", "valueQuantity").unwrap();
        assert_eq!((value.name, value.ty), ("value", "Quantity"));
        let component = element("Observation", "component").unwrap();
        assert_eq!(component.ty, "BackboneElement");
        let range = element(component.children, "referenceRange").unwrap();
        assert_eq!(range.children, "Observation.referenceRange");
        assert_eq!(
            element("Observation.referenceRange", "low").unwrap().ty,
            "Quantity"
        );
        assert_eq!(element("Patient", "contained").unwrap().ty, "Resource");
        assert_eq!(element("Bundle.entry", "resource").unwrap().ty, "Resource");
        assert_eq!(element("Patient", "id").unwrap().ty, "id");
        assert_eq!(element("date", "extension").unwrap().ty, "Extension");
        assert_eq!(
            element("Timing", "repeat").unwrap().children,
            "Timing.repeat"
        );
        assert!(element("Patient", "valueQuantity").is_none());
    }

    #[test]
    fn derivation() {
        assert!(is_a("Age", "Quantity"));
        assert!(is_a("Patient", "Resource"));
        assert!(is_a("Patient", "DomainResource"));
        assert!(!is_a("Quantity", "Age"));
        assert!(is_primitive("dateTime") && !is_primitive("Address"));
        assert!(is_type("HumanName") && is_type("Resource") && !is_type("Humanname"));
    }
}
