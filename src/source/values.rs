//! Text-format column values to JSON, the way the CRM's API types show them.
//!
//! What must hold: uuid → string; timestamptz → RFC 3339 UTC keeping its fractional seconds
//! whatever the session's TimeZone; timestamp → RFC 3339 without offset; date → `YYYY-MM-DD`;
//! integers and numerics → numbers (NaN/Infinity → strings, JSON has no such numbers);
//! arrays → JSON arrays (quoting, escapes, NULL elements, nesting); json/jsonb → embedded as
//! is; everything else → a JSON string. Output is always valid JSON.

use chrono::{NaiveDateTime, TimeDelta};

/// How a column type maps to JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// `boolean`.
    Bool,
    /// Integer types (`int2`, `int4`, `int8`, `oid`).
    Integer,
    /// `float4`, `float8`.
    Float,
    /// `numeric`.
    Numeric,
    /// `json`, `jsonb`: embedded as they are.
    Json,
    /// `timestamptz`.
    TimestampTz,
    /// `timestamp` without time zone.
    Timestamp,
    /// Anything rendered as a JSON string (text, uuid, date, enums, …).
    Text,
    /// An array of `elem`, elements separated by `delim` in the text form.
    Array {
        /// Element kind.
        elem: Box<Kind>,
        /// Element delimiter (`,` except for `box`).
        delim: u8,
    },
}

/// The kind of a built-in type OID, or `None` when the catalog must be asked.
pub fn builtin_kind(oid: u32) -> Option<Kind> {
    let arr = |k: Kind| Kind::Array { elem: Box::new(k), delim: b',' };
    Some(match oid {
        16 => Kind::Bool,
        20 | 21 | 23 | 26 => Kind::Integer,
        700 | 701 => Kind::Float,
        1700 => Kind::Numeric,
        114 | 3802 => Kind::Json,
        1184 => Kind::TimestampTz,
        1114 => Kind::Timestamp,
        // text, varchar, bpchar, name, char, uuid, date, time, timetz, interval, bytea, inet,
        // cidr, macaddr, money, xml, bit, varbit
        25 | 1043 | 1042 | 19 | 18 | 2950 | 1082 | 1083 | 1266 | 1186 | 17 | 869 | 650 | 829 | 790 | 142 | 1560
        | 1562 => Kind::Text,
        1000 => arr(Kind::Bool),
        1005 | 1007 | 1016 | 1028 => arr(Kind::Integer),
        1021 | 1022 => arr(Kind::Float),
        1231 => arr(Kind::Numeric),
        199 | 3807 => arr(Kind::Json),
        1185 => arr(Kind::TimestampTz),
        1115 => arr(Kind::Timestamp),
        1009 | 1015 | 1014 | 1003 | 1002 | 2951 | 1182 | 1183 | 1270 | 1187 | 1001 | 1041 | 651 | 1040 | 791 => {
            arr(Kind::Text)
        }
        _ => return None,
    })
}

/// Kind for a catalog entry: `category` is `pg_type.typcategory`, `elem` the element's kind
/// for arrays.
pub fn catalog_kind(category: u8, base: Option<Kind>, elem: Option<Kind>, delim: u8) -> Kind {
    match (category, base, elem) {
        (_, Some(base), _) => base,
        (b'A', _, Some(elem)) => Kind::Array { elem: Box::new(elem), delim },
        (b'B', _, _) => Kind::Bool,
        _ => Kind::Text,
    }
}

/// Appends the JSON form of a text-format value.
pub fn write_value(out: &mut Vec<u8>, kind: &Kind, text: &[u8]) {
    match kind {
        Kind::Bool => out.extend_from_slice(if text == b"t" { b"true" } else { b"false" }),
        Kind::Integer | Kind::Float | Kind::Numeric => {
            if is_json_number(text) {
                out.extend_from_slice(text);
            } else {
                write_string(out, text); // NaN, Infinity, -Infinity
            }
        }
        Kind::Json => out.extend_from_slice(text),
        Kind::TimestampTz => write_timestamptz(out, text),
        Kind::Timestamp => write_timestamp(out, text),
        Kind::Text => write_string(out, text),
        Kind::Array { elem, delim } => write_array(out, elem, *delim, text),
    }
}

/// Appends `s` as a JSON string literal.
pub fn write_string(out: &mut Vec<u8>, s: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let mut start = 0;
    for (i, &b) in s.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&s[start..i]);
        if esc.is_empty() {
            out.extend_from_slice(&[b'\\', b'u', b'0', b'0', HEX[(b >> 4) as usize], HEX[(b & 15) as usize]]);
        } else {
            out.extend_from_slice(esc);
        }
        start = i + 1;
    }
    out.extend_from_slice(&s[start..]);
    out.push(b'"');
}

/// Whether `t` is a JSON number as Postgres prints numbers (`-12`, `3.50`, `1e+100`).
fn is_json_number(t: &[u8]) -> bool {
    let digits = t.strip_prefix(b"-").unwrap_or(t);
    !digits.is_empty()
        && digits[0].is_ascii_digit()
        && digits.iter().all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'))
        && !(digits.len() > 1 && digits[0] == b'0' && digits[1].is_ascii_digit())
}

/// `2025-06-15 14:30:00.5+00` → `"2025-06-15T14:30:00.5Z"`; other offsets are converted.
fn write_timestamptz(out: &mut Vec<u8>, t: &[u8]) {
    let Ok(s) = std::str::from_utf8(t) else {
        return write_string(out, t);
    };
    // The offset starts at the last '+'/'-' after the time's first ':'.
    let converted = s.find(':').and_then(|colon| {
        let off_at = colon + s[colon..].rfind(['+', '-'])?;
        let (local, offset) = s.split_at(off_at);
        if s.ends_with(" BC") || !local.contains(' ') {
            return None;
        }
        if offset == "+00" {
            return Some(format!("{}Z", local.replacen(' ', "T", 1)));
        }
        let secs = parse_offset(offset)?;
        let naive = NaiveDateTime::parse_from_str(local, "%Y-%m-%d %H:%M:%S%.f").ok()?;
        let utc = naive.checked_sub_signed(TimeDelta::seconds(secs))?;
        let frac_digits = local.rfind('.').map(|p| local.len() - p - 1).unwrap_or(0);
        let mut text = utc.format("%Y-%m-%dT%H:%M:%S").to_string();
        if frac_digits > 0 {
            let nanos = format!("{:09}", utc.and_utc().timestamp_subsec_nanos());
            text.push('.');
            text.push_str(&nanos[..frac_digits.min(9)]);
        }
        text.push('Z');
        Some(text)
    });
    match converted {
        Some(c) => write_string(out, c.as_bytes()),
        None => write_string(out, t), // infinity, -infinity, BC dates: as Postgres says
    }
}

/// `+05:30` / `-08` / `+05:45:30` → seconds east of UTC.
fn parse_offset(o: &str) -> Option<i64> {
    let sign = if o.starts_with('-') { -1 } else { 1 };
    let mut parts = o[1..].split(':').map(|p| p.parse::<i64>().ok());
    let h = parts.next()??;
    let m = parts.next().unwrap_or(Some(0))?;
    let s = parts.next().unwrap_or(Some(0))?;
    Some(sign * (h * 3600 + m * 60 + s))
}

/// `2025-06-15 14:30:00` → `"2025-06-15T14:30:00"`.
fn write_timestamp(out: &mut Vec<u8>, t: &[u8]) {
    if t.len() > 10 && t[10] == b' ' && !t.ends_with(b" BC") {
        let mut v = t.to_vec();
        v[10] = b'T';
        write_string(out, &v);
    } else {
        write_string(out, t);
    }
}

/// Writes a Postgres array literal (`{a,"b c",NULL,{1,2}}`, maybe `[0:1]={…}`) as JSON.
fn write_array(out: &mut Vec<u8>, elem: &Kind, delim: u8, t: &[u8]) {
    let body = match t.iter().position(|&b| b == b'=') {
        Some(eq) if t.first() == Some(&b'[') => &t[eq + 1..],
        _ => t,
    };
    let mut p = ArrayParser { s: body, i: 0, delim, buf: Vec::new() };
    let start = out.len();
    if p.s.first() != Some(&b'{') || !p.array(out, elem) {
        // Not an array literal after all: keep the text rather than emit broken JSON.
        out.truncate(start);
        write_string(out, t);
    }
}

struct ArrayParser<'a> {
    s: &'a [u8],
    i: usize,
    delim: u8,
    buf: Vec<u8>,
}

impl ArrayParser<'_> {
    /// Parses `{…}` at the cursor; false on malformed input.
    fn array(&mut self, out: &mut Vec<u8>, elem: &Kind) -> bool {
        self.i += 1; // '{'
        out.push(b'[');
        if self.peek() == Some(b'}') {
            self.i += 1;
            out.push(b']');
            return true;
        }
        loop {
            match self.peek() {
                Some(b'{') => {
                    if !self.array(out, elem) {
                        return false;
                    }
                }
                Some(b'"') => {
                    self.i += 1;
                    self.buf.clear();
                    loop {
                        match self.peek() {
                            Some(b'\\') => {
                                self.i += 1;
                                match self.peek() {
                                    Some(c) => self.buf.push(c),
                                    None => return false,
                                }
                            }
                            Some(b'"') => break,
                            Some(c) => self.buf.push(c),
                            None => return false,
                        }
                        self.i += 1;
                    }
                    self.i += 1; // closing quote
                    let v = std::mem::take(&mut self.buf);
                    write_value(out, elem, &v);
                    self.buf = v;
                }
                Some(_) => {
                    let start = self.i;
                    while let Some(c) = self.peek() {
                        if c == self.delim || c == b'}' {
                            break;
                        }
                        self.i += 1;
                    }
                    let tok = &self.s[start..self.i];
                    if tok.eq_ignore_ascii_case(b"NULL") {
                        out.extend_from_slice(b"null");
                    } else {
                        write_value(out, elem, tok);
                    }
                }
                None => return false,
            }
            match self.peek() {
                Some(b'}') => {
                    self.i += 1;
                    out.push(b']');
                    return true;
                }
                Some(c) if c == self.delim => {
                    self.i += 1;
                    out.push(b',');
                }
                _ => return false,
            }
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(kind: &Kind, text: &str) -> String {
        let mut out = Vec::new();
        write_value(&mut out, kind, text.as_bytes());
        let s = String::from_utf8(out).unwrap();
        serde_json::from_str::<serde_json::Value>(&s).unwrap_or_else(|e| panic!("{s}: {e}"));
        s
    }

    #[test]
    fn scalars() {
        assert_eq!(json(&Kind::Bool, "t"), "true");
        assert_eq!(json(&Kind::Integer, "-42"), "-42");
        assert_eq!(json(&Kind::Numeric, "1234.5600"), "1234.5600");
        assert_eq!(json(&Kind::Numeric, "NaN"), "\"NaN\"");
        assert_eq!(json(&Kind::Float, "-Infinity"), "\"-Infinity\"");
        assert_eq!(json(&Kind::Float, "1e+100"), "1e+100");
        assert_eq!(json(&Kind::Text, "a\"b\\c\n\u{1}é"), "\"a\\\"b\\\\c\\n\\u0001é\"");
        assert_eq!(json(&Kind::Json, "{\"a\": [1, 2]}"), "{\"a\": [1, 2]}");
    }

    #[test]
    fn timestamps() {
        assert_eq!(json(&Kind::TimestampTz, "2025-06-15 14:30:00.123+00"), "\"2025-06-15T14:30:00.123Z\"");
        assert_eq!(json(&Kind::TimestampTz, "2025-06-15 14:30:00+00"), "\"2025-06-15T14:30:00Z\"");
        assert_eq!(json(&Kind::TimestampTz, "2025-06-15 20:00:00.5+05:30"), "\"2025-06-15T14:30:00.5Z\"");
        assert_eq!(json(&Kind::TimestampTz, "2025-01-01 00:10:00-08"), "\"2025-01-01T08:10:00Z\"");
        assert_eq!(json(&Kind::TimestampTz, "infinity"), "\"infinity\"");
        assert_eq!(json(&Kind::Timestamp, "2025-06-15 14:30:00.000001"), "\"2025-06-15T14:30:00.000001\"");
    }

    #[test]
    fn arrays() {
        let text = Kind::Array { elem: Box::new(Kind::Text), delim: b',' };
        assert_eq!(json(&text, "{}"), "[]");
        assert_eq!(
            json(&text, r#"{vip,"has space","quo\"te","back\\slash",NULL,"NULL"}"#),
            r#"["vip","has space","quo\"te","back\\slash",null,"NULL"]"#
        );
        let ints = Kind::Array { elem: Box::new(Kind::Integer), delim: b',' };
        assert_eq!(json(&ints, "{{1,2},{3,NULL}}"), "[[1,2],[3,null]]");
        assert_eq!(json(&ints, "[0:1]={7,8}"), "[7,8]");
        let jsons = Kind::Array { elem: Box::new(Kind::Json), delim: b',' };
        assert_eq!(json(&jsons, r#"{"{\"a\": 1}","[2]"}"#), r#"[{"a": 1},[2]]"#);
        let tstz = Kind::Array { elem: Box::new(Kind::TimestampTz), delim: b',' };
        assert_eq!(json(&tstz, r#"{"2025-06-15 14:30:00+00"}"#), r#"["2025-06-15T14:30:00Z"]"#);
        assert_eq!(json(&text, "{broken"), "\"{broken\"");
    }
}
