//! Substitution: a node replaced by a configured value, keeping what earlier rules changed
//! inside it.

use serde_json::Value;

use super::mark_subtree;
use crate::deid::{
    Operation, Operations, ProcessingError,
    tree::{Node, NodeId, Tree},
};

/// Replaces a node with `replace_with` (a primitive's new value, or a JSON fragment of the
/// node's type). What earlier rules already changed inside it is kept.
pub fn substitute(
    tree: &mut Tree,
    id: NodeId,
    replace_with: &Value,
    visited: &mut Vec<bool>,
) -> Result<Operations, ProcessingError> {
    let node = &tree.nodes[id];
    let replacement = tree.nodes.len();
    tree.nodes.push(Node {
        parent: None,
        children: Vec::new(),
        value: None,
        removed: false,
        ..node.clone()
    });
    if tree.is_primitive(id) {
        let text = match replace_with {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        };
        tree.nodes[replacement].value = text.map(Value::String);
    } else {
        let fragment = match replace_with {
            Value::Null => Value::Object(Default::default()),
            Value::String(s) => serde_json::from_str(s).map_err(|e| {
                ProcessingError(format!(
                    "replaceWith is not JSON for {}: {e}",
                    tree.nodes[id].ty
                ))
            })?,
            other => other.clone(),
        };
        let Value::Object(map) = fragment else {
            return Err(ProcessingError(format!(
                "replaceWith must be a JSON object for {}",
                tree.nodes[id].ty
            )));
        };
        for (key, value) in &map {
            tree.add_from_json(replacement, key, value)
                .map(drop)
                .map_err(|e| {
                    ProcessingError(format!(
                        "replaceWith does not fit {}: {e}",
                        tree.nodes[id].ty
                    ))
                })?;
        }
    }
    visited.resize(tree.nodes.len(), false);
    let mut keep = vec![false; tree.nodes.len()];
    mark_changed(tree, id, visited, &mut keep);
    let operations = substitute_node(tree, id, Some(replacement), visited, &keep);
    mark_subtree(tree, id, visited);
    Ok(operations)
}

/// Marks the nodes under `id` that were changed, or hold a changed node.
fn mark_changed(tree: &Tree, id: NodeId, visited: &[bool], keep: &mut [bool]) -> bool {
    let mut changed = false;
    let children: Vec<NodeId> = tree.children(id).collect();
    for child in children {
        changed |= mark_changed(tree, child, visited, keep);
    }
    changed |= visited[id];
    keep[id] = changed;
    changed
}

fn substitute_node(
    tree: &mut Tree,
    id: NodeId,
    replacement: Option<NodeId>,
    visited: &[bool],
    keep: &[bool],
) -> Operations {
    let was_visited = |n: NodeId| visited.get(n).copied().unwrap_or(false);
    let kept = |n: NodeId| keep.get(n).copied().unwrap_or(false);
    if was_visited(id) {
        return Operations::default();
    }
    let targets: Vec<NodeId> = replacement
        .map(|r| tree.children(r).collect())
        .unwrap_or_default();
    let mut names: Vec<&'static str> = Vec::new();
    for &t in &targets {
        if !names.contains(&tree.nodes[t].name) {
            names.push(tree.nodes[t].name);
        }
    }
    let mut operations = Operations::default();
    for &name in &names {
        let children: Vec<NodeId> = tree
            .children(id)
            .filter(|&c| tree.nodes[c].name == name)
            .collect();
        let named: Vec<NodeId> = targets
            .iter()
            .copied()
            .filter(|&t| tree.nodes[t].name == name)
            .collect();
        let mut i = 0;
        for child in children {
            if was_visited(child) {
                i += 1;
            } else if i < named.len() {
                operations |= substitute_node(tree, child, Some(named[i]), visited, keep);
                i += 1;
            } else if kept(child) {
                operations |= substitute_node(tree, child, None, visited, keep);
            } else {
                tree.remove(child);
            }
        }
        for &extra in &named[i.min(named.len())..] {
            tree.nodes[extra].parent = Some(id);
            tree.nodes[id].children.push(extra);
        }
    }
    let others: Vec<NodeId> = tree
        .children(id)
        .filter(|&c| !names.contains(&tree.nodes[c].name))
        .collect();
    for child in others {
        if was_visited(child) {
            continue;
        } else if kept(child) {
            operations |= substitute_node(tree, child, None, visited, keep);
        } else {
            tree.remove(child);
        }
    }
    tree.nodes[id].value = replacement.and_then(|r| tree.nodes[r].value.clone());
    operations | Operations::of(Operation::Substitute)
}
