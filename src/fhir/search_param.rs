//! The shape of the generated R4 search-parameter table.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchParamType {
    Number,
    Date,
    String,
    Token,
    Reference,
    Composite,
    Quantity,
    Uri,
    Special,
}

#[derive(Debug)]
pub struct SearchParamDef {
    pub code: &'static str,
    pub base: &'static [&'static str],
    pub kind: SearchParamType,
    pub expression: &'static str,
    pub targets: &'static [&'static str],
}

/// The search parameters that apply to `resource_type`.
pub fn for_type(resource_type: &str) -> impl Iterator<Item = &'static SearchParamDef> + '_ {
    super::r4::SEARCH_PARAMS
        .iter()
        .filter(move |p| p.base.contains(&resource_type) || p.base.contains(&"Resource"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observation_code_is_a_token() {
        let code = for_type("Observation").find(|p| p.code == "code").unwrap();
        assert_eq!(code.kind, SearchParamType::Token);
        assert!(code.expression.contains("Observation.code"));
        assert!(for_type("Observation").any(|p| p.code == "_lastUpdated"));
    }
}
