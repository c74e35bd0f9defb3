//! De-identification on the way out (`_anonymizationConfig`): the configuration format and
//! the behaviour of Microsoft's FHIR Tools for Anonymization, applied to each resource as it
//! is written into a part.
//!
//! A configuration of simple rules (`plan`) runs in a single pass over each resource
//! (`stream`); any other, and any resource that pass leaves, runs on the tree engine here.
//! A resource is parsed once into a typed tree (`tree`), every resource in it (the resource,
//! its contained resources, a Bundle's entries) is walked once by the rules in order — the
//! first rule that reaches a node decides what happens to it and everything under it
//! (`methods`) — emptied nodes are dropped, the resources get the `meta.security` labels of
//! what was done to them, and the tree is written back. Rules are compiled once per task
//! from the text stored with the job (`config`, `fhirpath`).

mod config;
mod fhirpath;
mod invariants;
mod methods;
mod plan;
mod stream;
mod tree;

use std::{
    cell::OnceCell,
    ops::{BitOr, BitOrAssign},
    sync::{Mutex, OnceLock},
};

use aws_lc_rs::hmac;
use rustc_hash::FxHashMap;
use serde_json::{Value, json};

pub use config::Invalid;
use config::{Config, DateShiftScope, Method, Rule, Target};
use fhirpath::Item;
use tree::{NodeId, ROOT, Tree};

/// A resource the rules could not be applied to (with `processingErrors: raise`, the job
/// fails with this message).
#[derive(Debug, thiserror::Error)]
#[error("de-identification failed: {0}")]
pub struct ProcessingError(pub String);

/// What was done to a resource, for its `meta.security` labels.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Operations(u8);

#[derive(Debug, Clone, Copy)]
pub enum Operation {
    Redact,
    Abstract,
    CryptoHash,
    Encrypt,
    Perturb,
    Substitute,
    Generalize,
}

impl Operation {
    const ALL: [Operation; 7] = [
        Operation::Redact,
        Operation::Abstract,
        Operation::CryptoHash,
        Operation::Encrypt,
        Operation::Perturb,
        Operation::Substitute,
        Operation::Generalize,
    ];

    /// The label the tool adds for it (its codes, spelling included).
    fn label(self) -> &'static Value {
        static LABELS: OnceLock<Vec<Value>> = OnceLock::new();
        &LABELS.get_or_init(|| Operation::ALL.iter().map(|o| o.make_label()).collect())
            [self as usize]
    }

    /// The label as JSON text.
    fn label_json(self) -> &'static str {
        static LABELS: OnceLock<Vec<String>> = OnceLock::new();
        &LABELS.get_or_init(|| {
            Operation::ALL
                .iter()
                .map(|o| o.label().to_string())
                .collect()
        })[self as usize]
    }

    fn make_label(self) -> Value {
        const V3: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";
        match self {
            Operation::Redact => json!({"system": V3, "code": "REDACTED", "display": "redacted"}),
            Operation::Abstract => {
                json!({"system": V3, "code": "ABSTRED", "display": "abstracted"})
            }
            Operation::CryptoHash => {
                json!({"system": V3, "code": "CRYTOHASH", "display": "cryptographic hash function"})
            }
            Operation::Encrypt => {
                json!({"code": "ENCRYPT", "display": "exact value is transformed into ciphertext"})
            }
            Operation::Perturb => {
                json!({"code": "PERTURBED", "display": "exact value is replaced with another exact value"})
            }
            Operation::Substitute => {
                json!({"code": "SUBSTITUTED", "display": "exact value is replaced with a predefined value"})
            }
            Operation::Generalize => {
                json!({"code": "GENERALIZED", "display": "exact value is replaced with a general value"})
            }
        }
    }
}

impl Operations {
    pub fn of(operation: Operation) -> Operations {
        Operations(1 << operation as u8)
    }

    fn contains(self, operation: Operation) -> bool {
        self.0 & (1 << operation as u8) != 0
    }
}

impl BitOr for Operations {
    type Output = Operations;
    fn bitor(self, other: Operations) -> Operations {
        Operations(self.0 | other.0)
    }
}

impl BitOrAssign for Operations {
    fn bitor_assign(&mut self, other: Operations) {
        self.0 |= other.0;
    }
}

/// A job's compiled configuration with its keys.
pub struct Deidentifier {
    config: Config,
    /// The single-pass engine's plan, for configurations it runs.
    plan: Option<plan::Plan>,
    seed: hmac::Key,
    crypto_hash_key: hmac::Key,
    /// Hashes made lately: a part names the same patients and encounters again and again.
    hashes: Mutex<FxHashMap<String, String>>,
    date_shift: methods::DateShifter,
    encrypt_key: Vec<u8>,
}

/// Where a resource is written, for `dateShiftScope` `file` and `folder`.
pub struct Scope<'a> {
    pub file: &'a str,
    pub folder: &'a str,
}

impl Deidentifier {
    /// Validates a configuration (the kick-off's check).
    pub fn validate(text: &str) -> Result<(), Invalid> {
        Config::parse(text).map(|_| ())
    }

    /// Compiles `text` for a job whose secret is `seed`. Keys the configuration leaves empty
    /// are drawn from the seed: the same within the job, different between jobs.
    pub fn new(text: &str, seed: &[u8]) -> Result<Deidentifier, Invalid> {
        let config = Config::parse(text)?;
        let seed_key = hmac::Key::new(hmac::HMAC_SHA256, seed);
        let derived = |what: &str| derive(&seed_key, what.as_bytes());
        let params = &config.params;
        let crypto_hash_key = match params.crypto_hash_key.as_str() {
            "" => methods::hex(&derived("cryptoHashKey")).into_bytes(),
            key => key.as_bytes().to_vec(),
        };
        let crypto_hash_key = hmac::Key::new(hmac::HMAC_SHA256, &crypto_hash_key);
        let date_shift_key = match params.date_shift_key.as_str() {
            "" => methods::hex(&derived("dateShiftKey")),
            key => key.to_string(),
        };
        let encrypt_key = match params.encrypt_key.as_str() {
            "" => derived("encryptKey"),
            key => key.as_bytes().to_vec(),
        };
        Ok(Deidentifier {
            plan: plan::Plan::of(&config),
            config,
            seed: seed_key,
            crypto_hash_key,
            hashes: Mutex::default(),
            date_shift: methods::DateShifter::new(&date_shift_key),
            encrypt_key,
        })
    }

    /// `cryptoHash` of `value`, from the recent hashes when it is one of them. Only short
    /// values (ids, references) are kept, so the memory this takes stays small whatever a
    /// configuration hashes; and only those worth keeping (`remember`: the ids references
    /// name, again and again), so a resource's own id does not push them out.
    fn hash(&self, value: &str, remember: bool) -> String {
        const KEPT: usize = 4096;
        const LONGEST: usize = 128;
        if !remember || value.len() > LONGEST {
            return methods::hmac_hex(&self.crypto_hash_key, value);
        }
        let mut hashes = self.hashes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(hash) = hashes.get(value) {
            return hash.clone();
        }
        let hash = methods::hmac_hex(&self.crypto_hash_key, value);
        if hashes.len() == KEPT {
            hashes.clear();
        }
        hashes.insert(value.to_string(), hash.clone());
        hash
    }

    /// The de-identified line of one resource. With `processingErrors: skip` a resource the
    /// rules fail on is written empty but for its type and a REDACTED label.
    pub fn apply(&self, line: &str, scope: &Scope) -> Result<String, ProcessingError> {
        match self.run(line, scope) {
            Ok(out) => Ok(out),
            Err(_) if self.config.skip_processing_errors => {
                let ty = serde_json::from_str::<Value>(line)
                    .ok()
                    .and_then(|v| {
                        v.get("resourceType")
                            .and_then(Value::as_str)
                            .map(String::from)
                    })
                    .unwrap_or_default();
                Ok(
                    json!({"resourceType": ty, "meta": {"security": [Operation::Redact.label()]}})
                        .to_string(),
                )
            }
            Err(e) => Err(e),
        }
    }

    fn run(&self, line: &str, scope: &Scope) -> Result<String, ProcessingError> {
        if let Some(plan) = &self.plan
            && let Ok(out) = stream::run(self, plan, line, scope)
        {
            return Ok(out);
        }
        self.run_tree(line, scope)
    }

    /// The tree engine: any configuration, any resource.
    fn run_tree(&self, line: &str, scope: &Scope) -> Result<String, ProcessingError> {
        let mut tree = Tree::parse(line).map_err(|e| ProcessingError(e.0))?;
        let mut walk = Walk {
            engine: self,
            visited: vec![false; tree.nodes.len()],
            draws: Draws {
                seed: &self.seed,
                line,
                print: OnceCell::new(),
            },
            scope,
        };
        walk.visit(&mut tree, ROOT)?;
        tree.prune(ROOT, !self.config.params.tool_compatible_output);
        Ok(tree.write())
    }
}

/// One resource's walk.
struct Walk<'a> {
    engine: &'a Deidentifier,
    visited: Vec<bool>,
    draws: Draws<'a>,
    scope: &'a Scope<'a>,
}

/// Where a resource's random draws (IVs, noise) come from: the job's seed, the resource as
/// stored, and the node's place in it.
struct Draws<'a> {
    seed: &'a hmac::Key,
    line: &'a str,
    /// The resource's fingerprint, taken at its first draw.
    print: OnceCell<[u8; 16]>,
}

impl Draws<'_> {
    fn draw(&self, tree: &Tree, what: &str, id: NodeId) -> Vec<u8> {
        let print = self.print.get_or_init(|| fingerprint(self.line));
        draw(
            self.seed,
            print,
            format!("{what} {}", tree.location(id)).as_bytes(),
        )
    }
}

impl Walk<'_> {
    /// Applies the rules to each resource under `id` (a resource's own rules before those of
    /// the resources inside it) and labels each; returns what was done.
    fn visit(&mut self, tree: &mut Tree, id: NodeId) -> Result<Operations, ProcessingError> {
        let resource = tree.is_resource(id);
        let mut done = Operations::default();
        if resource {
            done |= self.process_resource(tree, id)?;
        }
        let children = tree.children_now(id);
        for child in children {
            done |= self.visit(tree, child)?;
        }
        if resource
            && !self.engine.config.params.tool_compatible_output
            && invariants::keep_on_tree(tree, id)
        {
            done |= Operations::of(Operation::Redact);
        }
        if resource && tree.nodes[id].name != "contained" {
            add_labels(tree, id, done);
        }
        Ok(done)
    }

    fn process_resource(
        &mut self,
        tree: &mut Tree,
        resource: NodeId,
    ) -> Result<Operations, ProcessingError> {
        let mut done = Operations::default();
        // Taken when the first `nodesByType`/`nodesByName` rule needs it.
        let index = OnceCell::new();
        for rule in &self.engine.config.rules {
            if !rule.applies_to(tree.nodes[resource].ty) {
                continue;
            }
            for node in matches(tree, rule, resource, &index)? {
                done |= self.process_recursive(tree, node, &rule.method)?;
            }
        }
        Ok(done)
    }

    /// The method on `id` and everything under it that no earlier rule reached, nested
    /// resources aside.
    fn process_recursive(
        &mut self,
        tree: &mut Tree,
        id: NodeId,
        method: &Method,
    ) -> Result<Operations, ProcessingError> {
        if self.visited(id) {
            return Ok(Operations::default());
        }
        let mut done = self.process(tree, id, method)?;
        methods::mark(tree, id, &mut self.visited);
        // Generalization sets a value: a primitive's id and extensions stay for later rules.
        if matches!(method, Method::Generalize { .. }) && tree.is_primitive(id) {
            return Ok(done);
        }
        let children = tree.children_now(id);
        for child in children {
            if !tree.is_resource(child) {
                done |= self.process_recursive(tree, child, method)?;
            }
        }
        Ok(done)
    }

    fn visited(&self, id: NodeId) -> bool {
        self.visited.get(id).copied().unwrap_or(false)
    }

    fn process(
        &mut self,
        tree: &mut Tree,
        id: NodeId,
        method: &Method,
    ) -> Result<Operations, ProcessingError> {
        let engine = self.engine;
        let params = &engine.config.params;
        let ty = tree.nodes[id].ty;
        let is_date = ty == "date";
        let is_date_time = ty == "dateTime" || ty == "instant";
        Ok(match method {
            Method::Keep => Operations::default(),
            Method::Redact if is_date || is_date_time => {
                methods::redact_date(tree, id, params.partial_dates, is_date_time)
            }
            Method::Redact if is_age_value(tree, id) => {
                methods::redact_age(tree, id, params.partial_ages)?
            }
            Method::Redact if tree.nodes[id].name == "postalCode" => methods::redact_postal_code(
                tree,
                id,
                params.partial_zip_codes,
                &params.restricted_zip_codes,
            ),
            Method::Redact => match methods::text(tree, id) {
                Some(_) => {
                    tree.nodes[id].value = None;
                    Operations::of(Operation::Redact)
                }
                None => Operations::default(),
            },
            Method::DateShift if is_date || is_date_time => {
                let days = self.date_shift_days(tree);
                methods::shift_date(tree, id, days, params.partial_dates, is_date_time)?
            }
            Method::DateShift => Operations::default(),
            Method::CryptoHash => methods::crypto_hash(tree, id, |v, keep| engine.hash(v, keep)),
            Method::Encrypt => methods::encrypt(tree, id, &engine.encrypt_key, |tree| {
                let iv = self.draws.draw(tree, "iv", id);
                iv[..16].try_into().expect("a 32-byte HMAC")
            })?,
            Method::Substitute(with) => methods::substitute(tree, id, with, &mut self.visited)?,
            Method::Perturb(how) => {
                let draws = &self.draws;
                methods::perturb(tree, id, &mut self.visited, how, |tree| {
                    let draw = draws.draw(tree, "noise", id);
                    let bits = u64::from_be_bytes(draw[..8].try_into().expect("a 32-byte HMAC"));
                    (bits >> 11) as f64 / (1u64 << 53) as f64
                })?
            }
            Method::Generalize {
                cases,
                redact_others,
            } => methods::generalize(tree, id, cases, *redact_others)?,
        })
    }

    fn date_shift_days(&self, tree: &Tree) -> i64 {
        let params = &self.engine.config.params;
        if let Some(days) = params.date_shift_fixed_offset {
            return days;
        }
        let prefix = match params.date_shift_scope {
            // The root resource's id as it is now (after an earlier rule hashed it, hashed).
            DateShiftScope::Resource => tree.id_of(ROOT).unwrap_or_default(),
            DateShiftScope::File => self.scope.file,
            DateShiftScope::Folder => self.scope.folder,
        };
        self.engine.date_shift.days(prefix)
    }
}

fn is_age_value(tree: &Tree, id: NodeId) -> bool {
    tree.nodes[id].ty == "decimal"
        && tree.nodes[id]
            .parent
            .is_some_and(|p| tree.nodes[p].ty == "Age")
}

/// The nodes of `resource` a rule picks.
fn matches(
    tree: &Tree,
    rule: &Rule,
    resource: NodeId,
    index: &OnceCell<Index>,
) -> Result<Vec<NodeId>, ProcessingError> {
    Ok(match &rule.target {
        Target::Resource => vec![resource],
        Target::Lookup {
            by_type,
            key,
            child,
        } => {
            let index = index.get_or_init(|| Index::of(tree, resource));
            let map = if *by_type {
                &index.by_type
            } else {
                &index.by_name
            };
            let found = map
                .get(key.as_str())
                .into_iter()
                .flatten()
                .copied()
                .filter(|&n| !tree.nodes[n].removed);
            match child {
                None => found.collect(),
                Some(child) => found
                    .flat_map(|n| {
                        tree.children(n)
                            .filter(|&c| tree.nodes[c].name == child.as_str())
                            .collect::<Vec<_>>()
                    })
                    .collect(),
            }
        }
        Target::Expr(expr) => fhirpath::evaluate(tree, expr, &[Item::Node(resource)])
            .map_err(|e| ProcessingError(format!("the rule {}: {e}", rule.path)))?
            .into_iter()
            .filter_map(|item| match item {
                Item::Node(n) => Some(n),
                _ => None,
            })
            .collect(),
    })
}

/// A resource's descendants by type and by name, taken once as its walk starts (as the tool
/// does), for `nodesByType('T')` and `nodesByName('n')` rules. A nested resource is listed
/// itself but what is inside it is left to its own walk.
#[derive(Default)]
struct Index {
    by_type: FxHashMap<&'static str, Vec<NodeId>>,
    by_name: FxHashMap<&'static str, Vec<NodeId>>,
}

impl Index {
    fn of(tree: &Tree, resource: NodeId) -> Index {
        let mut index = Index::default();
        index.add_under(tree, resource);
        index
    }

    fn add_under(&mut self, tree: &Tree, id: NodeId) {
        for child in tree.children(id) {
            let node = &tree.nodes[child];
            self.by_type.entry(node.ty).or_default().push(child);
            self.by_name.entry(node.name).or_default().push(child);
            if !tree.is_resource(child) {
                self.add_under(tree, child);
            }
        }
    }
}

/// Adds the labels of `done` that `meta.security` does not have yet.
fn add_labels(tree: &mut Tree, resource: NodeId, done: Operations) {
    if done == Operations::default() {
        return;
    }
    let existing = tree
        .children(resource)
        .find(|&c| tree.nodes[c].name == "meta");
    let meta = match existing {
        Some(meta) => meta,
        None => {
            let added = tree.insert_json(resource, "meta", &json!({}), &["id"]);
            added[0]
        }
    };
    let has = |tree: &Tree, code: &str| {
        tree.children(meta)
            .filter(|&s| tree.nodes[s].name == "security")
            .flat_map(|s| tree.children(s).collect::<Vec<_>>())
            .any(|c| {
                tree.nodes[c].name == "code"
                    && tree.nodes[c]
                        .value
                        .as_ref()
                        .and_then(Value::as_str)
                        .is_some_and(|v| v.eq_ignore_ascii_case(code))
            })
    };
    for operation in Operation::ALL {
        let label = operation.label();
        let code = label["code"].as_str().unwrap_or_default();
        if done.contains(operation) && !has(tree, code) {
            tree.insert_json(
                meta,
                "security",
                &Value::Array(vec![label.clone()]),
                &["versionId", "lastUpdated", "source", "profile", "security"],
            );
        }
    }
}

fn derive(key: &hmac::Key, data: &[u8]) -> Vec<u8> {
    hmac::sign(key, data).as_ref().to_vec()
}

/// A resource's fingerprint for its random draws: the resource as stored, hashed fast (its
/// length and 64 bits of foldhash). The draws' secret is the job's seed, not this: SHA-256
/// over every perturbed resource whole was a tenth of a de-identified export's time.
fn fingerprint(line: &str) -> [u8; 16] {
    use std::hash::BuildHasher;
    let hash = foldhash::quality::FixedState::default().hash_one(line);
    let mut print = [0u8; 16];
    print[..8].copy_from_slice(&hash.to_le_bytes());
    print[8..].copy_from_slice(&(line.len() as u64).to_le_bytes());
    print
}

/// A random draw (32 bytes): the job's seed over a resource's fingerprint and the draw's
/// place in the resource.
fn draw(seed: &hmac::Key, print: &[u8; 16], place: &[u8]) -> Vec<u8> {
    let mut context = hmac::Context::with_key(seed);
    context.update(print);
    context.update(place);
    context.sign().as_ref().to_vec()
}

#[cfg(test)]
mod stream_tests;
#[cfg(test)]
mod tests;
