//! The de-identification of one resource in a single pass over its JSON, for configurations
//! with a plan (`plan`): every node is typed from the R4 tables as it is read, the first rule
//! that reaches it or an ancestor decides it (what the tree engine's rule-by-rule walk
//! amounts to), and the output is written as the input is read. An element that ends up
//! empty is cut from the output; untouched strings are copied as they are. Anything this
//! pass does not handle exactly as the tree engine would (`_element` companions, `null`s,
//! escaped keys, a rule reaching into a nested resource, a method that fails, labels for a
//! `meta` that has some) returns `Fallback`, and the tree engine takes the resource: the
//! bytes out are the same either way.

use std::{borrow::Cow, cell::OnceCell};

use smallvec::SmallVec;

use super::{
    Deidentifier, Operation, Operations, Scope,
    config::{DateShiftScope, Method},
    draw, fingerprint, invariants, methods,
    plan::{NONE, PathRule, Plan, Seen},
    tree::{DATA_ABSENT_REASON, push_primitive_text},
};
use crate::fhir::model;

mod read;

use read::{Scalar, unescape};

/// The tree engine must take this resource.
#[derive(Debug)]
pub struct Fallback;

type Step<T> = Result<T, Fallback>;

/// Elements deep, at most (JSON objects and arrays nest twice as deep).
const MAX_DEPTH: usize = 64;

pub fn run(engine: &Deidentifier, plan: &Plan, line: &str, scope: &Scope) -> Step<String> {
    let mut pass = Pass {
        engine,
        plan,
        line,
        input: line.as_bytes(),
        at: 0,
        // Hashes lengthen ids and references, and labels are added.
        out: String::with_capacity(line.len() * 2 + 512),
        valid: !engine.config.params.tool_compatible_output,
        path: Vec::with_capacity(16),
        location: Vec::with_capacity(16),
        root_ty: "",
        root_id: None,
        print: OnceCell::new(),
        shifts: [OnceCell::new(), OnceCell::new()],
        scope,
    };
    pass.ws();
    pass.expect(b'{')?;
    let ty = pass.resource_type()?;
    pass.root_ty = ty;
    pass.resource(ty, true)?;
    pass.ws();
    // A rule may break an invariant between elements; the tree engine keeps it.
    if pass.at != pass.input.len() || (pass.valid && invariants::broken_in_json(&pass.out)) {
        return Err(Fallback);
    }
    Ok(pass.out)
}

struct Pass<'a> {
    engine: &'a Deidentifier,
    plan: &'a Plan,
    line: &'a str,
    input: &'a [u8],
    at: usize,
    out: String,
    /// Valid R4 out (not the tool's exact output).
    valid: bool,
    /// Element names from the resource being walked to the node being read.
    path: Vec<&'static str>,
    /// JSON keys and item indexes from the root, for random draws.
    location: Vec<(&'static str, usize)>,
    root_ty: &'static str,
    root_id: Option<RootId>,
    print: OnceCell<[u8; 16]>,
    /// Date shifts keyed by the root's id before and after its rule.
    shifts: [OnceCell<i64>; 2],
    scope: &'a Scope<'a>,
}

/// The root resource's id, before and after the rule that decided it: a date shift keyed by
/// the id sees it as the rules before the shift's left it.
struct RootId {
    before: String,
    rule: u16,
    after: String,
}

/// The resource being walked.
struct Focus<'p> {
    ty: &'static str,
    paths: [&'p [PathRule]; 2],
    done: Operations,
    /// Where its element path starts in `Pass::path`.
    path_base: usize,
    /// Where a new `meta` goes: after `id`, or after `resourceType`.
    after_id: usize,
    meta: Meta,
}

impl Focus<'_> {
    /// Is it the root resource (not one inside it)?
    fn root(&self) -> bool {
        self.path_base == 0
    }
}

enum Meta {
    Absent,
    /// Written; new labels go at this offset.
    Kept(usize),
    /// Emptied by the rules; a `meta` with the labels goes at this offset.
    Emptied(usize),
}

/// An object node being read.
struct Parent {
    ty: &'static str,
    children_key: &'static str,
    rule: u16,
    /// The resource being walked itself.
    focus: bool,
    /// The focus's `meta`.
    meta: bool,
}

impl<'a> Pass<'a> {
    // ---- walking -------------------------------------------------------------------

    /// A resource after its `resourceType`: its members, then its labels. Returns what was
    /// done in it and in the resources inside it.
    fn resource(&mut self, ty: &'static str, labelled: bool) -> Step<Operations> {
        self.out.push_str("{\"resourceType\":\"");
        self.out.push_str(ty);
        self.out.push('"');
        let mut focus = Focus {
            ty,
            paths: self.plan.paths(ty),
            done: Operations::default(),
            path_base: self.path.len(),
            after_id: self.out.len(),
            meta: Meta::Absent,
        };
        let node = Parent {
            ty,
            children_key: ty,
            rule: self.plan.whole(ty),
            focus: true,
            meta: false,
        };
        self.members(&mut focus, &node)?;
        if labelled && focus.done != Operations::default() {
            self.insert_labels(&focus);
        }
        Ok(focus.done)
    }

    /// The members of an object after its `{` (and a resource's `resourceType`), through its
    /// `}`. Returns whether any member is left (an emptied object is the caller's to cut).
    fn members(&mut self, focus: &mut Focus, node: &Parent) -> Step<bool> {
        if !node.focus {
            self.out.push('{');
        }
        if node.meta {
            focus.meta = Meta::Kept(self.out.len());
        }
        let elements = model::elements_of(node.children_key).ok_or(Fallback)?;
        let mut names: SmallVec<[&'static str; 16]> = SmallVec::new();
        let (mut kept_any, mut kept_url) = (false, false);
        let mut first = !node.focus;
        loop {
            if self.peek()? == b'}' {
                self.at += 1;
                break;
            }
            if !first {
                self.expect(b',')?;
            }
            first = false;
            let key = self.key()?;
            let element = model::find(elements, key).ok_or(Fallback)?;
            if names.contains(&element.name) {
                return Err(Fallback); // a repeated key, or two types of one choice
            }
            names.push(element.name);
            // Labels go into a `meta` object that has none yet.
            let meta = node.focus && element.name == "meta";
            if (node.meta && element.name == "security") || (meta && self.peek()? != b'{') {
                return Err(Fallback);
            }
            let start = self.out.len();
            let (kept, many) = self.member(focus, node, element)?;
            if kept {
                kept_any = true;
                kept_url |= element.name == "url";
            } else {
                self.out.truncate(start);
                if self.valid && element.required {
                    self.mask(start, element, many);
                }
            }
            if node.focus && element.name == "id" {
                focus.after_id = self.out.len();
            }
            if node.focus && element.name == "meta" && !kept {
                focus.meta = Meta::Emptied(start);
            }
            if node.meta
                && matches!(
                    element.name,
                    "versionId" | "lastUpdated" | "source" | "profile"
                )
            {
                focus.meta = Meta::Kept(self.out.len());
            }
        }
        self.out.push('}');
        let extension_without_url = self.valid && node.ty == "Extension" && !kept_url;
        Ok(kept_any && !extension_without_url)
    }

    /// One member: its key and its value or items. Returns whether anything of it is left,
    /// and whether it came as an array (what the tree engine writes it as).
    fn member(
        &mut self,
        focus: &mut Focus,
        node: &Parent,
        element: &'static model::ElementType,
    ) -> Step<(bool, bool)> {
        // The tree engine's JSON parser stops at this depth: so does the pass (with the
        // resource left to it), long before the stack would.
        if self.path.len() >= MAX_DEPTH {
            return Err(Fallback);
        }
        self.comma();
        self.push_key(element.key);
        self.path.push(element.name);
        let many = self.peek()? == b'[';
        let kept = if many {
            self.at += 1;
            self.out.push('[');
            let mut kept = false;
            let mut index = 0;
            loop {
                if self.peek()? == b']' {
                    self.at += 1;
                    break;
                }
                if index > 0 {
                    self.expect(b',')?;
                }
                let start = self.out.len();
                self.comma();
                if self.item(focus, node, element, index)? {
                    kept = true;
                } else {
                    self.out.truncate(start);
                }
                index += 1;
            }
            // An empty array is no node at all to the tree engine (nothing to mask).
            if index == 0 {
                return Err(Fallback);
            }
            self.out.push(']');
            kept
        } else {
            self.item(focus, node, element, 0)?
        };
        self.path.pop();
        Ok((kept, many))
    }

    /// One item of an element. Returns whether anything of it is left.
    fn item(
        &mut self,
        focus: &mut Focus,
        node: &Parent,
        element: &'static model::ElementType,
        index: usize,
    ) -> Step<bool> {
        self.location.push((element.key, index));
        let parent_ty = (!node.focus).then_some(node.ty);
        let kept = if element.ty == "Resource" {
            self.expect(b'{')?;
            let ty = self.resource_type()?;
            let nested = Seen {
                ty,
                name: element.name,
                parent_ty,
                path: &self.path[focus.path_base..],
            };
            if self.plan.reaches_inside(focus.ty, &nested) {
                return Err(Fallback);
            }
            focus.done |= self.resource(ty, element.name != "contained")?;
            true
        } else {
            let seen = Seen {
                ty: element.ty,
                name: element.name,
                parent_ty,
                path: &self.path[focus.path_base..],
            };
            let rule = node.rule.min(self.plan.first_match(focus.paths, &seen));
            if element.primitive {
                let scalar = self.scalar()?;
                self.primitive(focus, node, element, rule, scalar)?
            } else {
                self.expect(b'{')?;
                let child = Parent {
                    ty: element.ty,
                    children_key: element.children,
                    rule,
                    focus: false,
                    meta: node.focus && element.name == "meta",
                };
                self.members(focus, &child)?
            }
        };
        self.location.pop();
        Ok(kept)
    }

    /// A primitive decided by `rule`: its new value written, or false when none is left.
    fn primitive(
        &mut self,
        focus: &mut Focus,
        node: &Parent,
        element: &'static model::ElementType,
        rule: u16,
        scalar: Scalar,
    ) -> Step<bool> {
        let method = match rule {
            NONE => None,
            rule => Some(&self.engine.config.rules[usize::from(rule)].method),
        };
        let changed = match method {
            None | Some(Method::Keep) => None,
            Some(method) => self.apply(focus, node, element, rule, method, &scalar)?,
        };
        if node.focus && focus.root() && element.name == "id" {
            let Scalar::Str { raw, escaped } = scalar else {
                return Err(Fallback);
            };
            let before = unescape(raw, escaped)?.into_owned();
            let after = match &changed {
                Some(new) => new.clone().unwrap_or_default(),
                None => before.clone(),
            };
            self.root_id = Some(RootId {
                before,
                rule,
                after,
            });
        }
        match changed {
            Some(None) => Ok(false),
            Some(Some(new)) => {
                push_primitive_text(&mut self.out, element.ty, &new);
                Ok(true)
            }
            None => {
                self.push_scalar(element.ty, &scalar)?;
                Ok(true)
            }
        }
    }

    /// What `method` makes of a primitive: None when it stays, Some(None) when it goes.
    fn apply(
        &mut self,
        focus: &mut Focus,
        node: &Parent,
        element: &'static model::ElementType,
        rule: u16,
        method: &Method,
        scalar: &Scalar,
    ) -> Step<Option<Option<String>>> {
        let params = &self.engine.config.params;
        let ty = element.ty;
        let (is_date, is_date_time) = (ty == "date", ty == "dateTime" || ty == "instant");
        let numeric = matches!(ty, "decimal" | "integer" | "positiveInt" | "unsignedInt");
        let Some(value) = text(scalar)? else {
            // An empty string: no method has anything to work on, but a number to perturb.
            return match method {
                Method::Perturb(_) if numeric => Err(Fallback),
                _ => Ok(None),
            };
        };
        let (new, done) = match method {
            Method::Redact if is_date || is_date_time => (
                methods::redacted_date(&value, params.partial_dates, is_date_time),
                Operations::of(Operation::Redact),
            ),
            Method::Redact if ty == "decimal" && node.ty == "Age" => (
                methods::redacted_age(&value, params.partial_ages).map_err(|_| Fallback)?,
                Operations::of(Operation::Redact),
            ),
            Method::Redact if element.name == "postalCode" => methods::redacted_postal_code(
                &value,
                params.partial_zip_codes,
                &params.restricted_zip_codes,
            ),
            Method::Redact => (None, Operations::of(Operation::Redact)),
            Method::DateShift if is_date || is_date_time => {
                let days = self.date_shift_days(focus, rule)?;
                methods::shifted_date(&value, days, params.partial_dates, is_date_time)
                    .map_err(|_| Fallback)?
            }
            Method::CryptoHash => {
                let is_reference = element.name == "reference" && node.ty == "Reference";
                let hashed =
                    methods::hashed(&value, is_reference, |v, keep| self.engine.hash(v, keep));
                (Some(hashed), Operations::of(Operation::CryptoHash))
            }
            Method::Perturb(how) if numeric => {
                // A quantity's value is perturbed as the quantity (its place keys the noise).
                let quantity = node.rule == rule && methods::QUANTITY_TYPES.contains(&node.ty);
                let depth = self.location.len() - usize::from(quantity);
                let draw = self.draw(depth);
                let uniform = || {
                    let bits = u64::from_be_bytes(draw[..8].try_into().expect("a 32-byte HMAC"));
                    (bits >> 11) as f64 / (1u64 << 53) as f64
                };
                let new = methods::perturbed(ty, value.into_owned(), how, uniform)
                    .map_err(|_| Fallback)?;
                (Some(new), Operations::of(Operation::Perturb))
            }
            _ => return Ok(None),
        };
        focus.done |= done;
        Ok(Some(new))
    }

    fn date_shift_days(&self, focus: &Focus, rule: u16) -> Step<i64> {
        let params = &self.engine.config.params;
        if let Some(days) = params.date_shift_fixed_offset {
            return Ok(days);
        }
        let (prefix, after) = match params.date_shift_scope {
            DateShiftScope::Resource => {
                // The root's id as the rules before this one left it (all of them, for a
                // nested resource, walked after the root).
                let id = self.root_id.as_ref().ok_or(Fallback)?;
                let nested = !focus.root();
                if nested || id.rule < rule {
                    (id.after.as_str(), true)
                } else {
                    (id.before.as_str(), false)
                }
            }
            DateShiftScope::File => (self.scope.file, false),
            DateShiftScope::Folder => (self.scope.folder, false),
        };
        let shifter = &self.engine.date_shift;
        Ok(*self.shifts[usize::from(after)].get_or_init(|| shifter.days(prefix)))
    }

    /// The draw for the node at `location[..depth]` (the tree engine's `Draws::draw`).
    fn draw(&self, depth: usize) -> Vec<u8> {
        let print = self.print.get_or_init(|| fingerprint(self.line));
        let mut place = String::with_capacity(128);
        place.push_str("noise ");
        place.push_str(self.root_ty);
        for (key, index) in &self.location[..depth] {
            place.push('.');
            place.push_str(key);
            place.push('[');
            place.push_str(itoa::Buffer::new().format(*index));
            place.push(']');
        }
        draw(&self.engine.seed, print, place.as_bytes())
    }

    // ---- writing -------------------------------------------------------------------

    /// A comma unless the output is at the start of an object or array.
    fn comma(&mut self) {
        if !self.out.ends_with(['{', '[']) {
            self.out.push(',');
        }
    }

    fn push_key(&mut self, key: &str) {
        self.out.push('"');
        self.out.push_str(key);
        self.out.push_str("\":");
    }

    /// An unchanged primitive, written as the tree engine writes it.
    fn push_scalar(&mut self, ty: &str, scalar: &Scalar) -> Step<()> {
        let plain_string = !matches!(
            ty,
            "boolean" | "integer" | "positiveInt" | "unsignedInt" | "decimal"
        );
        match scalar {
            Scalar::Str {
                raw,
                escaped: false,
            } if plain_string => {
                self.out.push('"');
                self.out.push_str(raw);
                self.out.push('"');
            }
            Scalar::Str { raw, escaped } => {
                let text = unescape(raw, *escaped)?;
                push_primitive_text(&mut self.out, ty, &text);
            }
            Scalar::Number(n) => push_primitive_text(&mut self.out, ty, n),
            Scalar::Bool(b) => {
                push_primitive_text(&mut self.out, ty, if *b { "true" } else { "false" })
            }
        }
        Ok(())
    }

    /// An emptied required element, put back at `at` as absent data (`masked`).
    fn mask(&mut self, at: usize, element: &model::ElementType, many: bool) {
        let mut member = String::with_capacity(128);
        if !self.out[..at].ends_with('{') {
            member.push(',');
        }
        member.push('"');
        if element.primitive {
            member.push('_');
        }
        member.push_str(element.key);
        member.push_str("\":");
        let absent = format!(
            "{{\"extension\":[{{\"url\":\"{DATA_ABSENT_REASON}\",\"valueCode\":\"masked\"}}]}}"
        );
        if many {
            member.push('[');
            member.push_str(&absent);
            member.push(']');
        } else {
            member.push_str(&absent);
        }
        self.out.insert_str(at, &member);
    }

    /// The labels of what was done, in `meta.security` (the tool's codes and order).
    fn insert_labels(&mut self, focus: &Focus) {
        let mut security = String::from("\"security\":[");
        for operation in Operation::ALL {
            if focus.done.contains(operation) {
                if !security.ends_with('[') {
                    security.push(',');
                }
                security.push_str(operation.label_json());
            }
        }
        security.push(']');
        match focus.meta {
            Meta::Kept(at) => {
                let member = if self.out[..at].ends_with('{') {
                    let more = !self.out[at..].starts_with('}');
                    format!("{security}{}", if more { "," } else { "" })
                } else {
                    format!(",{security}")
                };
                self.out.insert_str(at, &member);
            }
            Meta::Emptied(at) => self
                .out
                .insert_str(at, &format!(",\"meta\":{{{security}}}")),
            Meta::Absent => {
                let at = focus.after_id;
                self.out
                    .insert_str(at, &format!(",\"meta\":{{{security}}}"));
            }
        }
    }
}

/// The text methods work on (empty strings are none), as the tree engine's `methods::text`.
fn text<'a>(scalar: &Scalar<'a>) -> Step<Option<Cow<'a, str>>> {
    Ok(match *scalar {
        Scalar::Str { raw: "", .. } => None,
        Scalar::Str { raw, escaped } => Some(unescape(raw, escaped)?),
        Scalar::Number(n) => Some(Cow::Borrowed(n)),
        Scalar::Bool(b) => Some(Cow::Borrowed(methods::bool_text(b))),
    })
}
