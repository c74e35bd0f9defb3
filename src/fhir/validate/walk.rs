//! The checks as one pass over JSON text (serde visitors, no tree of the resource): each
//! member is looked up in the R4 type tables as it is read, strings are checked where they lie
//! in the text, and nothing is allocated but a key with escapes in it. A resource inside a
//! resource is read as raw members first, since its `resourceType` may come last.

use std::borrow::Cow;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::{
    Checker, Path,
    formats::{self, Scalar},
};
use crate::fhir::{
    model::{self, ElementType},
    raw_json::{Members, Name},
};

/// How serde_json (with `arbitrary_precision`) hands a number to a visitor: a map of one
/// member under this key, whose value is the number's text.
const NUMBER_TOKEN: &str = "$serde_json::private::Number";

impl Checker {
    /// Checks the text of member `key` of an object of `type_key` at `path`.
    pub(super) fn member_text(&mut self, type_key: &str, path: &Path, key: &str, text: &str) {
        let elements = model::elements_of(type_key).unwrap_or_default();
        self.member_text_of(elements, type_key, path, key, text);
    }

    /// `member_text` with the type's elements looked up already.
    fn member_text_of(
        &mut self,
        elements: &'static [ElementType],
        type_key: &str,
        path: &Path,
        key: &str,
        text: &str,
    ) -> Option<&'static ElementType> {
        let mut reader = serde_json::Deserializer::from_str(text);
        let found = self.element_of(elements, type_key, path, key);
        let read = match found {
            Some((element, companion)) => {
                let child = Path::Key(path, key);
                ValueSeed::whole(self, element, companion, &child).deserialize(&mut reader)
            }
            None => de::Deserialize::deserialize(&mut reader).map(|IgnoredAny| ()),
        };
        if let Err(e) = read.and_then(|()| reader.end()) {
            self.problem(&Path::Key(path, key), format!("not JSON: {e}"));
        }
        found.and_then(|(element, companion)| (!companion).then_some(element))
    }

    /// Checks the text of a whole resource of `resource_type`.
    pub(super) fn resource_text(&mut self, resource_type: &str, text: &str) {
        let root = Path::Root(resource_type);
        match Members::parse(text) {
            Ok(members) => self.members_raw(resource_type, &root, &members.0),
            Err(e) => self.problem(&root, format!("a resource must be a JSON object: {e}")),
        }
    }

    /// The element under `key` among `elements` (those of `type_key`) and whether it is a `_`
    /// companion, or a problem.
    fn element_of(
        &mut self,
        elements: &'static [ElementType],
        type_key: &str,
        path: &Path,
        key: &str,
    ) -> Option<(&'static ElementType, bool)> {
        let (name, companion) = match key.strip_prefix('_') {
            Some(name) => (name, true),
            None => (key, false),
        };
        let Some(element) = model::find(elements, name) else {
            self.problem(
                &Path::Key(path, key),
                format!("'{key}' is not an element of {type_key}"),
            );
            return None;
        };
        if companion && !element.primitive {
            self.problem(
                &Path::Key(path, key),
                format!("'{key}': only primitive elements have a '_' companion"),
            );
            return None;
        }
        Some((element, companion))
    }

    /// A resource's members, read as raw text: checked one by one as of its type.
    fn members_raw(&mut self, resource_type: &str, path: &Path, members: &[(Cow<str>, &RawValue)]) {
        if members.len() <= 1 {
            return self.problem(
                path,
                "an object must have content (FHIR JSON has no empty objects)",
            );
        }
        let elements = model::elements_of(resource_type).unwrap_or_default();
        let mut choices = Choices::default();
        for (key, raw) in members {
            if key == "resourceType" {
                continue;
            }
            if let Some(element) =
                self.member_text_of(elements, resource_type, path, key, raw.get())
            {
                choices.note(self, element, path, key);
            }
        }
    }
}

/// The choice elements (`value[x]`) an object gave so far: each may have one type only.
#[derive(Default)]
struct Choices(Vec<&'static str>);

impl Choices {
    /// `element` (under `key`) was given.
    fn note(
        &mut self,
        checker: &mut Checker,
        element: &'static ElementType,
        path: &Path,
        key: &str,
    ) {
        if element.key != element.name {
            if self.0.contains(&element.name) {
                let message = format!("only one type of {}[x] may be given", element.name);
                checker.problem(&Path::Key(path, key), message);
            }
            self.0.push(element.name);
        }
    }
}

/// A number's text, read as whether it is a whole number that fits an i64.
struct NumberSeed;

impl<'de> DeserializeSeed<'de> for NumberSeed {
    type Value = Option<i64>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for NumberSeed {
    type Value = Option<i64>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a number")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.parse().ok())
    }
}

/// What a value is read as: an element's whole value (an array if it repeats), or one item.
#[derive(Clone, Copy)]
enum Shape {
    Whole,
    Item { null_ok: bool },
}

/// Reads and checks one value of `element`.
struct ValueSeed<'c, 'p> {
    checker: &'c mut Checker,
    element: &'static ElementType,
    /// The value of a `_` companion (id and extensions of a primitive).
    companion: bool,
    shape: Shape,
    path: &'p Path<'p>,
}

impl<'c, 'p> ValueSeed<'c, 'p> {
    fn whole(
        checker: &'c mut Checker,
        element: &'static ElementType,
        companion: bool,
        path: &'p Path<'p>,
    ) -> Self {
        ValueSeed {
            checker,
            element,
            companion,
            shape: Shape::Whole,
            path,
        }
    }

    /// The value as one item: a single value of a repeating element is taken as a one-item
    /// array (noted, so that the caller stores it as one).
    fn into_item(mut self) -> Self {
        if matches!(self.shape, Shape::Whole) {
            self.checker.wrapped |= self.element.many;
            self.shape = Shape::Item { null_ok: false };
        }
        self
    }

    /// A scalar (or `null`) in the place of an item.
    fn scalar(self, value: Scalar) {
        let seed = self.into_item();
        let (checker, element, path) = (seed.checker, seed.element, seed.path);
        match (value, seed.shape) {
            (Scalar::Null, Shape::Item { null_ok: true }) => {}
            (Scalar::Null, _) => checker.problem(path, "null is not a value"),
            (_, _) if seed.companion => {
                checker.problem(path, "a '_' companion must be an object (id, extension)")
            }
            (value, _) if element.primitive => {
                if let Err(why) = formats::primitive(element.ty, &value) {
                    checker.problem(path, why);
                }
            }
            (value, _) => checker.problem(
                path,
                format!(
                    "must be an object ({}), not {}",
                    element.ty,
                    formats::kind(&value)
                ),
            ),
        }
    }
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a FHIR JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.scalar(Scalar::Null);
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.scalar(Scalar::Bool);
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.scalar(Scalar::Number(Some(v)));
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.scalar(Scalar::Number(i64::try_from(v).ok()));
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.scalar(Scalar::Number(None));
        Ok(())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.scalar(Scalar::Str(v));
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if !matches!(self.shape, Shape::Whole) || !self.element.many {
            let message = match self.shape {
                Shape::Whole => "this element does not repeat: give one value, not an array",
                Shape::Item { .. } => "an item of an array cannot be an array",
            };
            self.checker.problem(self.path, message);
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(());
        }
        // Primitive arrays may hold null where only the companion has a value.
        let null_ok = self.element.primitive;
        let mut index = 0;
        loop {
            let item = Path::Index(self.path, index);
            let seed = ValueSeed {
                checker: &mut *self.checker,
                element: self.element,
                companion: self.companion,
                shape: Shape::Item { null_ok },
                path: &item,
            };
            if seq.next_element_seed(seed)?.is_none() {
                break;
            }
            index += 1;
        }
        if index == 0 {
            self.checker.problem(
                self.path,
                "an array must have items (FHIR JSON has no empty arrays)",
            );
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some(first) = map.next_key::<Name>()?.map(|name| name.0) else {
            let seed = self.into_item();
            seed.checker.problem(
                seed.path,
                "an object must have content (FHIR JSON has no empty objects)",
            );
            return Ok(());
        };
        if first == NUMBER_TOKEN {
            let number = map.next_value_seed(NumberSeed)?;
            self.scalar(Scalar::Number(number));
            return Ok(());
        }
        let seed = self.into_item();
        let (checker, element, path) = (seed.checker, seed.element, seed.path);
        if seed.companion {
            return checker.members(&mut map, "Element", path, first);
        }
        if element.primitive {
            let message = format!(
                "a {} must be a JSON {}, not an object",
                element.ty,
                json_type(element.ty)
            );
            checker.problem(path, message);
            return drain(&mut map);
        }
        if element.ty == "Resource" {
            return checker.contained(&mut map, path, first);
        }
        checker.members(&mut map, element.children, path, first)
    }
}

/// The JSON type a primitive is written as.
fn json_type(ty: &str) -> &'static str {
    match ty {
        "boolean" => "boolean",
        "integer" | "positiveInt" | "unsignedInt" | "decimal" => "number",
        _ => "string",
    }
}

fn drain<'de, A: MapAccess<'de>>(map: &mut A) -> Result<(), A::Error> {
    map.next_value::<IgnoredAny>()?;
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

impl Checker {
    /// The members of an object of `type_key`, the first name already read.
    fn members<'de, A: MapAccess<'de>>(
        &mut self,
        map: &mut A,
        type_key: &str,
        path: &Path,
        first: Cow<'de, str>,
    ) -> Result<(), A::Error> {
        let elements = model::elements_of(type_key).unwrap_or_default();
        let mut choices = Choices::default();
        let mut key = Some(first);
        while let Some(name) = key {
            match self.element_of(elements, type_key, path, &name) {
                Some((element, companion)) => {
                    let child = Path::Key(path, &name);
                    map.next_value_seed(ValueSeed::whole(self, element, companion, &child))?;
                    if !companion {
                        choices.note(self, element, path, &name);
                    }
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            key = map.next_key::<Name>()?.map(|name| name.0);
        }
        Ok(())
    }

    /// A resource inside a resource (contained, a Bundle entry, a Parameters value): its
    /// members read as raw text, then checked as of its `resourceType`.
    fn contained<'de, A: MapAccess<'de>>(
        &mut self,
        map: &mut A,
        path: &Path,
        first: Cow<'de, str>,
    ) -> Result<(), A::Error> {
        let mut members: Vec<(Cow<'de, str>, &'de RawValue)> = Vec::new();
        let mut key = Some(first);
        while let Some(name) = key {
            members.push((name, map.next_value()?));
            key = map.next_key::<Name>()?.map(|name| name.0);
        }
        let resource_type = members
            .iter()
            .find(|(k, _)| k == "resourceType")
            .and_then(|(_, raw)| serde_json::from_str::<String>(raw.get()).ok());
        match resource_type {
            Some(t) if crate::fhir::is_resource_type(&t) => self.members_raw(&t, path, &members),
            Some(t) => self.problem(path, format!("'{t}' is not an R4 resource type")),
            None => self.problem(path, "a resource needs a resourceType"),
        }
        Ok(())
    }
}
