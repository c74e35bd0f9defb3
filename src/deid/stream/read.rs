//! Reading JSON for the single pass: bytes scanned in place, strings borrowed from the line
//! (unescaped only where they have escapes), anything unusual a `Fallback`.

use std::borrow::Cow;

use super::{Fallback, Pass, Step};
use crate::fhir::r4::RESOURCE_TYPES;

/// A scalar as it came in.
pub enum Scalar<'a> {
    /// A string's content; `escaped` when it has escapes.
    Str {
        raw: &'a str,
        escaped: bool,
    },
    Number(&'a str),
    Bool(bool),
}

impl<'a> Pass<'a> {
    pub(super) fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.input.get(self.at) {
            self.at += 1;
        }
    }

    pub(super) fn peek(&mut self) -> Step<u8> {
        self.ws();
        self.input.get(self.at).copied().ok_or(Fallback)
    }

    pub(super) fn expect(&mut self, byte: u8) -> Step<()> {
        if self.peek()? != byte {
            return Err(Fallback);
        }
        self.at += 1;
        Ok(())
    }

    /// A string after its opening quote: its raw content.
    pub(super) fn string(&mut self) -> Step<(&'a str, bool)> {
        let start = self.at;
        let mut escaped = false;
        loop {
            let rest = self.input.get(self.at..).ok_or(Fallback)?;
            self.at += memchr::memchr2(b'"', b'\\', rest).ok_or(Fallback)?;
            if self.input[self.at] == b'"' {
                break;
            }
            escaped = true;
            self.at += 2;
        }
        if self.input[start..self.at].iter().any(|&b| b < 0x20) {
            return Err(Fallback);
        }
        let raw = self.line.get(start..self.at).ok_or(Fallback)?;
        self.at += 1;
        Ok((raw, escaped))
    }

    /// A key and its colon.
    pub(super) fn key(&mut self) -> Step<&'a str> {
        self.expect(b'"')?;
        let (key, escaped) = self.string()?;
        if escaped {
            return Err(Fallback);
        }
        self.expect(b':')?;
        Ok(key)
    }

    pub(super) fn scalar(&mut self) -> Step<Scalar<'a>> {
        let first = self.peek()?;
        let literal = |pass: &mut Self, word: &[u8]| {
            let found = pass.input[pass.at..].starts_with(word);
            pass.at += word.len();
            if found { Ok(()) } else { Err(Fallback) }
        };
        match first {
            b'"' => {
                self.at += 1;
                let (raw, escaped) = self.string()?;
                Ok(Scalar::Str { raw, escaped })
            }
            b't' => literal(self, b"true").map(|_| Scalar::Bool(true)),
            b'f' => literal(self, b"false").map(|_| Scalar::Bool(false)),
            b'-' | b'0'..=b'9' => self.number().map(Scalar::Number),
            _ => Err(Fallback), // null, objects and arrays where a primitive belongs
        }
    }

    /// A JSON number: `-?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?`.
    pub(super) fn number(&mut self) -> Step<&'a str> {
        let start = self.at;
        let digits = |pass: &mut Self| {
            let from = pass.at;
            while pass.input.get(pass.at).is_some_and(u8::is_ascii_digit) {
                pass.at += 1;
            }
            if pass.at > from {
                Ok(())
            } else {
                Err(Fallback)
            }
        };
        if self.input[self.at] == b'-' {
            self.at += 1;
        }
        if self.input.get(self.at) == Some(&b'0') {
            self.at += 1;
        } else {
            digits(self)?;
        }
        if self.input.get(self.at) == Some(&b'.') {
            self.at += 1;
            digits(self)?;
        }
        if let Some(b'e' | b'E') = self.input.get(self.at) {
            self.at += 1;
            if let Some(b'+' | b'-') = self.input.get(self.at) {
                self.at += 1;
            }
            digits(self)?;
        }
        Ok(&self.line[start..self.at])
    }

    /// After a resource's `{`: its `resourceType`, which must come first.
    pub(super) fn resource_type(&mut self) -> Step<&'static str> {
        if self.key()? != "resourceType" {
            return Err(Fallback);
        }
        self.expect(b'"')?;
        let (name, escaped) = self.string()?;
        let i = RESOURCE_TYPES.binary_search(&name).map_err(|_| Fallback)?;
        if escaped {
            return Err(Fallback);
        }
        Ok(RESOURCE_TYPES[i])
    }
}

pub fn unescape(raw: &str, escaped: bool) -> Step<Cow<'_, str>> {
    if !escaped {
        return Ok(Cow::Borrowed(raw));
    }
    serde_json::from_str(&format!("\"{raw}\""))
        .map(Cow::Owned)
        .map_err(|_| Fallback)
}
