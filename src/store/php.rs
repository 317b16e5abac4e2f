//! PHP's `serialize()` format, for the values WordPress keeps in `usermeta`: WP Fusion's tag
//! list (`a:2:{i:0;s:3:"VIP";i:1;s:6:"Member";}`), the role map in `{prefix}capabilities`
//! (`a:1:{s:10:"subscriber";b:1;}`), and meta strings that WordPress serialized once more
//! because they looked serialized themselves (`maybe_serialize`).
//!
//! Small and strict: null, booleans, integers, strings and arrays (integer and string keys,
//! nested up to [`MAX_DEPTH`]). String lengths are in **bytes**, as PHP counts them. Anything
//! else (floats, objects, references, trailing bytes, a wrong length) is an [`UnserializeError`]
//! that says where and what could not be read; nothing is guessed.

use std::fmt;

/// Arrays nest at most this deep (WordPress's own values nest one or two levels).
pub const MAX_DEPTH: usize = 32;

/// A PHP value of the kinds WordPress's user meta holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    /// PHP strings are bytes; WordPress's tables are UTF-8, so these are too.
    Str(String),
    /// An ordered map, as PHP arrays are: keys in insertion order.
    Array(Vec<(Key, Value)>),
}

/// An array key: PHP normalises keys to integers or strings.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    Int(i64),
    Str(String),
}

impl Value {
    /// A PHP list (`array('a', 'b')`): keys 0, 1, 2 …
    pub fn list<I, S>(items: I) -> Value
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Value::Array(
            items
                .into_iter()
                .zip(0i64..)
                .map(|(s, i)| (Key::Int(i), Value::Str(s.into())))
                .collect(),
        )
    }

    /// `serialize($value)`.
    pub fn serialize(&self) -> String {
        let mut out = String::new();
        self.write(&mut out);
        out
    }

    fn write(&self, out: &mut String) {
        use std::fmt::Write;
        // `write!` into a String cannot fail.
        match self {
            Value::Null => out.push_str("N;"),
            Value::Bool(b) => out.push_str(if *b { "b:1;" } else { "b:0;" }),
            Value::Int(i) => {
                let _ = write!(out, "i:{i};");
            }
            Value::Str(s) => write_str(out, s),
            Value::Array(items) => {
                let _ = write!(out, "a:{}:{{", items.len());
                for (key, value) in items {
                    match key {
                        Key::Int(i) => {
                            let _ = write!(out, "i:{i};");
                        }
                        Key::Str(s) => write_str(out, s),
                    }
                    value.write(out);
                }
                out.push('}');
            }
        }
    }
}

fn write_str(out: &mut String, s: &str) {
    use std::fmt::Write;
    let _ = write!(out, "s:{}:\"{s}\";", s.len());
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Int(i) => write!(f, "{i}"),
            Key::Str(s) => write!(f, "{s:?}"),
        }
    }
}

/// Why [`unserialize`] could not read a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a PHP serialized value: at byte {at}, expected {expected}, found {found}")]
pub struct UnserializeError {
    /// Byte offset of the problem.
    pub at: usize,
    /// What the reader wanted there.
    pub expected: &'static str,
    /// What was there (a short excerpt, or "the end").
    pub found: String,
}

/// `unserialize($text)`, strictly: the whole text must be one value.
pub fn unserialize(text: &str) -> Result<Value, UnserializeError> {
    let mut reader = Reader {
        bytes: text.as_bytes(),
        text,
        pos: 0,
    };
    let value = reader.value(0)?;
    if reader.pos != reader.bytes.len() {
        return Err(reader.error("the end of the value"));
    }
    Ok(value)
}

/// WordPress's `is_serialized($data, $strict)`: whether a stored string would be read back as
/// serialized. `maybe_serialize` asks non-strictly, `maybe_unserialize` strictly.
pub fn is_serialized(data: &str, strict: bool) -> bool {
    let data = data.trim_matches(|c: char| matches!(c, ' ' | '\t' | '\n' | '\r' | '\0' | '\x0B'));
    if data == "N;" {
        return true;
    }
    let b = data.as_bytes();
    if b.len() < 4 || b[1] != b':' {
        return false;
    }
    if strict {
        if !matches!(b[b.len() - 1], b';' | b'}') {
            return false;
        }
    } else {
        let semicolon = data.find(';');
        let brace = data.find('}');
        if semicolon.is_none() && brace.is_none() {
            return false;
        }
        if semicolon.is_some_and(|i| i < 3) || brace.is_some_and(|i| i < 4) {
            return false;
        }
    }
    let digits_then = |rest: &[u8], end: u8| {
        let n = rest.iter().take_while(|c| c.is_ascii_digit()).count();
        n > 0 && rest.get(n) == Some(&end)
    };
    match b[0] {
        b's' if strict && b[b.len() - 2] != b'"' => false,
        b's' if !strict && !data.contains('"') => false,
        b's' | b'a' | b'O' | b'E' => digits_then(&b[2..], b':'),
        b'b' | b'i' | b'd' => {
            let rest = &b[2..];
            let n = rest
                .iter()
                .take_while(|c| c.is_ascii_digit() || matches!(c, b'.' | b'E' | b'+' | b'-'))
                .count();
            n > 0 && rest.get(n) == Some(&b';') && (!strict || n + 3 == b.len())
        }
        _ => false,
    }
}

/// What WordPress stores for the string `value` (`maybe_serialize`): the string itself, or,
/// when it looks serialized, its serialization, so that reading it back gives the string.
pub fn store_string(value: &str) -> String {
    if is_serialized(value, false) {
        Value::Str(value.to_owned()).serialize()
    } else {
        value.to_owned()
    }
}

/// What WordPress reads from a stored meta string (`maybe_unserialize`): a serialized value
/// unserialized, any other text as it is. A value that looks serialized but cannot be read is
/// an error (WordPress would read `false` and lose it).
pub fn read_stored(stored: &str) -> Result<Value, UnserializeError> {
    if is_serialized(stored, true) {
        unserialize(stored.trim())
    } else {
        Ok(Value::Str(stored.to_owned()))
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    text: &'a str,
    pos: usize,
}

impl Reader<'_> {
    fn error(&self, expected: &'static str) -> UnserializeError {
        let found = if self.pos >= self.bytes.len() {
            "the end".to_owned()
        } else {
            // Up to 16 bytes, cut at a character boundary.
            let mut end = (self.pos + 16).min(self.bytes.len());
            while !self.text.is_char_boundary(end) {
                end -= 1;
            }
            let start = if self.text.is_char_boundary(self.pos) {
                self.pos
            } else {
                end
            };
            format!("{:?}", &self.text[start..end])
        };
        UnserializeError {
            at: self.pos,
            expected,
            found,
        }
    }

    fn eat(&mut self, byte: u8, expected: &'static str) -> Result<(), UnserializeError> {
        if self.bytes.get(self.pos) == Some(&byte) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.error(expected))
        }
    }

    /// An integer as PHP writes it: optional `-`, digits, then `end`.
    fn int(&mut self, end: u8, expected: &'static str) -> Result<i64, UnserializeError> {
        let start = self.pos;
        if self.bytes.get(self.pos) == Some(&b'-') {
            self.pos += 1;
        }
        let digits = self.bytes[self.pos..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        self.pos += digits;
        let parsed = (digits > 0)
            .then(|| self.text[start..self.pos].parse::<i64>().ok())
            .flatten();
        match parsed {
            Some(n) => {
                self.eat(end, expected)?;
                Ok(n)
            }
            None => {
                self.pos = start;
                Err(self.error(expected))
            }
        }
    }

    /// A string's length: digits then `:` (never negative).
    fn len(&mut self) -> Result<usize, UnserializeError> {
        let start = self.pos;
        let n = self.int(b':', "a length then ':'")?;
        usize::try_from(n).map_err(|_| {
            self.pos = start;
            self.error("a length that is not negative")
        })
    }

    /// After `s:`: `LEN:"BYTES";`.
    fn string_body(&mut self) -> Result<String, UnserializeError> {
        let len = self.len()?;
        self.eat(b'"', "'\"' opening the string")?;
        let start = self.pos;
        let end = start
            .checked_add(len)
            .filter(|end| *end + 2 <= self.bytes.len() && &self.bytes[*end..*end + 2] == b"\";");
        let Some(end) = end else {
            return Err(self.error("as many bytes as the length says, then '\";'"));
        };
        if !self.text.is_char_boundary(end) {
            return Err(self.error("a string that ends at a whole UTF-8 character"));
        }
        self.pos = end + 2;
        Ok(self.text[start..end].to_owned())
    }

    fn value(&mut self, depth: usize) -> Result<Value, UnserializeError> {
        let Some(&tag) = self.bytes.get(self.pos) else {
            return Err(self.error("a value"));
        };
        if tag == b'N' {
            self.pos += 1;
            self.eat(b';', "';' after N")?;
            return Ok(Value::Null);
        }
        if !matches!(tag, b'b' | b'i' | b's' | b'a') || self.bytes.get(self.pos + 1) != Some(&b':')
        {
            return Err(self.error("a null, boolean, integer, string or array (N b i s a)"));
        }
        self.pos += 2;
        match tag {
            b'b' => match self.bytes.get(self.pos) {
                Some(c @ (b'0' | b'1')) => {
                    let b = *c == b'1';
                    self.pos += 1;
                    self.eat(b';', "';' after the boolean")?;
                    Ok(Value::Bool(b))
                }
                _ => Err(self.error("0 or 1")),
            },
            b'i' => Ok(Value::Int(self.int(b';', "an integer then ';'")?)),
            b's' => Ok(Value::Str(self.string_body()?)),
            _ => self.array_body(depth),
        }
    }

    /// After `a:`: `N:{KEY VALUE …}`.
    fn array_body(&mut self, depth: usize) -> Result<Value, UnserializeError> {
        if depth >= MAX_DEPTH {
            return Err(self.error("arrays nested at most 32 deep"));
        }
        let count = self.len()?;
        self.eat(b'{', "'{' opening the array")?;
        // Each element takes at least 4 bytes (`i:0;N;`): a count beyond that is a lie, and
        // must not reserve memory.
        let mut items = Vec::with_capacity(count.min((self.bytes.len() - self.pos) / 4));
        for _ in 0..count {
            let key = match (self.bytes.get(self.pos), self.bytes.get(self.pos + 1)) {
                (Some(b'i'), Some(b':')) => {
                    self.pos += 2;
                    Key::Int(self.int(b';', "an integer key then ';'")?)
                }
                (Some(b's'), Some(b':')) => {
                    self.pos += 2;
                    Key::Str(self.string_body()?)
                }
                _ => return Err(self.error("an array key (i:N; or s:N:\"…\";)")),
            };
            let value = self.value(depth + 1)?;
            items.push((key, value));
        }
        self.eat(
            b'}',
            "'}' closing the array (as many elements as its count)",
        )?;
        Ok(Value::Array(items))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn writes_what_php_writes() {
        assert_eq!(
            Value::list(["VIP", "Member Gold"]).serialize(),
            r#"a:2:{i:0;s:3:"VIP";i:1;s:11:"Member Gold";}"#
        );
        let caps = Value::Array(vec![(Key::Str("subscriber".into()), Value::Bool(true))]);
        assert_eq!(caps.serialize(), r#"a:1:{s:10:"subscriber";b:1;}"#);
        assert_eq!(Value::list(Vec::<String>::new()).serialize(), "a:0:{}");
        assert_eq!(Value::Null.serialize(), "N;");
        assert_eq!(Value::Int(-42).serialize(), "i:-42;");
        assert_eq!(Value::Bool(false).serialize(), "b:0;");
        // Byte lengths: "é" is 2 bytes, "日本" 6.
        assert_eq!(Value::Str("é".into()).serialize(), r#"s:2:"é";"#);
        assert_eq!(Value::Str("日本".into()).serialize(), r#"s:6:"日本";"#);
        assert_eq!(Value::Str("a\"b;".into()).serialize(), r#"s:4:"a"b;";"#);
    }

    #[test]
    fn reads_nested_arrays_with_both_key_kinds() {
        let text = r#"a:3:{i:0;s:1:"a";s:1:"k";a:1:{i:5;b:0;}i:-1;N;}"#;
        let v = unserialize(text).unwrap();
        assert_eq!(
            v,
            Value::Array(vec![
                (Key::Int(0), Value::Str("a".into())),
                (
                    Key::Str("k".into()),
                    Value::Array(vec![(Key::Int(5), Value::Bool(false))])
                ),
                (Key::Int(-1), Value::Null),
            ])
        );
        assert_eq!(v.serialize(), text);
        // A string holding quotes and semicolons is read by its length, not by its quotes.
        assert_eq!(
            unserialize(r#"s:5:"a";b"";"#).unwrap(),
            Value::Str(r#"a";b""#.into())
        );
    }

    #[test]
    fn errors_say_where_and_what() {
        let cases = [
            ("", 0, "a value"),
            ("x:1;", 0, "a null, boolean"),
            ("d:1.5;", 0, "a null, boolean"),
            (r#"O:8:"stdClass":0:{}"#, 0, "a null, boolean"),
            ("b:2;", 2, "0 or 1"),
            ("i:;", 2, "an integer"),
            ("i:99999999999999999999;", 2, "an integer"),
            (r#"s:4:"abc";"#, 5, "as many bytes"),
            (r#"s:-1:"";"#, 2, "not negative"),
            (r#"a:2:{i:0;s:1:"a";}"#, 17, "an array key"),
            (r#"a:1:{i:0;s:1:"a";i:1;N;}"#, 17, "'}' closing"),
            (r#"a:1:{b:1;N;}"#, 5, "an array key"),
            ("i:1;x", 4, "the end of the value"),
            ("N;;", 2, "the end of the value"),
            ("a:999999999999:{", 16, "an array key"),
        ];
        for (text, at, expected) in cases {
            let e = unserialize(text).unwrap_err();
            assert_eq!(e.at, at, "{text:?}: {e}");
            assert!(e.expected.contains(expected), "{text:?}: {e}");
        }
        let e = unserialize("b:7;").unwrap_err();
        assert_eq!(
            e.to_string(),
            "not a PHP serialized value: at byte 2, expected 0 or 1, found \"7;\""
        );
        let deep = "a:1:{i:0;".repeat(40) + "N;" + &"}".repeat(40);
        assert!(unserialize(&deep).unwrap_err().expected.contains("nested"));
    }

    #[test]
    fn is_serialized_matches_wordpress() {
        for yes in [
            "N;",
            "b:1;",
            "i:12;",
            "d:0.5;",
            r#"s:1:"a";"#,
            "a:0:{}",
            r#"O:1:"X":0:{}"#,
            "  a:0:{}\n",
        ] {
            assert!(is_serialized(yes, true), "{yes:?}");
            assert!(is_serialized(yes, false), "{yes:?}");
        }
        for no in ["", "hello", "a:b", "i:1", "x:1;", "s:1:a;", "b:;", "i:1;2"] {
            assert!(!is_serialized(no, true), "{no:?}");
        }
        // Non-strict (maybe_serialize) also takes a prefix that merely looks serialized.
        assert!(is_serialized("i:1;2", false));
        assert!(is_serialized("a:1:{;x", false) && !is_serialized("a:1:{;x", true));
        assert!(!is_serialized("a:1:{ x", false));
    }

    #[test]
    fn strings_that_look_serialized_are_stored_serialized_once_more() {
        assert_eq!(store_string("plain"), "plain");
        assert_eq!(store_string("a:0:{}"), r#"s:6:"a:0:{}";"#);
        assert_eq!(
            read_stored(&store_string("a:0:{}")).unwrap(),
            Value::Str("a:0:{}".into())
        );
        assert_eq!(read_stored("plain").unwrap(), Value::Str("plain".into()));
        assert_eq!(read_stored("i:7;").unwrap(), Value::Int(7));
        assert!(read_stored(r#"s:9:"short";"#).is_err());
    }

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::Int),
            any::<String>().prop_map(Value::Str),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            let key = prop_oneof![
                any::<i64>().prop_map(Key::Int),
                any::<String>().prop_map(Key::Str)
            ];
            prop::collection::vec((key, inner), 0..8).prop_map(Value::Array)
        })
    }

    proptest! {
        #[test]
        fn round_trips(v in value()) {
            let text = v.serialize();
            prop_assert_eq!(unserialize(&text).unwrap(), v);
        }

        #[test]
        fn never_panics_on_garbage(text in ".{0,64}") {
            let _ = unserialize(&text);
            let _ = is_serialized(&text, true);
            let _ = is_serialized(&text, false);
        }

        #[test]
        fn stored_strings_read_back_as_themselves(s in any::<String>()) {
            prop_assert_eq!(read_stored(&store_string(&s)).unwrap(), Value::Str(s));
        }
    }
}
