//! JSON read an object member at a time, the values left as the text they came as: how bulk
//! writes (`load` lines, transaction Bundles) get at a few elements of a large document
//! without building a tree of all of it.

use std::borrow::Cow;

use serde::de::{Deserialize, Deserializer, Error, MapAccess, Visitor};
use serde_json::value::RawValue;

/// An object's members as (name, raw JSON), in order. A few dozen at most, so a list searched
/// by name beats a hashed map. A repeated name is refused.
pub struct Members<'a>(pub Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'a> Members<'a> {
    /// Parses `text`, which must be one JSON object (its values are checked to be JSON too).
    pub fn parse(text: &'a str) -> serde_json::Result<Members<'a>> {
        serde_json::from_str(text)
    }

    pub fn get(&self, name: &str) -> Option<&'a RawValue> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
    }
}

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields: Vec<(Cow<'de, str>, &'de RawValue)> = Vec::with_capacity(16);
                while let Some(Name(name)) = map.next_key()? {
                    if fields.iter().any(|(k, _)| *k == name) {
                        return Err(A::Error::custom(format!("repeated element {name}")));
                    }
                    fields.push((name, map.next_value()?));
                }
                Ok(Members(fields))
            }
        }
        deserializer.deserialize_map(Fields)
    }
}

/// A member name: borrowed from the text unless it holds escapes.
pub struct Name<'a>(pub Cow<'a, str>);

impl<'de> Deserialize<'de> for Name<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Text;
        impl<'de> Visitor<'de> for Text {
            type Value = Name<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E: Error>(self, name: &'de str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Borrowed(name)))
            }
            fn visit_str<E: Error>(self, name: &str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Owned(name.to_string())))
            }
        }
        deserializer.deserialize_str(Text)
    }
}

/// A JSON string's value, borrowed from the text unless it holds escapes; `None` if the text
/// is not a string.
pub fn string(raw: &RawValue) -> Option<Cow<'_, str>> {
    #[derive(serde::Deserialize)]
    struct Text<'a>(#[serde(borrow)] Cow<'a, str>);
    serde_json::from_str::<Text>(raw.get()).ok().map(|t| t.0)
}

/// Valid JSON text without the whitespace between its tokens (strings are left as they are):
/// stored resources are one line each, however the client laid them out.
pub fn compact(text: &str) -> Cow<'_, str> {
    let bytes = text.as_bytes();
    let mut out: Vec<u8> = Vec::new();
    // `bytes[kept..i]` is still to be copied once whitespace turns up.
    let (mut i, mut kept) = (0, 0);
    while i < bytes.len() {
        match bytes[i] {
            b'"' => i = string_end(bytes, i + 1),
            b' ' | b'\t' | b'\n' | b'\r' => {
                if out.is_empty() {
                    out.reserve(bytes.len());
                }
                out.extend_from_slice(&bytes[kept..i]);
                while i < bytes.len() && matches!(bytes[i], b' ' | b'\t' | b'\n' | b'\r') {
                    i += 1;
                }
                kept = i;
            }
            _ => i += 1,
        }
    }
    if kept == 0 {
        return Cow::Borrowed(text);
    }
    out.extend_from_slice(&bytes[kept..]);
    Cow::Owned(String::from_utf8(out).expect("only ASCII whitespace was taken out"))
}

/// The index after the closing quote of the string whose text starts at `from`.
fn string_end(bytes: &[u8], mut from: usize) -> usize {
    while from < bytes.len() {
        let Some(at) = memchr::memchr2(b'"', b'\\', &bytes[from..]) else {
            break;
        };
        if bytes[from + at] == b'"' {
            return from + at + 1;
        }
        from += at + 2; // an escape: skip the escaped character
    }
    bytes.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_keep_their_text_and_order() {
        let members = Members::parse(r#" {"b": [1, 2], "a\u0041": {"x": "y"}} "#).unwrap();
        let names: Vec<&str> = members.0.iter().map(|(k, _)| k.as_ref()).collect();
        assert_eq!(names, ["b", "aA"]);
        assert_eq!(members.get("b").unwrap().get(), "[1, 2]");
        assert_eq!(members.get("aA").unwrap().get(), r#"{"x": "y"}"#);
        assert!(members.get("c").is_none());
    }

    #[test]
    fn members_refuse_repeats_and_what_is_not_an_object() {
        for text in [r#"{"a":1,"a":2}"#, "[1]", "\"a\"", "{", r#"{"a":}"#] {
            assert!(Members::parse(text).is_err(), "{text}");
        }
    }

    #[test]
    fn strings_are_read_with_or_without_escapes() {
        let raw = |t: &str| RawValue::from_string(t.to_string()).unwrap();
        assert_eq!(string(&raw(r#""plain""#)).unwrap(), "plain");
        assert_eq!(string(&raw(r#""a\"b\u00e9""#)).unwrap(), "a\"bé");
        assert!(string(&raw("12")).is_none());
    }

    #[test]
    fn compact_takes_out_whitespace_between_tokens_only() {
        let text = "{ \"a\" :\n\t[1 , \"x y\\\" z\" ],\r\n \"b\": \"\\\\\" }";
        let compacted = compact(text);
        assert_eq!(compacted, r#"{"a":[1,"x y\" z"],"b":"\\"}"#);
        let reparsed: serde_json::Value = serde_json::from_str(&compacted).unwrap();
        assert_eq!(
            reparsed,
            serde_json::from_str::<serde_json::Value>(text).unwrap()
        );
        assert!(matches!(compact(r#"{"a":"b c"}"#), Cow::Borrowed(_)));
        assert_eq!(compact(" [ \"\\\\\" , \"\\\" \" ] "), r#"["\\","\" "]"#);
        // Not JSON (never handed in, as values are parsed first), but no panic either.
        assert_eq!(compact("\"a\\"), "\"a\\");
    }
}
