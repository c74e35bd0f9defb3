//! A configuration compiled for the streaming engine (`stream`): which rule reaches which
//! node, decided from the node's type, name, parent type and element path alone. Only
//! configurations whose every rule can be decided so, with methods that change one primitive
//! at a time, get a plan; the others run on the tree engine.

use rustc_hash::FxHashMap;

use super::{
    config::{Config, Method, Target},
    fhirpath::Expr,
};

/// No rule reaches the node.
pub const NONE: u16 = u16::MAX;

/// What a node is, for matching.
pub struct Seen<'a> {
    pub ty: &'a str,
    pub name: &'a str,
    /// The parent's type, when the parent is not the resource being walked.
    pub parent_ty: Option<&'a str>,
    /// Element names from the resource being walked down to this node.
    pub path: &'a [&'static str],
}

pub struct Plan {
    /// `nodesByType('T')`: the first such rule per type.
    by_type: FxHashMap<String, u16>,
    /// `nodesByType('T').child`: per parent type, (child name, rule).
    by_type_child: FxHashMap<String, Vec<(String, u16)>>,
    by_name: FxHashMap<String, u16>,
    by_name_child: Vec<(String, String, u16)>,
    /// Path rules (`Observation.value as Quantity`) per resource type ("" for every type).
    paths: FxHashMap<String, Vec<PathRule>>,
    /// Rules that name a whole resource, per resource type ("" for every type).
    whole: FxHashMap<String, u16>,
}

pub struct PathRule {
    steps: Vec<String>,
    as_type: Option<String>,
    rule: u16,
}

impl Plan {
    /// The plan of `config`, or None when one of its rules needs the tree engine.
    pub fn of(config: &Config) -> Option<Plan> {
        let mut plan = Plan {
            by_type: FxHashMap::default(),
            by_type_child: FxHashMap::default(),
            by_name: FxHashMap::default(),
            by_name_child: Vec::new(),
            paths: FxHashMap::default(),
            whole: FxHashMap::default(),
        };
        for (i, rule) in config.rules.iter().enumerate() {
            let i = u16::try_from(i).ok().filter(|&i| i != NONE)?;
            if !matches!(
                rule.method,
                Method::Keep
                    | Method::Redact
                    | Method::DateShift
                    | Method::CryptoHash
                    | Method::Perturb(_)
            ) {
                return None;
            }
            let scope = rule.resource_type.clone().unwrap_or_default();
            match &rule.target {
                Target::Resource => {
                    plan.whole.entry(scope).or_insert(i);
                }
                Target::Lookup {
                    by_type,
                    key,
                    child,
                } => match (by_type, child) {
                    (true, None) => {
                        plan.by_type.entry(key.clone()).or_insert(i);
                    }
                    (true, Some(child)) => {
                        let entry = plan.by_type_child.entry(key.clone()).or_default();
                        entry.push((child.clone(), i));
                    }
                    (false, None) => {
                        plan.by_name.entry(key.clone()).or_insert(i);
                    }
                    (false, Some(child)) => {
                        plan.by_name_child.push((key.clone(), child.clone(), i))
                    }
                },
                Target::Expr(expr) => {
                    let (steps, as_type) = simple_path(expr)?;
                    let rule = PathRule {
                        steps,
                        as_type,
                        rule: i,
                    };
                    plan.paths.entry(scope).or_default().push(rule);
                }
            }
        }
        Some(plan)
    }

    /// The first rule of a resource of type `resource_type` that names it whole.
    pub fn whole(&self, resource_type: &str) -> u16 {
        let of = |t: &str| self.whole.get(t).copied().unwrap_or(NONE);
        of(resource_type).min(of(""))
    }

    /// The path rules of a resource type, then those of every type.
    pub fn paths(&self, resource_type: &str) -> [&[PathRule]; 2] {
        let of = |t: &str| self.paths.get(t).map_or(&[][..], Vec::as_slice);
        [of(resource_type), of("")]
    }

    /// The first rule that reaches `node` itself (not through an ancestor) in a resource
    /// whose path rules are `paths`.
    pub fn first_match(&self, paths: [&[PathRule]; 2], node: &Seen) -> u16 {
        let mut first = self.by_type.get(node.ty).copied().unwrap_or(NONE);
        if !self.by_name.is_empty()
            && let Some(&i) = self.by_name.get(node.name)
        {
            first = first.min(i);
        }
        if let Some(parent_ty) = node.parent_ty
            && !self.by_type_child.is_empty()
        {
            if let Some(children) = self.by_type_child.get(parent_ty) {
                for (child, i) in children {
                    if child == node.name {
                        first = first.min(*i);
                    }
                }
            }
        }
        for (name, child, i) in &self.by_name_child {
            if child == node.name
                && node.parent_ty.is_some()
                && node.path.len() >= 2
                && node.path[node.path.len() - 2] == name
            {
                first = first.min(*i);
            }
        }
        for path in paths.into_iter().flatten() {
            if path.rule < first && path.matches(node) {
                first = path.rule;
            }
        }
        first
    }
}

impl Plan {
    /// Does a rule of the resource being walked reach into `nested`, a resource inside it
    /// (itself, its children, or further down a path)? Only the tree engine follows that.
    pub fn reaches_inside(&self, resource_type: &str, nested: &Seen) -> bool {
        self.first_match(self.paths(resource_type), nested) != NONE
            || self.by_type_child.contains_key(nested.ty)
            || self
                .by_name_child
                .iter()
                .any(|(name, _, _)| name == nested.name)
            || self.paths(resource_type).into_iter().flatten().any(|p| {
                p.steps.len() > nested.path.len()
                    && p.steps.iter().zip(nested.path).all(|(s, n)| s == n)
            })
    }
}

impl PathRule {
    fn matches(&self, node: &Seen) -> bool {
        self.steps.len() == node.path.len()
            && self.steps.iter().zip(node.path).all(|(s, p)| s == p)
            && self
                .as_type
                .as_deref()
                .is_none_or(|t| crate::fhir::model::is_a(node.ty, t))
    }
}

/// `a.b.c` or `(a.b.c) as T` with element names only: its steps and type.
fn simple_path(expr: &Expr) -> Option<(Vec<String>, Option<String>)> {
    fn steps(expr: &Expr, out: &mut Vec<String>) -> Option<()> {
        match expr {
            Expr::Name(name) => out.push(name.clone()),
            Expr::Child(target, name) => {
                steps(target, out)?;
                out.push(name.clone());
            }
            _ => return None,
        }
        // An upper-case step may name the focus's type rather than a child.
        out.last()
            .filter(|s| s.starts_with(|c: char| c.is_ascii_lowercase()))
            .map(|_| ())
    }
    let (inner, as_type) = match expr {
        Expr::As(inner, ty) => (inner.as_ref(), Some(ty.clone())),
        other => (other, None),
    };
    let mut out = Vec::new();
    steps(inner, &mut out)?;
    Some((out, as_type))
}
