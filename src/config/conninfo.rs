//! Showing a PostgreSQL connection string without its password, in both forms libpq and
//! tokio-postgres accept: `postgres[ql]://user:password@hosts/db?password=…&…` and
//! `key=value key = 'quoted \' value' …`.
//!
//! What must hold: the rendering is split the way the connection parser splits it (so a
//! quoted password with spaces, a `?password=` parameter or `password = x` with spaces are
//! all found), and the result is checked against the parsed connection config: if the
//! rendering still parses to a password other than the placeholder, the whole string is
//! withheld instead.

/// What replaces a password.
pub const PLACEHOLDER: &str = "REDACTED";
/// Shown when the connection string cannot be rendered safely.
const WITHHELD: &str = "<connection string withheld: it could not be shown without its password>";

/// `conn` with every password replaced by [`PLACEHOLDER`].
pub fn redact(conn: &str) -> String {
    let shown = match ["postgres://", "postgresql://"].iter().find(|p| conn.starts_with(*p)) {
        Some(prefix) => redact_url(prefix, &conn[prefix.len()..]),
        None => redact_key_values(conn).unwrap_or_else(|| WITHHELD.to_owned()),
    };
    let original_has_password =
        conn.parse::<tokio_postgres::Config>().map(|c| c.get_password().is_some()).unwrap_or(true);
    let safe = match shown.parse::<tokio_postgres::Config>() {
        Ok(c) => c.get_password().is_none_or(|p| p == PLACEHOLDER.as_bytes()),
        // An unparsable original renders unparsable; safe only if it had no password to hide.
        Err(_) => !original_has_password && !conn.contains("password"),
    };
    if safe {
        shown
    } else {
        WITHHELD.to_owned()
    }
}

/// The URL form, split as tokio-postgres splits it: credentials up to the first `@`, the
/// user up to the first `:` in them; parameters after the first `?`, split on `&` and `=`.
fn redact_url(prefix: &str, rest: &str) -> String {
    let mut out = prefix.to_owned();
    let after = match rest.find('@') {
        Some(at) => {
            let creds = &rest[..at];
            match creds.split_once(':') {
                Some((user, _)) => out.push_str(&format!("{user}:{PLACEHOLDER}@")),
                None => out.push_str(&format!("{creds}@")),
            }
            &rest[at + 1..]
        }
        None => rest,
    };
    let (main, params) = match after.split_once('?') {
        Some((main, params)) => (main, Some(params)),
        None => (after, None),
    };
    out.push_str(main);
    if let Some(params) = params {
        let shown: Vec<String> = params
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if percent_decode(k) == b"password" => {
                    format!("{k}={PLACEHOLDER}")
                }
                _ => kv.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&shown.join("&"));
    }
    out
}

/// `%xx` escapes decoded, as the URL parser decodes parameter names.
fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (b[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// The key/value form, tokenised as tokio-postgres does: keyword up to whitespace or `=`,
/// optional whitespace around `=`, then a `'quoted'` or bare value with `\` escapes. Values
/// other than the password are shown as written. `None` when it does not tokenise.
fn redact_key_values(conn: &str) -> Option<String> {
    let chars: Vec<(usize, char)> = conn.char_indices().collect();
    let at = |i: usize| chars.get(i).map(|&(_, c)| c);
    let byte = |i: usize| chars.get(i).map_or(conn.len(), |&(b, _)| b);
    let mut i = 0;
    let mut pairs = Vec::new();
    loop {
        while at(i).is_some_and(char::is_whitespace) {
            i += 1;
        }
        if at(i).is_none() {
            return Some(pairs.join(" "));
        }
        let key_start = i;
        while at(i).is_some_and(|c| !c.is_whitespace() && c != '=') {
            i += 1;
        }
        let key = &conn[byte(key_start)..byte(i)];
        while at(i).is_some_and(char::is_whitespace) {
            i += 1;
        }
        if at(i) != Some('=') {
            return None;
        }
        i += 1;
        while at(i).is_some_and(char::is_whitespace) {
            i += 1;
        }
        let value_start = i;
        if at(i) == Some('\'') {
            i += 1;
            loop {
                match at(i)? {
                    '\\' => i += 2,
                    '\'' => break,
                    _ => i += 1,
                }
            }
            i += 1;
        } else {
            while let Some(c) = at(i).filter(|c| !c.is_whitespace()) {
                i += if c == '\\' { 2 } else { 1 };
            }
        }
        let value = &conn[byte(value_start)..byte(i.min(chars.len()))];
        pairs.push(if key == "password" { format!("{key}={PLACEHOLDER}") } else { format!("{key}={value}") });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_loses_its_password_and_keeps_the_rest() {
        for (conn, secret, kept) in [
            ("postgres://u:hunter2@h/db", "hunter2", "postgres://u:REDACTED@h/db"),
            ("postgres://u@h/db?password=hunter2&sslmode=require", "hunter2", "?password=REDACTED&sslmode=require"),
            ("postgres://u@h/db?pass%77ord=hunter2", "hunter2", "pass%77ord=REDACTED"),
            ("postgresql://u:p%40ss@h1:5432,h2:5433/db", "ss", "h1:5432,h2:5433/db"),
            ("postgres://u:pw/with@h/db", "with", "u:REDACTED@h/db"),
            ("host=h password=hunter2 dbname=db", "hunter2", "host=h password=REDACTED dbname=db"),
            ("host=h password='two words' dbname=db", "words", "host=h password=REDACTED dbname=db"),
            ("host=h password = spaced dbname=db", "spaced", "dbname=db"),
            ("host=h password='it\\'s x' user='a b'", "s x", "user='a b'"),
            ("host=h password=a\\ b", " b", "host=h password=REDACTED"),
        ] {
            let shown = redact(conn);
            assert!(!shown.contains(secret), "{conn} -> {shown}");
            assert!(shown.contains(kept), "{conn} -> {shown}");
        }
        assert_eq!(redact("host=h dbname=db"), "host=h dbname=db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
    }

    #[test]
    fn what_cannot_be_split_is_withheld() {
        assert_eq!(redact("host=h password='unterminated"), WITHHELD);
    }
}
