//! Just enough JSON for rules, without an allocator: reading the top-level
//! fields of an object ([`Object`]) and writing small flat objects
//! ([`ObjectWriter`]).
//!
//! [`Object::parse`] checks the whole document first (strict RFC 8259: one
//! object, nothing but whitespace after it), so a rule can reject a bad
//! payload before it emits anything. Iterating then yields the top-level
//! fields in document order; nested objects and arrays are handed over as
//! raw text and their contents never show up as top-level fields. Nesting
//! deeper than [`MAX_DEPTH`] counts as invalid.

use core::fmt::{self, Write};

use crate::{Error, Text};

/// The deepest nesting [`Object::parse`] accepts.
pub const MAX_DEPTH: u32 = 128;

/// A validated JSON object, borrowed from the text it was parsed from.
#[derive(Clone, Copy, Debug)]
pub struct Object<'a> {
    text: &'a str,
}

/// A top-level value. Numbers are `f64` (integers beyond 2^53 lose
/// precision; numbers beyond the `f64` range become infinite).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value<'a> {
    Null,
    Bool(bool),
    Number(f64),
    String(Str<'a>),
    Object(Object<'a>),
    /// The array's raw JSON text, brackets included.
    Array(&'a str),
}

impl<'a> Value<'a> {
    /// The number, if this is one.
    pub fn as_number(&self) -> Option<f64> {
        match *self {
            Value::Number(n) => Some(n),
            _ => None,
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<Str<'a>> {
        match *self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The boolean, if this is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
}

impl<'a> Object<'a> {
    /// Parses `bytes` as exactly one JSON object, or `None` if it is not
    /// JSON, not an object, or followed by anything but whitespace.
    pub fn parse(bytes: &'a [u8]) -> Option<Object<'a>> {
        let text = core::str::from_utf8(bytes).ok()?;
        let mut s = Scanner::new(text);
        s.ws();
        if s.peek() != Some(b'{') {
            return None;
        }
        let start = s.pos;
        s.skip_value()?;
        let end = s.pos;
        s.ws();
        if s.pos != text.len() {
            return None;
        }
        Some(Object {
            text: &text[start..end],
        })
    }

    /// The object's JSON text, braces included.
    pub fn as_json(&self) -> &'a str {
        self.text
    }

    /// The top-level fields, in document order, as `(key, value)`.
    pub fn fields(&self) -> Fields<'a> {
        let mut s = Scanner::new(self.text);
        s.pos = 1; // past '{'
        Fields { s, first: true }
    }

    /// The value of `key`. When a key occurs more than once the last one
    /// wins, as in most JSON libraries.
    pub fn get(&self, key: &str) -> Option<Value<'a>> {
        self.fields()
            .filter(|(k, _)| *k == *key)
            .map(|(_, v)| v)
            .last()
    }

    /// The value of `key` if it is a number.
    pub fn number(&self, key: &str) -> Option<f64> {
        self.get(key)?.as_number()
    }

    /// The value of `key` if it is a string.
    pub fn str(&self, key: &str) -> Option<Str<'a>> {
        self.get(key)?.as_str()
    }

    /// The value of `key` if it is a boolean.
    pub fn bool(&self, key: &str) -> Option<bool> {
        self.get(key)?.as_bool()
    }
}

impl PartialEq for Object<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

/// Iterator over an object's top-level fields; see [`Object::fields`].
pub struct Fields<'a> {
    s: Scanner<'a>,
    first: bool,
}

impl<'a> Iterator for Fields<'a> {
    type Item = (Str<'a>, Value<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        // The text was validated by `Object::parse`; `?` only ends iteration.
        let s = &mut self.s;
        s.ws();
        if s.peek()? == b'}' {
            return None;
        }
        if !self.first {
            s.expect(b',')?;
            s.ws();
        }
        self.first = false;
        let key = s.string()?;
        s.ws();
        s.expect(b':')?;
        s.ws();
        let start = s.pos;
        let value = match s.peek()? {
            b'"' => Value::String(s.string()?),
            b'{' => {
                s.skip_value()?;
                Value::Object(Object {
                    text: &s.text[start..s.pos],
                })
            }
            b'[' => {
                s.skip_value()?;
                Value::Array(&s.text[start..s.pos])
            }
            b't' => {
                s.skip_value()?;
                Value::Bool(true)
            }
            b'f' => {
                s.skip_value()?;
                Value::Bool(false)
            }
            b'n' => {
                s.skip_value()?;
                Value::Null
            }
            _ => {
                s.number()?;
                Value::Number(s.text[start..s.pos].parse().ok()?)
            }
        };
        Some((key, value))
    }
}

/// A JSON string as it appears in the document (escapes not yet decoded).
/// Compare it with `==` against a `&str`, read it with [`chars`](Str::chars),
/// or copy it out with [`to_text`](Str::to_text).
#[derive(Clone, Copy, Debug)]
pub struct Str<'a> {
    raw: &'a str,
}

impl<'a> Str<'a> {
    /// The text between the quotes, escapes as written.
    pub fn raw(&self) -> &'a str {
        self.raw
    }

    /// The text itself when it has no escapes, so no decoding is needed.
    pub fn as_str(&self) -> Option<&'a str> {
        if self.raw.as_bytes().contains(&b'\\') {
            None
        } else {
            Some(self.raw)
        }
    }

    /// The decoded characters. An unpaired surrogate (`\ud800`) reads as
    /// U+FFFD.
    pub fn chars(&self) -> Chars<'a> {
        Chars { rest: self.raw }
    }

    /// The decoded text, copied into a [`Text`] (the JSON it came from may
    /// not outlive the call that received it).
    pub fn to_text<const N: usize>(&self) -> Result<Text<N>, Error> {
        let mut t = Text::new();
        match self.as_str() {
            Some(s) => {
                t.push_str(s)?;
            }
            None => {
                for c in self.chars() {
                    t.push(c)?;
                }
            }
        }
        Ok(t)
    }
}

impl PartialEq<str> for Str<'_> {
    fn eq(&self, other: &str) -> bool {
        match self.as_str() {
            Some(s) => s == other,
            None => self.chars().eq(other.chars()),
        }
    }
}

impl<'b> PartialEq<&'b str> for Str<'_> {
    fn eq(&self, other: &&'b str) -> bool {
        *self == **other
    }
}

impl PartialEq for Str<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.chars().eq(other.chars())
    }
}

impl fmt::Display for Str<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.chars() {
            f.write_char(c)?;
        }
        Ok(())
    }
}

/// The decoded characters of a [`Str`].
pub struct Chars<'a> {
    rest: &'a str,
}

impl Chars<'_> {
    fn hex4(&mut self) -> Option<u32> {
        let digits = self.rest.get(..4)?;
        let v = u32::from_str_radix(digits, 16).ok()?;
        self.rest = &self.rest[4..];
        Some(v)
    }
}

impl Iterator for Chars<'_> {
    type Item = char;

    fn next(&mut self) -> Option<char> {
        let c = self.rest.chars().next()?;
        self.rest = &self.rest[c.len_utf8()..];
        if c != '\\' {
            return Some(c);
        }
        let e = self.rest.chars().next()?;
        self.rest = &self.rest[e.len_utf8()..];
        Some(match e {
            'b' => '\u{8}',
            'f' => '\u{c}',
            'n' => '\n',
            'r' => '\r',
            't' => '\t',
            'u' => {
                let hi = self.hex4()?;
                if (0xD800..0xDC00).contains(&hi) && self.rest.starts_with("\\u") {
                    // A high surrogate: combine it with the low one after it.
                    let saved = self.rest;
                    self.rest = &self.rest[2..];
                    match self.hex4() {
                        Some(lo) if (0xDC00..0xE000).contains(&lo) => {
                            let c = 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00);
                            char::from_u32(c).unwrap_or('\u{FFFD}')
                        }
                        _ => {
                            self.rest = saved;
                            '\u{FFFD}'
                        }
                    }
                } else {
                    char::from_u32(hi).unwrap_or('\u{FFFD}')
                }
            }
            other => other, // '"', '\\', '/'
        })
    }
}

/// A strict, allocation-free JSON scanner over validated UTF-8.
#[derive(Clone)]
struct Scanner<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Scanner<'a> {
    fn new(text: &'a str) -> Self {
        Scanner { text, pos: 0 }
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn eat(&mut self, b: u8) -> bool {
        if self.peek() == Some(b) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, b: u8) -> Option<()> {
        if self.eat(b) {
            Some(())
        } else {
            None
        }
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
        self.pos - start
    }

    /// A string starting at the opening quote.
    fn string(&mut self) -> Option<Str<'a>> {
        self.expect(b'"')?;
        let start = self.pos;
        loop {
            match self.peek()? {
                b'"' => break,
                b'\\' => {
                    self.pos += 1;
                    match self.peek()? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.pos += 1,
                        b'u' => {
                            self.pos += 1;
                            for _ in 0..4 {
                                if !self.peek()?.is_ascii_hexdigit() {
                                    return None;
                                }
                                self.pos += 1;
                            }
                        }
                        _ => return None,
                    }
                }
                0..=0x1f => return None,
                _ => self.pos += 1,
            }
        }
        let raw = &self.text[start..self.pos];
        self.pos += 1;
        Some(Str { raw })
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`
    fn number(&mut self) -> Option<()> {
        self.eat(b'-');
        if self.eat(b'0') {
            if let Some(b'0'..=b'9') = self.peek() {
                return None;
            }
        } else if self.digits() == 0 {
            return None;
        }
        if self.eat(b'.') && self.digits() == 0 {
            return None;
        }
        if self.eat(b'e') || self.eat(b'E') {
            if !self.eat(b'+') {
                self.eat(b'-');
            }
            if self.digits() == 0 {
                return None;
            }
        }
        Some(())
    }

    fn literal(&mut self, word: &str) -> Option<()> {
        if self.text[self.pos..].starts_with(word) {
            self.pos += word.len();
            Some(())
        } else {
            None
        }
    }

    /// Checks and steps over one value, however deeply nested, without
    /// recursion: one bit per open container records whether it is an array.
    fn skip_value(&mut self) -> Option<()> {
        let mut arrays: u128 = 0;
        let mut depth: u32 = 0;
        loop {
            // A value starts here.
            self.ws();
            match self.peek()? {
                open @ (b'{' | b'[') => {
                    if depth == MAX_DEPTH {
                        return None;
                    }
                    self.pos += 1;
                    self.ws();
                    let is_array = open == b'[';
                    if !self.eat(if is_array { b']' } else { b'}' }) {
                        arrays = (arrays << 1) | u128::from(is_array);
                        depth += 1;
                        if !is_array {
                            self.member_key()?;
                        }
                        continue;
                    }
                }
                b'"' => {
                    self.string()?;
                }
                b't' => self.literal("true")?,
                b'f' => self.literal("false")?,
                b'n' => self.literal("null")?,
                _ => self.number()?,
            }
            // A value ended: close the containers it completes.
            loop {
                if depth == 0 {
                    return Some(());
                }
                self.ws();
                let in_array = arrays & 1 == 1;
                if self.eat(b',') {
                    if !in_array {
                        self.ws();
                        self.member_key()?;
                    }
                    break;
                }
                self.expect(if in_array { b']' } else { b'}' })?;
                arrays >>= 1;
                depth -= 1;
            }
        }
    }

    /// `"key" :` inside an object.
    fn member_key(&mut self) -> Option<()> {
        self.string()?;
        self.ws();
        self.expect(b':')
    }
}

/// Builds a flat JSON object in a fixed-size buffer of `N` bytes.
///
/// Field methods can be chained; overflow is remembered and reported once,
/// by [`finish`](ObjectWriter::finish):
///
/// ```
/// # use sluice_rule::json::ObjectWriter;
/// let doc = ObjectWriter::<64>::new().string("metric", "t").number("value", 31.5).finish();
/// assert_eq!(doc.unwrap(), r#"{"metric":"t","value":31.5}"#);
/// ```
///
/// Numbers are written so that they parse back to the same `f64` (Rust's
/// shortest round-trip form, in exponent notation outside 1e-5..1e16). JSON
/// has no NaN or infinity: those are written as `null`.
#[derive(Clone)]
pub struct ObjectWriter<const N: usize> {
    out: Text<N>,
    empty: bool,
    overflow: bool,
}

impl<const N: usize> ObjectWriter<N> {
    /// An empty object.
    pub fn new() -> Self {
        let mut out = Text::new();
        let overflow = out.push_str("{").is_err();
        ObjectWriter {
            out,
            empty: true,
            overflow,
        }
    }

    /// A string field; the value is escaped as needed.
    pub fn string(&mut self, key: &str, value: &str) -> &mut Self {
        self.field(key, |out| write_string(out, value))
    }

    /// A number field.
    pub fn number(&mut self, key: &str, value: f64) -> &mut Self {
        self.field(key, |out| write_number(out, value))
    }

    /// An integer field, written exactly.
    pub fn integer(&mut self, key: &str, value: i64) -> &mut Self {
        self.field(key, |out| write!(out, "{}", value))
    }

    /// A boolean field.
    pub fn bool(&mut self, key: &str, value: bool) -> &mut Self {
        self.field(key, |out| {
            out.write_str(if value { "true" } else { "false" })
        })
    }

    /// A `null` field.
    pub fn null(&mut self, key: &str) -> &mut Self {
        self.field(key, |out| out.write_str("null"))
    }

    /// A field whose value is JSON text written elsewhere (another
    /// `ObjectWriter`'s result, say). It is inserted as is, not checked.
    pub fn raw(&mut self, key: &str, json: &str) -> &mut Self {
        self.field(key, |out| out.write_str(json))
    }

    /// The finished document, or [`Error::Capacity`] if anything did not fit
    /// in `N` bytes. The writer is left as it was, so more fields may follow.
    pub fn finish(&self) -> Result<Text<N>, Error> {
        let mut doc = self.out.clone();
        if self.overflow {
            return Err(Error::Capacity);
        }
        doc.push_str("}")?;
        Ok(doc)
    }

    fn field(&mut self, key: &str, value: impl FnOnce(&mut Text<N>) -> fmt::Result) -> &mut Self {
        if self.overflow {
            return self;
        }
        let out = &mut self.out;
        let separator = if self.empty { "" } else { "," };
        let written = out
            .write_str(separator)
            .and_then(|_| write_string(out, key))
            .and_then(|_| out.write_str(":"))
            .and_then(|_| value(out));
        self.empty = false;
        self.overflow = written.is_err();
        self
    }
}

impl<const N: usize> Default for ObjectWriter<N> {
    fn default() -> Self {
        Self::new()
    }
}

/// Writes `s` as a JSON string literal, quotes included.
pub fn write_string(out: &mut impl Write, s: &str) -> fmt::Result {
    out.write_char('"')?;
    let mut plain = 0; // start of the run of characters that need no escape
    for (i, b) in s.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        out.write_str(&s[plain..i])?;
        if escape.is_empty() {
            write!(out, "\\u{:04x}", b)?;
        } else {
            out.write_str(escape)?;
        }
        plain = i + 1;
    }
    out.write_str(&s[plain..])?;
    out.write_char('"')
}

/// Writes `v` as a JSON number that parses back to the same `f64`
/// (`null` for NaN and infinities, which JSON cannot express).
pub fn write_number(out: &mut impl Write, v: f64) -> fmt::Result {
    if !v.is_finite() {
        return out.write_str("null");
    }
    // `f64::abs` is not in core before Rust 1.85.
    let magnitude = if v < 0.0 { -v } else { v };
    if magnitude != 0.0 && !(1e-5..1e16).contains(&magnitude) {
        write!(out, "{:e}", v)
    } else {
        write!(out, "{}", v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(json: &str) -> std::vec::Vec<std::string::String> {
        use std::string::ToString;
        Object::parse(json.as_bytes())
            .expect("an object")
            .fields()
            .map(|(k, _)| k.to_text::<64>().unwrap().to_string())
            .collect()
    }

    #[test]
    fn top_level_fields_in_order_skipping_nested_ones() {
        let json = r#" {"temperature":-5e1,"nested":{"temperature":99,"list":[1,{"a":"}"}]},"s":"x\"}y","t":true,"n":null,"arr":[[],[{}]]} "#;
        assert_eq!(keys(json), ["temperature", "nested", "s", "t", "n", "arr"]);
        let o = Object::parse(json.as_bytes()).unwrap();
        assert_eq!(o.number("temperature"), Some(-50.0));
        assert_eq!(o.str("s").unwrap().to_text::<8>().unwrap(), "x\"}y");
        assert_eq!(o.bool("t"), Some(true));
        assert_eq!(o.get("n"), Some(Value::Null));
        assert_eq!(o.get("arr"), Some(Value::Array("[[],[{}]]")));
        let nested = match o.get("nested") {
            Some(Value::Object(n)) => n,
            other => panic!("{:?}", other),
        };
        assert_eq!(nested.number("temperature"), Some(99.0));
    }

    #[test]
    fn escaped_quotes_do_not_end_strings() {
        let json = r#"{"label":"a \"quoted\" temperature: 99","temperature":30.25}"#;
        assert_eq!(keys(json), ["label", "temperature"]);
        assert_eq!(
            Object::parse(json.as_bytes())
                .unwrap()
                .number("temperature"),
            Some(30.25)
        );
        let json = r#"{"a\\":"\\","b":1}"#;
        assert_eq!(keys(json), ["a\\", "b"]);
    }

    #[test]
    fn keys_compare_after_unescaping() {
        let o = Object::parse(br#"{"temp\u0065rature":1,"\ud83d\ude00":2,"x":3,"x":4}"#).unwrap();
        assert_eq!(o.number("temperature"), Some(1.0));
        assert_eq!(o.number("\u{1F600}"), Some(2.0));
        assert_eq!(o.number("x"), Some(4.0), "the last duplicate wins");
        assert_eq!(o.number("missing"), None);
        let lone = Object::parse(br#"{"\ud800x":1}"#).unwrap();
        assert_eq!(lone.fields().next().unwrap().0, "\u{FFFD}x");
    }

    #[test]
    fn rejects_what_is_not_one_object() {
        for bad in [
            "",
            "not json",
            "[1,2]",
            "1",
            "\"s\"",
            "{",
            "{}x",
            "{} {}",
            "{\"a\"}",
            "{\"a\":}",
            "{\"a\":1,}",
            "{,}",
            "{\"a\":01}",
            "{\"a\":1.}",
            "{\"a\":.5}",
            "{\"a\":-}",
            "{\"a\":1e}",
            "{\"a\":+1}",
            "{\"a\":tru}",
            "{\"a\":\"\\x\"}",
            "{\"a\":\"\\u12\"}",
            "{\"a\":\"tab\there\"}",
            "{\"a\":[1,]}",
            "{\"a\":[1 2]}",
            "{\"a\":{\"b\":1]}",
            "{\"a\":[}",
            "{'a':1}",
            "{a:1}",
            "{\"a\":NaN}",
        ] {
            assert!(
                Object::parse(bad.as_bytes()).is_none(),
                "accepted {:?}",
                bad
            );
        }
        assert!(Object::parse(b"{\"a\":\"\xff\"}").is_none(), "not UTF-8");
    }

    #[test]
    fn accepts_valid_objects() {
        for good in [
            "{}",
            " \n{ } \t",
            "{\"a\":0}",
            "{\"a\":-0.5e+3}",
            "{\"a\":1E-2}",
            "{\"a\":[]}",
            "{\"a\":{}}",
            "{\"a\":\"\\/\\b\\f\\n\\r\\t\\u00e9\"}",
            "{\"é\":\"ü\"}",
        ] {
            assert!(
                Object::parse(good.as_bytes()).is_some(),
                "refused {:?}",
                good
            );
        }
    }

    #[test]
    fn nesting_is_bounded_without_recursion() {
        let deep = |n: usize| {
            let mut s = std::string::String::from("{\"a\":");
            s.push_str(&"[".repeat(n));
            s.push_str(&"]".repeat(n));
            s.push('}');
            s
        };
        assert!(Object::parse(deep(MAX_DEPTH as usize - 1).as_bytes()).is_some());
        assert!(Object::parse(deep(MAX_DEPTH as usize).as_bytes()).is_none());
        assert!(Object::parse(deep(100_000).as_bytes()).is_none());
    }

    #[test]
    fn writer_builds_and_escapes() {
        let doc = ObjectWriter::<128>::new()
            .string("metric", "a\"b\\c\nd\u{1}é")
            .number("value", 31.5)
            .integer("n", -7)
            .bool("ok", true)
            .null("none")
            .raw("inner", "{\"x\":1}")
            .finish()
            .unwrap();
        assert_eq!(
            doc,
            r#"{"metric":"a\"b\\c\nd\u0001é","value":31.5,"n":-7,"ok":true,"none":null,"inner":{"x":1}}"#
        );
        assert!(Object::parse(doc.as_bytes()).is_some());
        assert_eq!(ObjectWriter::<8>::new().finish().unwrap(), "{}");
    }

    #[test]
    fn writer_reports_overflow() {
        let mut w = ObjectWriter::<16>::new();
        w.string("metric", "temperature");
        assert_eq!(w.finish().err(), Some(Error::Capacity));
        // Exactly full still works.
        let mut w = ObjectWriter::<7>::new();
        w.integer("a", 1);
        assert_eq!(w.finish().unwrap(), "{\"a\":1}");
    }

    #[test]
    fn numbers_round_trip() {
        for v in [
            0.0,
            -0.0,
            1.0,
            30.0,
            31.5,
            -50.0,
            0.1,
            1.0 / 3.0,
            6.02214076e23,
            1e300,
            -2.5e-300,
            5e-324,
            1e-5,
            9.99e-6,
            1e16,
            123456789012345680.0,
            f64::MAX,
            f64::MIN_POSITIVE,
        ] {
            let mut t = Text::<64>::new();
            write_number(&mut t, v).unwrap();
            let json = crate::text!("{{\"v\":{}}}", t)
                .map(|t: Text<80>| t)
                .unwrap();
            let back = Object::parse(json.as_bytes()).unwrap().number("v").unwrap();
            assert_eq!(back.to_bits(), v.to_bits(), "{} -> {}", v, t);
        }
        let mut t = Text::<8>::new();
        write_number(&mut t, f64::NAN).unwrap();
        assert_eq!(t, "null");
    }
}
