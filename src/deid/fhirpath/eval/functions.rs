//! The functions an expression may call.

use regex::Regex;

use super::{EvalError, Result2, eval, is_type, self_and_descendants, single, text_of, truth};
use crate::deid::fhirpath::{Expr, Func, Item};
use crate::deid::tree::{NodeId, Tree};

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

pub(super) fn call(
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
    match func {
        Func::NodesByType => {
            let ty = type_arg();
            Ok(nodes_where(tree, &input, |n| tree.nodes[n].ty == ty))
        }
        Func::NodesByName => match string_arg(tree, args, 0, this)? {
            Some(name) => Ok(nodes_where(tree, &input, |n| tree.nodes[n].name == name)),
            None => Ok(Vec::new()),
        },
        Func::OfType | Func::As => {
            let ty = type_arg();
            Ok(input
                .into_iter()
                .filter(|i| is_type(tree, i, &ty))
                .collect())
        }
        Func::Is => {
            let ty = type_arg();
            Ok(match input.as_slice() {
                [item] => vec![Item::Bool(is_type(tree, item, &ty))],
                _ => Vec::new(),
            })
        }
        Func::Children => Ok(input
            .iter()
            .filter_map(|i| match i {
                Item::Node(id) => Some(*id),
                _ => None,
            })
            .flat_map(|id| tree.children(id).collect::<Vec<_>>())
            .map(Item::Node)
            .collect()),
        Func::Descendants => {
            let mut all = self_and_descendants(tree, &input);
            all.retain(|n| !input.iter().any(|i| matches!(i, Item::Node(x) if x == n)));
            Ok(all.into_iter().map(Item::Node).collect())
        }
        _ => collection(tree, func, input, args, this),
    }
}

/// The nodes at or below `input` that `keep` keeps.
fn nodes_where(tree: &Tree, input: &[Item], keep: impl Fn(NodeId) -> bool) -> Vec<Item> {
    self_and_descendants(tree, input)
        .into_iter()
        .filter(|&n| keep(n))
        .map(Item::Node)
        .collect()
}

/// Functions over the whole input collection; the rest go to `of_value`.
fn collection(
    tree: &Tree,
    func: Func,
    input: Vec<Item>,
    args: &[Expr],
    this: Option<&Item>,
) -> Result2<Vec<Item>> {
    match func {
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
            Ok(out)
        }
        Func::Exists => {
            let any = if args.is_empty() {
                !input.is_empty()
            } else {
                !call(tree, Func::Where, input, args, this)?.is_empty()
            };
            Ok(vec![Item::Bool(any)])
        }
        Func::Empty => Ok(vec![Item::Bool(input.is_empty())]),
        Func::Count => Ok(vec![Item::Int(
            i64::try_from(input.len()).unwrap_or(i64::MAX),
        )]),
        Func::First => Ok(input.into_iter().take(1).collect()),
        Func::Last => Ok(input.into_iter().last().into_iter().collect()),
        Func::Not => Ok(truth(tree, &input)
            .map(|b| Item::Bool(!b))
            .into_iter()
            .collect()),
        Func::HasValue => Ok(vec![Item::Bool(
            matches!(input.as_slice(), [Item::Node(id)] if tree.nodes[*id].value.is_some()),
        )]),
        Func::Iif => {
            let focus: Vec<Item> = this.cloned().into_iter().collect();
            let condition = eval(tree, &args[0], &focus, this)?;
            if truth(tree, &condition) == Some(true) {
                eval(tree, &args[1], &focus, this)
            } else if let Some(otherwise) = args.get(2) {
                eval(tree, otherwise, &focus, this)
            } else {
                Ok(Vec::new())
            }
        }
        _ => match single(tree, &input) {
            Some(value) => Ok(of_value(tree, func, value, args)?.into_iter().collect()),
            None => Ok(Vec::new()),
        },
    }
}

/// Functions of one value (the input's single item).
fn of_value(tree: &Tree, func: Func, value: Item, args: &[Expr]) -> Result2<Option<Item>> {
    let this = Some(&value);
    let text = text_of(&value);
    let arg = |i| string_arg(tree, args, i, this);
    Ok(match func {
        Func::StartsWith => arg(0)?.map(|p| Item::Bool(text.starts_with(&p))),
        Func::EndsWith => arg(0)?.map(|p| Item::Bool(text.ends_with(&p))),
        Func::ContainsText => arg(0)?.map(|p| Item::Bool(text.contains(&p))),
        Func::Length => Some(Item::Int(
            i64::try_from(text.chars().count()).unwrap_or(i64::MAX),
        )),
        Func::Upper => Some(Item::Str(text.to_uppercase())),
        Func::Lower => Some(Item::Str(text.to_lowercase())),
        Func::ToString => Some(Item::Str(text)),
        Func::ToInteger => match value {
            Item::Int(_) => Some(value.clone()),
            Item::Bool(b) => Some(Item::Int(i64::from(b))),
            _ => text.parse().ok().map(Item::Int),
        },
        Func::ToDecimal => match value {
            Item::Int(n) => Some(Item::Dec(n as f64)),
            Item::Dec(_) => Some(value.clone()),
            _ => text.parse().ok().map(Item::Dec),
        },
        Func::Substring => {
            let chars: Vec<char> = text.chars().collect();
            let start = int_arg(tree, args, 0, this)?
                .and_then(|start| usize::try_from(start).ok())
                .filter(|&start| start < chars.len());
            match start {
                None => None,
                Some(start) => {
                    let length = match args.get(1) {
                        Some(_) => Some(int_arg(tree, args, 1, this)?),
                        None => None,
                    };
                    Some(Item::Str(substring(&chars, start, length)))
                }
            }
        }
        Func::Matches => match arg(0)? {
            Some(pattern) => Some(Item::Bool(regex(&pattern)?.is_match(&text))),
            None => None,
        },
        Func::ReplaceMatches => match (arg(0)?, arg(1)?) {
            (Some(pattern), Some(with)) => Some(Item::Str(
                regex(&pattern)?
                    .replace_all(&text, with.as_str())
                    .into_owned(),
            )),
            _ => None,
        },
        Func::Replace => match (arg(0)?, arg(1)?) {
            (Some(from), Some(to)) => Some(Item::Str(text.replace(&from, &to))),
            _ => None,
        },
        _ => None,
    })
}

/// `substring(start[, length])` of the characters from a `start` inside them: a length that
/// is given but not a non-negative integer gives the empty string.
fn substring(chars: &[char], start: usize, length: Option<Option<i64>>) -> String {
    let end = match length {
        Some(Some(len)) => match usize::try_from(len) {
            Ok(len) => start.saturating_add(len).min(chars.len()),
            Err(_) => start,
        },
        Some(None) => start,
        None => chars.len(),
    };
    chars[start..end].iter().collect()
}

fn regex(pattern: &str) -> Result2<Regex> {
    Regex::new(pattern).map_err(|e| EvalError(format!("a bad regular expression: {e}")))
}
