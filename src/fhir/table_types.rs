//! The types of the generated R4 tables (`r4`, `r4_types`): facts only, so that the tables
//! depend on nothing but this, and the modules that read them (`search_param`, `model`) on both.

/// One JSON key of a type: `valueQuantity` is the element `value` of type `Quantity`.
#[derive(Debug)]
pub struct ElementType {
    pub key: &'static str,
    pub name: &'static str,
    /// The instance type: a datatype, `Resource`, or `BackboneElement`/`Element` for a nested
    /// structure.
    pub ty: &'static str,
    /// The type key of its children: the datatype, or a backbone element's path.
    pub children: &'static str,
    /// Does it repeat (a JSON array)?
    pub many: bool,
    /// Is its type a primitive one?
    pub primitive: bool,
    /// Must it be present (minimum cardinality 1)?
    pub required: bool,
}

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

impl SearchParamType {
    pub fn as_str(self) -> &'static str {
        match self {
            SearchParamType::Number => "number",
            SearchParamType::Date => "date",
            SearchParamType::String => "string",
            SearchParamType::Token => "token",
            SearchParamType::Reference => "reference",
            SearchParamType::Composite => "composite",
            SearchParamType::Quantity => "quantity",
            SearchParamType::Uri => "uri",
            SearchParamType::Special => "special",
        }
    }
}

/// One step of a compiled FHIRPath expression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A child element. A choice element (`effective[x]`) matches under any of its type names.
    Field(&'static str),
    /// `.where(key='value')`.
    Where(&'static str, &'static str),
    /// `.where(resolve() is Type)`: references to that type only.
    ResolvesTo(&'static str),
}

#[derive(Debug)]
pub struct SearchParamDef {
    /// The base type; `Resource` for the parameters every type has.
    pub resource_type: &'static str,
    pub code: &'static str,
    pub kind: SearchParamType,
    /// Alternative paths (the `|` of the expression); empty when it cannot be evaluated.
    pub paths: &'static [&'static [Step]],
}
