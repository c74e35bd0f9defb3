//! Expressions evaluated over a resource's nodes.

mod functions;

use std::cmp::Ordering;

use serde_json::Value;

use self::functions::call;
use super::{Expr, Item, Op};
use crate::{
    deid::tree::{NodeId, Tree},
    fhir::model,
};

/// A failure while evaluating (a bad regular expression, a value of the wrong kind).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct EvalError(pub String);

pub(super) type Result2<T> = std::result::Result<T, EvalError>;

pub fn evaluate(tree: &Tree, expr: &Expr, focus: &[Item]) -> Result2<Vec<Item>> {
    eval(tree, expr, focus, focus.first())
}

pub(super) fn eval(
    tree: &Tree,
    expr: &Expr,
    focus: &[Item],
    this: Option<&Item>,
) -> Result2<Vec<Item>> {
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
                [Item::Int(i)] if *i >= 0 => usize::try_from(*i)
                    .ok()
                    .and_then(|i| items.into_iter().nth(i))
                    .into_iter()
                    .collect(),
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

pub(super) fn is_type(tree: &Tree, item: &Item, ty: &str) -> bool {
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

pub(super) fn single(tree: &Tree, items: &[Item]) -> Option<Item> {
    match items {
        [item] => value_of(tree, item),
        _ => None,
    }
}

pub(super) fn truth(tree: &Tree, items: &[Item]) -> Option<bool> {
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
    if matches!(op, Op::And | Op::Or | Op::Implies) {
        return logical(tree, op, &left, right);
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
        Op::In => membership(tree, &left, &right),
        Op::Contains => membership(tree, &right, &left),
        Op::Eq | Op::Ne | Op::Lt | Op::Le | Op::Gt | Op::Ge => comparison(tree, op, &left, &right),
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

/// `and`, `or` and `implies` in three-valued logic; the right side is evaluated only when the
/// left does not decide.
fn logical(
    tree: &Tree,
    op: Op,
    left: &[Item],
    right: impl FnOnce() -> Result2<Vec<Item>>,
) -> Result2<Vec<Item>> {
    let l = truth(tree, left);
    let decided = match op {
        Op::And => (l == Some(false)).then_some(false),
        Op::Or => (l == Some(true)).then_some(true),
        _ => (l == Some(false)).then_some(true),
    };
    if let Some(value) = decided {
        return Ok(vec![Item::Bool(value)]);
    }
    let r = truth(tree, &right()?);
    let value = match (op, l, r) {
        (Op::And, _, Some(false)) => Some(false),
        (Op::And, Some(true), Some(true)) => Some(true),
        (Op::Or, _, Some(true)) => Some(true),
        (Op::Or, Some(false), Some(false)) => Some(false),
        (Op::Implies, _, Some(true)) => Some(true),
        (Op::Implies, Some(true), Some(false)) => Some(false),
        _ => None,
    };
    Ok(value.map(Item::Bool).into_iter().collect())
}

/// Whether the single `needle` equals an item of `hay` (empty when there is no single needle).
fn membership(tree: &Tree, needle: &[Item], hay: &[Item]) -> Vec<Item> {
    match single(tree, needle) {
        None => Vec::new(),
        Some(n) => vec![Item::Bool(hay.iter().any(|h| {
            value_of(tree, h).is_some_and(|h| compare(&n, &h) == Some(Ordering::Equal))
        }))],
    }
}

/// `=`, `!=`, `<`, `<=`, `>`, `>=` of two single values; values that cannot be compared are
/// unequal.
fn comparison(tree: &Tree, op: Op, left: &[Item], right: &[Item]) -> Vec<Item> {
    let (Some(a), Some(b)) = (single(tree, left), single(tree, right)) else {
        return Vec::new();
    };
    let Some(order) = compare(&a, &b) else {
        return match op {
            Op::Eq => vec![Item::Bool(false)],
            Op::Ne => vec![Item::Bool(true)],
            _ => Vec::new(),
        };
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
        // `div` truncates; out of range, Rust's conversion saturates.
        #[allow(clippy::cast_possible_truncation)]
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
