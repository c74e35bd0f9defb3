//! The FHIRPath that de-identification rules are written in: paths with type-qualified
//! starts (`Patient.address.state`), `nodesByType('T')` and `nodesByName('n')`, `where(…)`,
//! `as T`, `is T`, `ofType(T)`, `|`, comparisons, boolean logic, arithmetic, and the string
//! and existence functions that `generalize` cases use. Compiled once per job; anything else
//! is refused at kick-off with the expression named.

use std::cmp::Ordering;

use regex::Regex;
use serde_json::Value;

use super::tree::{NodeId, Tree};
use crate::fhir::model;

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

// ---------------------------------------------------------------------------------------
// Parsing

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Str(String),
    Num(String),
    Date(String),
    Time(String),
    This,
    Sym(&'static str),
}

fn tokenize(src: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = src.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '\'' {
            let mut s = String::new();
            i += 1;
            loop {
                match chars.get(i) {
                    None => return Err("an unterminated string".into()),
                    Some('\'') => break,
                    Some('\\') => {
                        let escaped = *chars.get(i + 1).ok_or("an unterminated string")?;
                        s.push(match escaped {
                            'n' => '\n',
                            't' => '\t',
                            'r' => '\r',
                            other => other,
                        });
                        i += 2;
                    }
                    Some(&ch) => {
                        s.push(ch);
                        i += 1;
                    }
                }
            }
            i += 1;
            tokens.push(Token::Str(s));
        } else if c == '`' {
            let end = chars[i + 1..]
                .iter()
                .position(|&ch| ch == '`')
                .ok_or("an unterminated `identifier`")?;
            tokens.push(Token::Ident(chars[i + 1..i + 1 + end].iter().collect()));
            i += end + 2;
        } else if c.is_ascii_digit() {
            let start = i;
            while i < chars.len() && chars[i].is_ascii_digit() {
                i += 1;
            }
            if i + 1 < chars.len() && chars[i] == '.' && chars[i + 1].is_ascii_digit() {
                i += 1;
                while i < chars.len() && chars[i].is_ascii_digit() {
                    i += 1;
                }
            }
            tokens.push(Token::Num(chars[start..i].iter().collect()));
        } else if c == '@' {
            let start = i + 1;
            i += 1;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '-' | ':' | '.' | '+'))
            {
                i += 1;
            }
            let text: String = chars[start..i].iter().collect();
            match text.strip_prefix('T') {
                Some(time) => tokens.push(Token::Time(time.to_string())),
                None if !text.is_empty() => tokens.push(Token::Date(text)),
                None => return Err("an empty @ literal".into()),
            }
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            tokens.push(Token::Ident(chars[start..i].iter().collect()));
        } else if c == '$' {
            let start = i;
            i += 1;
            while i < chars.len() && chars[i].is_alphanumeric() {
                i += 1;
            }
            let name: String = chars[start..i].iter().collect();
            if name != "$this" {
                return Err(format!("{name} is not supported"));
            }
            tokens.push(Token::This);
        } else {
            let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
            let sym = ["<=", ">=", "!="]
                .into_iter()
                .find(|s| *s == two)
                .or_else(|| {
                    [
                        ".", "(", ")", "[", "]", ",", "|", "=", "<", ">", "+", "-", "*", "/", "&",
                    ]
                    .into_iter()
                    .find(|s| s.starts_with(c))
                })
                .ok_or_else(|| format!("unexpected '{c}'"))?;
            i += sym.len();
            tokens.push(Token::Sym(sym));
        }
    }
    Ok(tokens)
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
    /// Expressions open around the current one: bounded, so that no configuration can take
    /// the parser's (or the evaluator's) stack.
    depth: usize,
}

const MAX_DEPTH: usize = 64;
const MAX_TOKENS: usize = 500;

/// Parses an expression; `Err` says what is not supported.
pub fn parse(src: &str) -> Result<Expr, String> {
    let tokens = tokenize(src)?;
    // A long chain (`a.b.c…`, `1+1+…`) parses without recursion but makes a deep tree, which
    // evaluating walks recursively.
    if tokens.len() > MAX_TOKENS {
        return Err(format!("an expression of more than {MAX_TOKENS} tokens"));
    }
    let mut parser = Parser {
        tokens,
        at: 0,
        depth: 0,
    };
    let expr = parser.expr(0)?;
    if parser.at < parser.tokens.len() {
        return Err(format!("unexpected {:?}", parser.tokens[parser.at]));
    }
    Ok(expr)
}

/// Binary operators by precedence, loosest first (FHIRPath's table).
const LEVELS: &[&[(&str, Op)]] = &[
    &[("implies", Op::Implies)],
    &[("or", Op::Or), ("xor", Op::Xor)],
    &[("and", Op::And)],
    &[("in", Op::In), ("contains", Op::Contains)],
    &[("=", Op::Eq), ("!=", Op::Ne)],
    &[("<=", Op::Le), (">=", Op::Ge), ("<", Op::Lt), (">", Op::Gt)],
    &[("|", Op::Union)],
    // `is` and `as` sit here (handled in `expr`).
    &[],
    &[("+", Op::Add), ("-", Op::Sub), ("&", Op::Concat)],
    &[
        ("*", Op::Mul),
        ("/", Op::Div),
        ("div", Op::IntDiv),
        ("mod", Op::Mod),
    ],
];

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn peek_word(&self) -> Option<&str> {
        match self.peek()? {
            Token::Ident(w) => Some(w),
            Token::Sym(s) => Some(s),
            _ => None,
        }
    }

    fn expect(&mut self, sym: &'static str) -> Result<(), String> {
        if self.peek() == Some(&Token::Sym(sym)) {
            self.at += 1;
            Ok(())
        } else {
            Err(format!("expected '{sym}'"))
        }
    }

    fn expr(&mut self, level: usize) -> Result<Expr, String> {
        if level > 0 {
            return self.expr_at(level);
        }
        self.nested(|parser| parser.expr_at(0))
    }

    fn nested(
        &mut self,
        parse: impl FnOnce(&mut Parser) -> Result<Expr, String>,
    ) -> Result<Expr, String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(format!("expressions nest more than {MAX_DEPTH} deep"));
        }
        let parsed = parse(self);
        self.depth -= 1;
        parsed
    }

    fn expr_at(&mut self, level: usize) -> Result<Expr, String> {
        if level == LEVELS.len() {
            return self.unary();
        }
        let mut left = self.expr_at(level + 1)?;
        loop {
            if LEVELS[level].is_empty() {
                // `x is T`, `x as T`
                match self.peek_word() {
                    Some(w @ ("is" | "as")) if matches!(self.peek(), Some(Token::Ident(_))) => {
                        let is = w == "is";
                        self.at += 1;
                        let ty = self.type_name()?;
                        left = if is {
                            Expr::Is(Box::new(left), ty)
                        } else {
                            Expr::As(Box::new(left), ty)
                        };
                        continue;
                    }
                    _ => return Ok(left),
                }
            }
            let Some(word) = self.peek_word() else {
                return Ok(left);
            };
            let Some(&(_, op)) = LEVELS[level].iter().find(|(w, _)| *w == word) else {
                return Ok(left);
            };
            self.at += 1;
            let right = self.expr_at(level + 1)?;
            left = Expr::Binary(op, Box::new(left), Box::new(right));
        }
    }

    fn type_name(&mut self) -> Result<String, String> {
        let mut name = match self.peek() {
            Some(Token::Ident(n)) => n.clone(),
            _ => return Err("expected a type name".into()),
        };
        self.at += 1;
        // `FHIR.Quantity` / `System.String`: the namespace adds nothing here.
        if (name == "FHIR" || name == "System") && self.peek() == Some(&Token::Sym(".")) {
            self.at += 1;
            name = match self.peek() {
                Some(Token::Ident(n)) => n.clone(),
                _ => return Err("expected a type name".into()),
            };
            self.at += 1;
        }
        if !model::is_type(&name) {
            return Err(format!("'{name}' is not an R4 type"));
        }
        Ok(name)
    }

    fn unary(&mut self) -> Result<Expr, String> {
        if self.peek() == Some(&Token::Sym("-")) {
            self.at += 1;
            let operand = self.nested(Parser::unary)?;
            return Ok(Expr::Negate(Box::new(operand)));
        }
        if self.peek() == Some(&Token::Sym("+")) {
            self.at += 1;
        }
        let mut expr = self.term()?;
        loop {
            match self.peek() {
                Some(Token::Sym(".")) => {
                    self.at += 1;
                    let Some(Token::Ident(name)) = self.peek().cloned() else {
                        return Err("expected a name after '.'".into());
                    };
                    self.at += 1;
                    expr = if self.peek() == Some(&Token::Sym("(")) {
                        self.call(Some(expr), &name)?
                    } else {
                        Expr::Child(Box::new(expr), name)
                    };
                }
                Some(Token::Sym("[")) => {
                    self.at += 1;
                    let index = self.expr(0)?;
                    self.expect("]")?;
                    expr = Expr::Index(Box::new(expr), Box::new(index));
                }
                _ => return Ok(expr),
            }
        }
    }

    fn term(&mut self) -> Result<Expr, String> {
        let token = self.peek().cloned().ok_or("the expression ends early")?;
        self.at += 1;
        Ok(match token {
            Token::Str(s) => Expr::Literal(Item::Str(s)),
            Token::Num(n) if n.contains('.') => {
                Expr::Literal(Item::Dec(n.parse().map_err(|_| "a bad number")?))
            }
            Token::Num(n) => Expr::Literal(Item::Int(n.parse().map_err(|_| "a bad number")?)),
            Token::Date(d) => Expr::Literal(Item::Date(d)),
            Token::Time(t) => Expr::Literal(Item::Time(t)),
            Token::This => Expr::This,
            Token::Sym("(") => {
                let inner = self.expr(0)?;
                self.expect(")")?;
                inner
            }
            Token::Ident(w) if w == "true" || w == "false" => {
                Expr::Literal(Item::Bool(w == "true"))
            }
            Token::Ident(name) => {
                if self.peek() == Some(&Token::Sym("(")) {
                    self.call(None, &name)?
                } else {
                    Expr::Name(name)
                }
            }
            Token::Sym(s) => return Err(format!("unexpected '{s}'")),
        })
    }

    fn call(&mut self, target: Option<Expr>, name: &str) -> Result<Expr, String> {
        let (func, min, max) =
            Func::named(name).ok_or_else(|| format!("the function {name}() is not supported"))?;
        self.expect("(")?;
        let mut args = Vec::new();
        if self.peek() != Some(&Token::Sym(")")) {
            loop {
                if func.takes_type() {
                    args.push(Expr::Literal(Item::Str(self.type_name()?)));
                } else {
                    args.push(self.expr(0)?);
                }
                if self.peek() == Some(&Token::Sym(",")) {
                    self.at += 1;
                } else {
                    break;
                }
            }
        }
        self.expect(")")?;
        if args.len() < min || args.len() > max {
            return Err(format!("{name}() takes {min} to {max} arguments"));
        }
        if func == Func::NodesByType {
            match &args[0] {
                Expr::Literal(Item::Str(ty)) if model::is_type(ty) => {}
                Expr::Literal(Item::Str(ty)) => return Err(format!("'{ty}' is not an R4 type")),
                _ => return Err("nodesByType() takes a type name in quotes".into()),
            }
        }
        Ok(Expr::Call(target.map(Box::new), func, args))
    }
}

// ---------------------------------------------------------------------------------------
// Evaluation

/// A failure while evaluating (a bad regular expression, a value of the wrong kind).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct EvalError(pub String);

type Result2<T> = std::result::Result<T, EvalError>;

pub fn evaluate(tree: &Tree, expr: &Expr, focus: &[Item]) -> Result2<Vec<Item>> {
    eval(tree, expr, focus, focus.first())
}

fn eval(tree: &Tree, expr: &Expr, focus: &[Item], this: Option<&Item>) -> Result2<Vec<Item>> {
    Ok(match expr {
        Expr::This => this.cloned().into_iter().collect(),
        Expr::Literal(item) => vec![item.clone()],
        Expr::Name(name) => navigate(tree, focus, name, true),
        Expr::Child(target, name) => {
            let items = eval(tree, target, focus, this)?;
            navigate(tree, &items, name, false)
        }
        Expr::Index(target, index) => {
            let items = eval(tree, target, focus, this)?;
            let index = eval(tree, index, focus, this)?;
            match index.as_slice() {
                [Item::Int(i)] if *i >= 0 => {
                    items.into_iter().nth(*i as usize).into_iter().collect()
                }
                _ => Vec::new(),
            }
        }
        Expr::Negate(inner) => match eval(tree, inner, focus, this)?.as_slice() {
            [Item::Int(i)] => vec![Item::Int(-i)],
            [Item::Dec(d)] => vec![Item::Dec(-d)],
            _ => Vec::new(),
        },
        Expr::Is(target, ty) => {
            let items = eval(tree, target, focus, this)?;
            match items.as_slice() {
                [item] => vec![Item::Bool(is_type(tree, item, ty))],
                _ => Vec::new(),
            }
        }
        Expr::As(target, ty) => eval(tree, target, focus, this)?
            .into_iter()
            .filter(|item| is_type(tree, item, ty))
            .collect(),
        Expr::Binary(op, left, right) => binary(tree, *op, eval(tree, left, focus, this)?, || {
            eval(tree, right, focus, this)
        })?,
        Expr::Call(target, func, args) => {
            let input = match target {
                Some(target) => eval(tree, target, focus, this)?,
                None => focus.to_vec(),
            };
            call(tree, *func, input, args, this)?
        }
    })
}

/// A path step: children named `name`; at the start of a path a type name matches the focus
/// itself (`Patient.name` on a Patient).
fn navigate(tree: &Tree, items: &[Item], name: &str, path_start: bool) -> Vec<Item> {
    let mut out = Vec::new();
    for item in items {
        let Item::Node(id) = item else { continue };
        if path_start
            && name.starts_with(|c: char| c.is_ascii_uppercase())
            && model::is_a(tree.nodes[*id].ty, name)
        {
            out.push(Item::Node(*id));
            continue;
        }
        out.extend(
            tree.children(*id)
                .filter(|&c| tree.nodes[c].name == name)
                .map(Item::Node),
        );
    }
    out
}

fn is_type(tree: &Tree, item: &Item, ty: &str) -> bool {
    match item {
        Item::Node(id) => model::is_a(tree.nodes[*id].ty, ty),
        Item::Str(_) => ty == "string" || ty == "String",
        Item::Int(_) => ty == "integer" || ty == "Integer",
        Item::Dec(_) => ty == "decimal" || ty == "Decimal",
        Item::Bool(_) => ty == "boolean" || ty == "Boolean",
        Item::Date(_) => matches!(ty, "date" | "dateTime" | "Date" | "DateTime"),
        Item::Time(_) => ty == "time" || ty == "Time",
    }
}

/// The nodes under `items` (and themselves) other than those inside a nested resource.
pub fn self_and_descendants(tree: &Tree, items: &[Item]) -> Vec<NodeId> {
    fn walk(tree: &Tree, id: NodeId, out: &mut Vec<NodeId>) {
        for child in tree.children(id) {
            if tree.is_resource(child) {
                continue;
            }
            out.push(child);
            walk(tree, child, out);
        }
    }
    let mut out = Vec::new();
    for item in items {
        if let Item::Node(id) = item {
            out.push(*id);
            walk(tree, *id, &mut out);
        }
    }
    out
}

/// The value an item stands for: a node's primitive value by its type.
pub fn value_of(tree: &Tree, item: &Item) -> Option<Item> {
    let Item::Node(id) = item else {
        return Some(item.clone());
    };
    let node = &tree.nodes[*id];
    let value = node.value.as_ref()?;
    let text = match value {
        Value::String(s) => s.clone(),
        Value::Bool(b) => return Some(Item::Bool(*b)),
        other => other.to_string(),
    };
    Some(match node.ty {
        "boolean" => Item::Bool(text == "true"),
        "integer" | "positiveInt" | "unsignedInt" => Item::Int(text.parse().ok()?),
        "decimal" => Item::Dec(text.parse().ok()?),
        "date" | "dateTime" | "instant" => Item::Date(text),
        "time" => Item::Time(text),
        _ => Item::Str(text),
    })
}

fn single(tree: &Tree, items: &[Item]) -> Option<Item> {
    match items {
        [item] => value_of(tree, item),
        _ => None,
    }
}

fn truth(tree: &Tree, items: &[Item]) -> Option<bool> {
    match items {
        [] => None,
        [item] => match value_of(tree, item) {
            Some(Item::Bool(b)) => Some(b),
            _ => Some(true), // a single non-boolean counts as true
        },
        _ => Some(true),
    }
}

fn binary(
    tree: &Tree,
    op: Op,
    left: Vec<Item>,
    right: impl FnOnce() -> Result2<Vec<Item>>,
) -> Result2<Vec<Item>> {
    // The logical operators look at their right side only when they must.
    match op {
        Op::And => {
            let l = truth(tree, &left);
            if l == Some(false) {
                return Ok(vec![Item::Bool(false)]);
            }
            let r = truth(tree, &right()?);
            return Ok(match (l, r) {
                (_, Some(false)) => vec![Item::Bool(false)],
                (Some(true), Some(true)) => vec![Item::Bool(true)],
                _ => Vec::new(),
            });
        }
        Op::Or => {
            let l = truth(tree, &left);
            if l == Some(true) {
                return Ok(vec![Item::Bool(true)]);
            }
            let r = truth(tree, &right()?);
            return Ok(match (l, r) {
                (_, Some(true)) => vec![Item::Bool(true)],
                (Some(false), Some(false)) => vec![Item::Bool(false)],
                _ => Vec::new(),
            });
        }
        Op::Implies => {
            let l = truth(tree, &left);
            if l == Some(false) {
                return Ok(vec![Item::Bool(true)]);
            }
            let r = truth(tree, &right()?);
            return Ok(match (l, r) {
                (_, Some(true)) => vec![Item::Bool(true)],
                (Some(true), Some(false)) => vec![Item::Bool(false)],
                _ => Vec::new(),
            });
        }
        _ => {}
    }
    let right = right()?;
    Ok(match op {
        Op::Union => {
            let mut out = left;
            for item in right {
                if !out.iter().any(|o| same(tree, o, &item)) {
                    out.push(item);
                }
            }
            out
        }
        Op::Xor => match (truth(tree, &left), truth(tree, &right)) {
            (Some(a), Some(b)) => vec![Item::Bool(a != b)],
            _ => Vec::new(),
        },
        Op::In | Op::Contains => {
            let (needle, hay) = if op == Op::In {
                (left, right)
            } else {
                (right, left)
            };
            match single(tree, &needle) {
                None => Vec::new(),
                Some(n) => vec![Item::Bool(hay.iter().any(|h| {
                    value_of(tree, h).is_some_and(|h| compare(&n, &h) == Some(Ordering::Equal))
                }))],
            }
        }
        Op::Eq | Op::Ne | Op::Lt | Op::Le | Op::Gt | Op::Ge => {
            let (Some(a), Some(b)) = (single(tree, &left), single(tree, &right)) else {
                return Ok(Vec::new());
            };
            let Some(order) = compare(&a, &b) else {
                return Ok(match op {
                    Op::Eq => vec![Item::Bool(false)],
                    Op::Ne => vec![Item::Bool(true)],
                    _ => Vec::new(),
                });
            };
            vec![Item::Bool(match op {
                Op::Eq => order == Ordering::Equal,
                Op::Ne => order != Ordering::Equal,
                Op::Lt => order == Ordering::Less,
                Op::Le => order != Ordering::Greater,
                Op::Gt => order == Ordering::Greater,
                _ => order != Ordering::Less,
            })]
        }
        Op::Concat => {
            let text =
                |items: &[Item]| single(tree, items).map(|i| text_of(&i)).unwrap_or_default();
            vec![Item::Str(text(&left) + &text(&right))]
        }
        _ => match (single(tree, &left), single(tree, &right)) {
            (Some(a), Some(b)) => arithmetic(op, a, b)?.into_iter().collect(),
            _ => Vec::new(),
        },
    })
}

fn arithmetic(op: Op, a: Item, b: Item) -> Result2<Option<Item>> {
    if let (Op::Add, Item::Str(a), Item::Str(b)) = (op, &a, &b) {
        return Ok(Some(Item::Str(format!("{a}{b}"))));
    }
    let number = |i: &Item| match i {
        Item::Int(n) => Some(*n as f64),
        Item::Dec(d) => Some(*d),
        _ => None,
    };
    if let (Item::Int(x), Item::Int(y)) = (&a, &b) {
        let (x, y) = (*x, *y);
        return Ok(match op {
            Op::Add => Some(Item::Int(x.wrapping_add(y))),
            Op::Sub => Some(Item::Int(x.wrapping_sub(y))),
            Op::Mul => Some(Item::Int(x.wrapping_mul(y))),
            Op::IntDiv if y != 0 => Some(Item::Int(x.div_euclid(y))),
            Op::Mod if y != 0 => Some(Item::Int(x.rem_euclid(y))),
            Op::Div if y != 0 => Some(Item::Dec(x as f64 / y as f64)),
            _ => None,
        });
    }
    let (Some(x), Some(y)) = (number(&a), number(&b)) else {
        // The values stay out of the message: it is logged, and they may identify someone.
        return Err(EvalError(format!(
            "{op:?} needs numbers (or two strings to add)"
        )));
    };
    Ok(match op {
        Op::Add => Some(Item::Dec(x + y)),
        Op::Sub => Some(Item::Dec(x - y)),
        Op::Mul => Some(Item::Dec(x * y)),
        Op::Div if y != 0.0 => Some(Item::Dec(x / y)),
        Op::IntDiv if y != 0.0 => Some(Item::Int((x / y).trunc() as i64)),
        Op::Mod if y != 0.0 => Some(Item::Dec(x % y)),
        _ => None,
    })
}

fn same(tree: &Tree, a: &Item, b: &Item) -> bool {
    match (a, b) {
        (Item::Node(x), Item::Node(y)) => x == y,
        (Item::Node(_), _) | (_, Item::Node(_)) => false,
        _ => match (value_of(tree, a), value_of(tree, b)) {
            (Some(a), Some(b)) => compare(&a, &b) == Some(Ordering::Equal),
            _ => false,
        },
    }
}

/// Orders two values of comparable kinds; `None` when they are not (or when two dates differ
/// only in precision).
pub fn compare(a: &Item, b: &Item) -> Option<Ordering> {
    match (a, b) {
        (Item::Str(a), Item::Str(b)) => Some(a.cmp(b)),
        (Item::Bool(a), Item::Bool(b)) => Some(a.cmp(b)),
        (Item::Int(a), Item::Int(b)) => Some(a.cmp(b)),
        (Item::Int(a), Item::Dec(b)) => (*a as f64).partial_cmp(b),
        (Item::Dec(a), Item::Int(b)) => a.partial_cmp(&(*b as f64)),
        (Item::Dec(a), Item::Dec(b)) => a.partial_cmp(b),
        (Item::Date(a), Item::Date(b)) | (Item::Time(a), Item::Time(b)) => compare_temporal(a, b),
        _ => None,
    }
}

/// Date/time parts compared one by one (`2020-01-05` > `2019`); equal up to the shorter
/// precision is no answer.
fn compare_temporal(a: &str, b: &str) -> Option<Ordering> {
    let parts = |s: &str| -> Vec<String> {
        let s = s.trim_end_matches('Z');
        let s = match s.find('T') {
            Some(t) => {
                // drop a time zone offset after the time
                let (date, time) = s.split_at(t);
                let time = time.split(['+']).next().unwrap_or("");
                let time = match time.rfind('-') {
                    Some(i) => &time[..i],
                    None => time,
                };
                format!("{date}{time}")
            }
            None => s.to_string(),
        };
        s.split(['-', 'T', ':'])
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect()
    };
    let (a, b) = (parts(a), parts(b));
    for (x, y) in a.iter().zip(&b) {
        let order = match (x.parse::<f64>(), y.parse::<f64>()) {
            (Ok(x), Ok(y)) => x.partial_cmp(&y)?,
            _ => x.cmp(y),
        };
        if order != Ordering::Equal {
            return Some(order);
        }
    }
    (a.len() == b.len()).then_some(Ordering::Equal)
}

pub fn text_of(item: &Item) -> String {
    match item {
        Item::Str(s) | Item::Date(s) | Item::Time(s) => s.clone(),
        Item::Int(i) => i.to_string(),
        Item::Dec(d) => d.to_string(),
        Item::Bool(b) => b.to_string(),
        Item::Node(_) => String::new(),
    }
}

fn string_arg(
    tree: &Tree,
    args: &[Expr],
    i: usize,
    this: Option<&Item>,
) -> Result2<Option<String>> {
    let focus: Vec<Item> = this.cloned().into_iter().collect();
    Ok(single(tree, &eval(tree, &args[i], &focus, this)?).map(|v| text_of(&v)))
}

fn int_arg(tree: &Tree, args: &[Expr], i: usize, this: Option<&Item>) -> Result2<Option<i64>> {
    let focus: Vec<Item> = this.cloned().into_iter().collect();
    Ok(match single(tree, &eval(tree, &args[i], &focus, this)?) {
        Some(Item::Int(n)) => Some(n),
        _ => None,
    })
}

fn call(
    tree: &Tree,
    func: Func,
    input: Vec<Item>,
    args: &[Expr],
    this: Option<&Item>,
) -> Result2<Vec<Item>> {
    let type_arg = || match &args[0] {
        Expr::Literal(Item::Str(s)) => s.clone(),
        _ => String::new(),
    };
    // Functions over the whole input collection.
    match func {
        Func::NodesByType => {
            let ty = type_arg();
            return Ok(self_and_descendants(tree, &input)
                .into_iter()
                .filter(|&n| tree.nodes[n].ty == ty)
                .map(Item::Node)
                .collect());
        }
        Func::NodesByName => {
            let Some(name) = string_arg(tree, args, 0, this)? else {
                return Ok(Vec::new());
            };
            return Ok(self_and_descendants(tree, &input)
                .into_iter()
                .filter(|&n| tree.nodes[n].name == name)
                .map(Item::Node)
                .collect());
        }
        Func::Where | Func::Select => {
            let mut out = Vec::new();
            for item in input {
                let result = eval(tree, &args[0], std::slice::from_ref(&item), Some(&item))?;
                if func == Func::Select {
                    out.extend(result);
                } else if truth(tree, &result) == Some(true) {
                    out.push(item);
                }
            }
            return Ok(out);
        }
        Func::Exists => {
            let any = if args.is_empty() {
                !input.is_empty()
            } else {
                !call(tree, Func::Where, input, args, this)?.is_empty()
            };
            return Ok(vec![Item::Bool(any)]);
        }
        Func::Empty => return Ok(vec![Item::Bool(input.is_empty())]),
        Func::Count => return Ok(vec![Item::Int(input.len() as i64)]),
        Func::First => return Ok(input.into_iter().take(1).collect()),
        Func::Last => return Ok(input.into_iter().last().into_iter().collect()),
        Func::Not => {
            return Ok(match truth(tree, &input) {
                Some(b) => vec![Item::Bool(!b)],
                None => Vec::new(),
            });
        }
        Func::OfType | Func::As => {
            let ty = type_arg();
            return Ok(input
                .into_iter()
                .filter(|i| is_type(tree, i, &ty))
                .collect());
        }
        Func::Is => {
            let ty = type_arg();
            return Ok(match input.as_slice() {
                [item] => vec![Item::Bool(is_type(tree, item, &ty))],
                _ => Vec::new(),
            });
        }
        Func::Children => {
            return Ok(input
                .iter()
                .filter_map(|i| match i {
                    Item::Node(id) => Some(*id),
                    _ => None,
                })
                .flat_map(|id| tree.children(id).collect::<Vec<_>>())
                .map(Item::Node)
                .collect());
        }
        Func::Descendants => {
            let mut all = self_and_descendants(tree, &input);
            all.retain(|n| !input.iter().any(|i| matches!(i, Item::Node(x) if x == n)));
            return Ok(all.into_iter().map(Item::Node).collect());
        }
        Func::HasValue => {
            return Ok(vec![Item::Bool(
                matches!(input.as_slice(), [Item::Node(id)] if tree.nodes[*id].value.is_some()),
            )]);
        }
        Func::Iif => {
            let focus: Vec<Item> = this.cloned().into_iter().collect();
            let condition = eval(tree, &args[0], &focus, this)?;
            return if truth(tree, &condition) == Some(true) {
                eval(tree, &args[1], &focus, this)
            } else if let Some(otherwise) = args.get(2) {
                eval(tree, otherwise, &focus, this)
            } else {
                Ok(Vec::new())
            };
        }
        _ => {}
    }
    // Functions of one value.
    let Some(value) = single(tree, &input) else {
        return Ok(Vec::new());
    };
    let this = Some(&value);
    let text = text_of(&value);
    let out = match func {
        Func::StartsWith => {
            string_arg(tree, args, 0, this)?.map(|p| Item::Bool(text.starts_with(&p)))
        }
        Func::EndsWith => string_arg(tree, args, 0, this)?.map(|p| Item::Bool(text.ends_with(&p))),
        Func::ContainsText => {
            string_arg(tree, args, 0, this)?.map(|p| Item::Bool(text.contains(&p)))
        }
        Func::Length => Some(Item::Int(text.chars().count() as i64)),
        Func::Upper => Some(Item::Str(text.to_uppercase())),
        Func::Lower => Some(Item::Str(text.to_lowercase())),
        Func::ToString => Some(Item::Str(text)),
        Func::ToInteger => match value {
            Item::Int(_) => Some(value.clone()),
            Item::Bool(b) => Some(Item::Int(b as i64)),
            _ => text.parse().ok().map(Item::Int),
        },
        Func::ToDecimal => match value {
            Item::Int(n) => Some(Item::Dec(n as f64)),
            Item::Dec(_) => Some(value.clone()),
            _ => text.parse().ok().map(Item::Dec),
        },
        Func::Substring => {
            let chars: Vec<char> = text.chars().collect();
            match int_arg(tree, args, 0, this)? {
                Some(start) if start >= 0 && (start as usize) < chars.len() => {
                    let start = start as usize;
                    let end = match args.get(1) {
                        Some(_) => match int_arg(tree, args, 1, this)? {
                            Some(len) if len >= 0 => (start + len as usize).min(chars.len()),
                            _ => start,
                        },
                        None => chars.len(),
                    };
                    Some(Item::Str(chars[start..end].iter().collect()))
                }
                _ => None,
            }
        }
        Func::Matches => match string_arg(tree, args, 0, this)? {
            Some(pattern) => Some(Item::Bool(regex(&pattern)?.is_match(&text))),
            None => None,
        },
        Func::ReplaceMatches => {
            match (
                string_arg(tree, args, 0, this)?,
                string_arg(tree, args, 1, this)?,
            ) {
                (Some(pattern), Some(with)) => Some(Item::Str(
                    regex(&pattern)?
                        .replace_all(&text, with.as_str())
                        .into_owned(),
                )),
                _ => None,
            }
        }
        Func::Replace => match (
            string_arg(tree, args, 0, this)?,
            string_arg(tree, args, 1, this)?,
        ) {
            (Some(from), Some(to)) => Some(Item::Str(text.replace(&from, &to))),
            _ => None,
        },
        _ => None,
    };
    Ok(out.into_iter().collect())
}

fn regex(pattern: &str) -> Result2<Regex> {
    Regex::new(pattern).map_err(|e| EvalError(format!("a bad regular expression: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
