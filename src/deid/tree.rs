//! A resource as a tree of typed nodes: parsed from its JSON once, changed in place by the
//! rules, written back in the order it came in. Every node knows its R4 type (a choice element
//! `valueQuantity` is the node `value` of type `Quantity`), which is what `nodesByType` and the
//! methods go by. A primitive is one node whether its JSON is `"birthDate"`, `"_birthDate"`
//! (its id and extensions) or both.

use serde_json::{Map, Value};

use crate::fhir::{model, r4::RESOURCE_TYPES, resource::push_json_string};

pub type NodeId = usize;

/// A node's children taken at one moment, without a heap allocation for the usual few.
pub type Children = smallvec::SmallVec<[NodeId; 16]>;

#[derive(Debug, Clone)]
pub struct Node {
    /// The element name (`value` for `valueQuantity`); a root resource's is its type.
    pub name: &'static str,
    /// The JSON key it is written under.
    pub key: &'static str,
    /// The instance type: a datatype, a resource type, `BackboneElement` or `Element`.
    pub ty: &'static str,
    /// The type key of its children (a backbone element's definition path).
    pub children_key: &'static str,
    /// A primitive's value as it came in (or as a method set it).
    pub value: Option<Value>,
    pub children: Vec<NodeId>,
    pub parent: Option<NodeId>,
    /// Written as an array (the element repeats).
    pub many: bool,
    /// A resource (the root, a contained one, a Bundle entry's).
    pub resource: bool,
    /// Its type is a primitive one (asked for every node the rules visit).
    pub primitive: bool,
    pub removed: bool,
}

#[derive(Debug, Clone)]
pub struct Tree {
    pub nodes: Vec<Node>,
}

/// Why a resource cannot be walked: its JSON does not follow R4.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

pub const ROOT: NodeId = 0;

/// R4's extension for a value that is missing, and why (`masked`: withheld).
pub const DATA_ABSENT_REASON: &str = "http://hl7.org/fhir/StructureDefinition/data-absent-reason";

impl Tree {
    pub fn parse(json: &str) -> Result<Tree, Invalid> {
        let value: Value =
            serde_json::from_str(json).map_err(|e| Invalid(format!("not JSON: {e}")))?;
        let Value::Object(map) = value else {
            return Err(Invalid("a resource is a JSON object".into()));
        };
        let mut tree = Tree { nodes: Vec::new() };
        let ty = resource_type(&map, "the resource")?;
        let root = model::ElementType {
            key: ty,
            name: ty,
            ty,
            children: ty,
            many: false,
            primitive: false,
            required: true,
        };
        tree.push(None, &root, Some(ty), None, false);
        tree.read_object(ROOT, map, ty)?;
        Ok(tree)
    }

    /// Adds a node under `parent`: `element` says its name, key, type and children; a
    /// resource (`resource_type`) has its own type instead.
    fn push(
        &mut self,
        parent: Option<NodeId>,
        element: &model::ElementType,
        resource_type: Option<&'static str>,
        value: Option<Value>,
        many: bool,
    ) -> NodeId {
        let id = self.nodes.len();
        self.nodes.push(Node {
            name: element.name,
            key: element.key,
            ty: resource_type.unwrap_or(element.ty),
            children_key: resource_type.unwrap_or(element.children),
            value,
            children: Vec::new(),
            parent,
            many,
            resource: resource_type.is_some(),
            primitive: resource_type.is_none() && element.primitive,
            removed: false,
        });
        if let Some(parent) = parent {
            self.nodes[parent].children.push(id);
        }
        id
    }

    /// Reads the members of `map` as the children of `id`, whose type key is `type_key`. The
    /// values move into the nodes (no copies).
    fn read_object(
        &mut self,
        id: NodeId,
        mut map: Map<String, Value>,
        type_key: &str,
    ) -> Result<(), Invalid> {
        let elements = model::elements_of(type_key).unwrap_or_default();
        // `_name` (a primitive's id and extensions) goes with `name` when both are there; most
        // objects have neither.
        let mut companions: Vec<(String, Value)> = Vec::new();
        if map.keys().any(|k| k.starts_with('_')) {
            let paired: Vec<String> = map
                .keys()
                .filter(|k| {
                    k.strip_prefix('_')
                        .is_some_and(|base| map.contains_key(base))
                })
                .cloned()
                .collect();
            for key in paired {
                let value = map.shift_remove(&key).expect("listed above");
                companions.push((key, value));
            }
        }
        for (key, value) in map {
            if key == "resourceType" && self.is_resource(id) {
                continue;
            }
            // What is left of `_name` is a primitive without a value.
            let (base, companion_only) = match key.strip_prefix('_') {
                Some(base) => (base, true),
                None => (key.as_str(), false),
            };
            let element = model::find(elements, base).ok_or_else(|| {
                Invalid(format!(
                    "'{base}' is not an element of {}",
                    self.nodes[id].ty
                ))
            })?;
            let (value, companion) = if companion_only {
                (None, Some(value))
            } else {
                let at = companions.iter().position(|(k, _)| &k[1..] == base);
                (Some(value), at.map(|at| companions.swap_remove(at).1))
            };
            self.read_element(id, element, value, companion)?;
        }
        Ok(())
    }

    fn read_element(
        &mut self,
        parent: NodeId,
        element: &'static model::ElementType,
        value: Option<Value>,
        companion: Option<Value>,
    ) -> Result<(), Invalid> {
        let many = matches!(value.as_ref().or(companion.as_ref()), Some(Value::Array(_)));
        if !many {
            let present = |v: Option<Value>| v.filter(|v| !v.is_null());
            return self.read_item(parent, element, present(value), present(companion), false);
        }
        // Items by position; JSON `null`s (placeholders in arrays) are none.
        fn items(v: Option<Value>) -> std::vec::IntoIter<Value> {
            match v {
                None => Vec::new().into_iter(),
                Some(Value::Array(items)) => items.into_iter(),
                Some(v) => vec![v].into_iter(),
            }
        }
        let (mut values, mut companions) = (items(value), items(companion));
        loop {
            let (item, extra) = (values.next(), companions.next());
            if item.is_none() && extra.is_none() {
                return Ok(());
            }
            let present = |v: Option<Value>| v.filter(|v| !v.is_null());
            self.read_item(parent, element, present(item), present(extra), true)?;
        }
    }

    /// One occurrence of `element`: its value and its `_element` companion.
    fn read_item(
        &mut self,
        parent: NodeId,
        element: &'static model::ElementType,
        item: Option<Value>,
        extra: Option<Value>,
        many: bool,
    ) -> Result<(), Invalid> {
        if element.primitive {
            if matches!(item, Some(Value::Object(_) | Value::Array(_))) {
                return Err(Invalid(format!("'{}' must be a primitive", element.key)));
            }
            let node = self.push(Some(parent), element, None, item, many);
            if let Some(Value::Object(extra)) = extra {
                self.read_object(node, extra, element.ty)?;
            }
            return Ok(());
        }
        let Some(Value::Object(map)) = item else {
            return Err(Invalid(format!("'{}' must be an object", element.key)));
        };
        if element.ty == "Resource" {
            let ty = resource_type(&map, element.key)?;
            let node = self.push(Some(parent), element, Some(ty), None, many);
            self.read_object(node, map, ty)
        } else {
            let node = self.push(Some(parent), element, None, None, many);
            self.read_object(node, map, element.children)
        }
    }

    /// Adds children of `parent` from JSON (a substitution's replacement); the element must
    /// exist on the parent's type. Returns the new children.
    pub fn add_from_json(
        &mut self,
        parent: NodeId,
        key: &str,
        value: &Value,
    ) -> Result<Vec<NodeId>, Invalid> {
        let type_key = self.nodes[parent].children_key;
        let element = model::element(type_key, key)
            .ok_or_else(|| Invalid(format!("'{key}' is not an element of {type_key}")))?;
        let before = self.nodes[parent].children.len();
        self.read_element(parent, element, Some(value.clone()), None)?;
        Ok(self.nodes[parent].children[before..].to_vec())
    }

    /// Adds children like `add_from_json`, placed after the last child whose key is one of
    /// `after` (first when there is none), where R4's element order puts them.
    pub fn insert_json(
        &mut self,
        parent: NodeId,
        key: &str,
        value: &Value,
        after: &[&str],
    ) -> Vec<NodeId> {
        let added = self
            .add_from_json(parent, key, value)
            .expect("labels and meta fit every resource");
        let mut children = std::mem::take(&mut self.nodes[parent].children);
        children.truncate(children.len() - added.len());
        let at = children
            .iter()
            .rposition(|&c| !self.nodes[c].removed && after.contains(&self.nodes[c].key))
            .map_or(0, |i| i + 1);
        children.splice(at..at, added.iter().copied());
        self.nodes[parent].children = children;
        added
    }

    pub fn is_resource(&self, id: NodeId) -> bool {
        self.nodes[id].resource
    }

    pub fn is_primitive(&self, id: NodeId) -> bool {
        self.nodes[id].primitive
    }

    /// The live children of `id` as they are now (to walk while the tree changes).
    pub fn children_now(&self, id: NodeId) -> Children {
        self.children(id).collect()
    }

    /// The live children of `id`.
    pub fn children(&self, id: NodeId) -> impl Iterator<Item = NodeId> + '_ {
        self.nodes[id]
            .children
            .iter()
            .copied()
            .filter(|&c| !self.nodes[c].removed)
    }

    pub fn remove(&mut self, id: NodeId) {
        self.nodes[id].removed = true;
    }

    /// `Observation.component[1].valueQuantity.value`: where a node is, unique in its tree.
    pub fn location(&self, id: NodeId) -> String {
        let mut steps = Vec::new();
        let mut at = id;
        while let Some(parent) = self.nodes[at].parent {
            let node = &self.nodes[at];
            let index = self.nodes[parent]
                .children
                .iter()
                .filter(|&&c| self.nodes[c].key == node.key)
                .position(|&c| c == at)
                .unwrap_or(0);
            steps.push(format!("{}[{index}]", node.key));
            at = parent;
        }
        steps.push(self.nodes[at].ty.to_string());
        steps.reverse();
        steps.join(".")
    }

    /// The id element's value of a resource node.
    pub fn id_of(&self, resource: NodeId) -> Option<&str> {
        self.children(resource)
            .find(|&c| self.nodes[c].name == "id")
            .and_then(|c| self.nodes[c].value.as_ref())
            .and_then(Value::as_str)
    }

    /// Drops nodes left without a value and without children (what redaction emptied);
    /// resources stay. With `valid`, the result stays valid R4: an element R4 requires that
    /// was emptied keeps its place, holding only the `data-absent-reason` extension (`masked`),
    /// and an Extension left without its `url` goes whole.
    pub fn prune(&mut self, id: NodeId, valid: bool) -> bool {
        let children = self.children_now(id);
        let mut any = false;
        let mut emptied = Vec::new();
        for child in children {
            if self.prune(child, valid) {
                any = true;
            } else {
                self.remove(child);
                emptied.push(child);
            }
        }
        let kept = any || self.nodes[id].value.is_some() || self.is_resource(id);
        if valid && kept {
            if self.nodes[id].ty == "Extension"
                && !self.children(id).any(|c| self.nodes[c].name == "url")
            {
                return false;
            }
            // What stays keeps what R4 requires of it; what went entirely, its parent decides.
            for child in emptied {
                self.mask_if_required(id, child);
            }
        }
        kept
    }

    /// Puts an emptied `child` of `parent` back as absent data (`masked`) when R4 requires
    /// the element and no other item of it is left.
    fn mask_if_required(&mut self, parent: NodeId, child: NodeId) {
        let (name, key) = (self.nodes[child].name, self.nodes[child].key);
        let required =
            model::element(self.nodes[parent].children_key, key).is_some_and(|e| e.required);
        if !required || self.children(parent).any(|c| self.nodes[c].name == name) {
            return;
        }
        let dropped: Vec<NodeId> = self.nodes[child].children.clone();
        for c in dropped {
            self.remove(c);
        }
        let node = &mut self.nodes[child];
        node.removed = false;
        node.value = None;
        let absent = serde_json::json!([{"url": DATA_ABSENT_REASON, "valueCode": "masked"}]);
        self.add_from_json(child, "extension", &absent)
            .expect("every element may carry extensions");
    }

    /// The resource as JSON: members in the order they came in (`resourceType` first).
    pub fn write(&self) -> String {
        let mut out = String::with_capacity(1024);
        self.write_object(ROOT, &mut out);
        out
    }

    fn write_object(&self, id: NodeId, out: &mut String) {
        out.push('{');
        let mut first = true;
        if self.is_resource(id) {
            out.push_str("\"resourceType\":");
            push_json_string(out, self.nodes[id].ty);
            first = false;
        }
        // Children grouped by JSON key, in the order each key first appears.
        let children = self.children_now(id);
        let mut keys: smallvec::SmallVec<[&'static str; 16]> = smallvec::SmallVec::new();
        for &c in &children {
            if !keys.contains(&self.nodes[c].key) {
                keys.push(self.nodes[c].key);
            }
        }
        for key in keys {
            let group: Children = children
                .iter()
                .copied()
                .filter(|&c| self.nodes[c].key == key)
                .collect();
            let many = self.nodes[group[0]].many;
            if self.is_primitive(group[0]) {
                let has_values = group.iter().any(|&c| self.nodes[c].value.is_some());
                let has_extras = group.iter().any(|&c| self.children(c).next().is_some());
                if has_values {
                    self.write_key(key, &mut first, out);
                    self.write_list(&group, many, out, |tree, c, out| {
                        match &tree.nodes[c].value {
                            Some(v) => push_primitive(out, tree.nodes[c].ty, v),
                            None => out.push_str("null"),
                        }
                    });
                }
                if has_extras {
                    self.write_key(&format!("_{key}"), &mut first, out);
                    self.write_list(&group, many, out, |tree, c, out| {
                        if tree.children(c).next().is_some() {
                            tree.write_object(c, out)
                        } else {
                            out.push_str("null")
                        }
                    });
                }
            } else {
                self.write_key(key, &mut first, out);
                self.write_list(&group, many, out, |tree, c, out| tree.write_object(c, out));
            }
        }
        out.push('}');
    }

    fn write_key(&self, key: &str, first: &mut bool, out: &mut String) {
        if !*first {
            out.push(',');
        }
        *first = false;
        push_json_string(out, key);
        out.push(':');
    }

    fn write_list(
        &self,
        group: &[NodeId],
        many: bool,
        out: &mut String,
        item: impl Fn(&Tree, NodeId, &mut String),
    ) {
        if many {
            out.push('[');
        }
        for (i, &c) in group.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            item(self, c, out);
        }
        if many {
            out.push(']');
        }
    }
}

fn resource_type(map: &Map<String, Value>, what: &str) -> Result<&'static str, Invalid> {
    let name = map
        .get("resourceType")
        .and_then(Value::as_str)
        .ok_or_else(|| Invalid(format!("{what} has no resourceType")))?;
    RESOURCE_TYPES
        .binary_search(&name)
        .map(|i| RESOURCE_TYPES[i])
        .map_err(|_| Invalid(format!("'{name}' is not an R4 resource type")))
}

/// A primitive value as its type writes it: numbers and booleans bare (when they are ones),
/// everything else as a JSON string.
fn push_primitive(out: &mut String, ty: &str, value: &Value) {
    match value {
        Value::String(s) => push_primitive_text(out, ty, s),
        other => push_primitive_text(out, ty, &other.to_string()),
    }
}

/// A primitive's text as its type writes it (see `push_primitive`).
pub fn push_primitive_text(out: &mut String, ty: &str, text: &str) {
    let bare = match ty {
        "boolean" => text == "true" || text == "false",
        "integer" | "positiveInt" | "unsignedInt" | "decimal" => is_json_number(text),
        _ => false,
    };
    if bare {
        out.push_str(text);
    } else {
        push_json_string(out, text);
    }
}

fn is_json_number(text: &str) -> bool {
    matches!(serde_json::from_str::<Value>(text), Ok(Value::Number(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(json: &str) -> String {
        Tree::parse(json).unwrap().write()
    }

    #[test]
    fn writes_what_it_read() {
        for json in [
            r#"{"resourceType":"Patient","id":"p1","meta":{"versionId":"1"},"name":[{"family":"Doe","given":["A","B"]}],"birthDate":"1970-01-01","_birthDate":{"extension":[{"url":"u","valueDateTime":"1970-01-01T10:00:00Z"}]}}"#,
            r#"{"resourceType":"Observation","status":"final","code":{"text":"x"},"valueQuantity":{"value":1.50,"unit":"mg"},"component":[{"code":{"text":"y"},"valueInteger":3}]}"#,
            r#"{"resourceType":"Patient","name":[{"given":["A",null],"_given":[null,{"id":"g2"}]}],"active":true}"#,
            r#"{"resourceType":"Bundle","type":"collection","entry":[{"fullUrl":"urn:x","resource":{"resourceType":"Patient","id":"a"}}]}"#,
            r##"{"resourceType":"Patient","contained":[{"resourceType":"Organization","id":"o"}],"managingOrganization":{"reference":"#o"}}"##,
        ] {
            assert_eq!(round_trip(json), json);
        }
    }

    #[test]
    fn types_and_locations() {
        let tree = Tree::parse(
            r#"{"resourceType":"Observation","status":"final","code":{"text":"x"},"component":[{"code":{"text":"y"}},{"code":{"text":"z"},"valueQuantity":{"value":2}}]}"#,
        )
        .unwrap();
        let value = tree
            .nodes
            .iter()
            .position(|n| n.key == "valueQuantity")
            .unwrap();
        assert_eq!(
            (tree.nodes[value].name, tree.nodes[value].ty),
            ("value", "Quantity")
        );
        assert_eq!(
            tree.location(value),
            "Observation.component[1].valueQuantity[0]"
        );
    }

    #[test]
    fn unknown_elements_and_types_are_refused() {
        assert!(Tree::parse(r#"{"resourceType":"Patient","nickname":"x"}"#).is_err());
        assert!(Tree::parse(r#"{"resourceType":"Patientx"}"#).is_err());
        assert!(Tree::parse(r#"{"resourceType":"Patient","name":"x"}"#).is_err());
        assert!(Tree::parse(r#"{"resourceType":"Patient","birthDate":{"a":1}}"#).is_err());
    }
}
