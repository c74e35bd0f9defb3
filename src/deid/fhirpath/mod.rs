//! The FHIRPath that de-identification rules are written in: paths with type-qualified
//! starts (`Patient.address.state`), `nodesByType('T')` and `nodesByName('n')`, `where(…)`,
//! `as T`, `is T`, `ofType(T)`, `|`, comparisons, boolean logic, arithmetic, and the string
//! and existence functions that `generalize` cases use. Compiled once per job; anything else
//! is refused at kick-off with the expression named.

mod eval;
mod parse;
#[cfg(test)]
mod tests;

pub use eval::{EvalError, evaluate, text_of, value_of};
pub use parse::parse;

use super::tree::NodeId;

#[derive(Debug, Clone)]
pub enum Expr {
    This,
    Literal(Item),
    /// An identifier at the start of a path: a child of the focus, or the focus itself when
    /// it names the focus's type.
    Name(String),
    Child(Box<Expr>, String),
    Call(Option<Box<Expr>>, Func, Vec<Expr>),
    Index(Box<Expr>, Box<Expr>),
    Binary(Op, Box<Expr>, Box<Expr>),
    Negate(Box<Expr>),
    Is(Box<Expr>, String),
    As(Box<Expr>, String),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Op {
    Union,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
    Xor,
    Implies,
    In,
    Contains,
    Add,
    Sub,
    Mul,
    Div,
    IntDiv,
    Mod,
    Concat,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Func {
    NodesByType,
    NodesByName,
    Where,
    Select,
    Exists,
    Empty,
    Not,
    Count,
    First,
    Last,
    OfType,
    As,
    Is,
    StartsWith,
    EndsWith,
    ContainsText,
    Substring,
    Length,
    Matches,
    ReplaceMatches,
    Replace,
    Upper,
    Lower,
    ToString,
    ToInteger,
    ToDecimal,
    HasValue,
    Children,
    Descendants,
    Iif,
}

impl Func {
    fn named(name: &str) -> Option<(Func, usize, usize)> {
        use Func::*;
        // (function, fewest arguments, most arguments)
        Some(match name {
            "nodesByType" => (NodesByType, 1, 1),
            "nodesByName" => (NodesByName, 1, 1),
            "where" => (Where, 1, 1),
            "select" => (Select, 1, 1),
            "exists" => (Exists, 0, 1),
            "empty" => (Empty, 0, 0),
            "not" => (Not, 0, 0),
            "count" => (Count, 0, 0),
            "first" => (First, 0, 0),
            "last" => (Last, 0, 0),
            "ofType" => (OfType, 1, 1),
            "as" => (As, 1, 1),
            "is" => (Is, 1, 1),
            "startsWith" => (StartsWith, 1, 1),
            "endsWith" => (EndsWith, 1, 1),
            "contains" => (ContainsText, 1, 1),
            "substring" => (Substring, 1, 2),
            "length" => (Length, 0, 0),
            "matches" => (Matches, 1, 1),
            "replaceMatches" => (ReplaceMatches, 2, 2),
            "replace" => (Replace, 2, 2),
            "upper" => (Upper, 0, 0),
            "lower" => (Lower, 0, 0),
            "toString" => (ToString, 0, 0),
            "toInteger" => (ToInteger, 0, 0),
            "toDecimal" => (ToDecimal, 0, 0),
            "hasValue" => (HasValue, 0, 0),
            "children" => (Children, 0, 0),
            "descendants" => (Descendants, 0, 0),
            "iif" => (Iif, 2, 3),
            _ => return None,
        })
    }

    /// Functions whose argument is a type name, not an expression.
    fn takes_type(self) -> bool {
        matches!(self, Func::OfType | Func::As | Func::Is)
    }
}

/// One value of a collection: a node of the resource, or a value computed from one.
#[derive(Debug, Clone)]
pub enum Item {
    Node(NodeId),
    Str(String),
    Int(i64),
    Dec(f64),
    Bool(bool),
    /// A date, dateTime or instant (`@` literal or node value), as written.
    Date(String),
    Time(String),
}
