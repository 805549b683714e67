//! The layer rule of `lib.rs`, checked: a module imports only from its own folder and the
//! layers below it, so the data flow reads one way (source → delivery → store) and the
//! shared vocabulary lives in `model`. Within a folder the imports go one way too: no two
//! modules of one folder name each other (unit tests aside).

use std::path::Path;

/// The layers, lowest first (`lib.rs` says what each holds).
const LAYERS: [&str; 12] =
    ["security", "model", "config", "pg", "ops", "store", "delivery", "source", "admin", "app", "local", "cli"];

fn rank(top: &str) -> Option<usize> {
    LAYERS.iter().position(|l| *l == top)
}

/// Every `crate::<top>` a source file names, with the line it is on.
fn imports(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let tail = &rest[i + "crate::".len()..];
            let name: String = tail.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            found.push((n + 1, name));
            rest = tail;
        }
    }
    found
}

fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src is readable") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            walk(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_module_imports_from_a_layer_above_its_own() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    let mut backwards = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).expect("under src");
        let top = rel
            .components()
            .next()
            .expect("component")
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        let Some(own) = rank(&top) else { continue }; // lib.rs, main.rs, layers.rs
        let text = std::fs::read_to_string(file).expect("readable");
        for (line, name) in imports(&text) {
            match rank(&name) {
                Some(r) if r > own => backwards.push(format!("src/{}:{line}: {top} imports {name}", rel.display())),
                Some(_) => {}
                None => backwards.push(format!("src/{}:{line}: crate::{name} is not a layer", rel.display())),
            }
        }
    }
    assert!(backwards.is_empty(), "imports against the layer order:\n{}", backwards.join("\n"));
}

#[test]
fn the_checker_sees_a_backward_import() {
    let found = imports(
        "use crate::source::route::Router; // crate::cli in a comment\nlet x = crate::model::event::CRM_TABLES;",
    );
    assert_eq!(found, vec![(1, "source".to_owned()), (2, "model".to_owned())]);
    assert!(rank("source") > rank("delivery"));
}

/// A file's module path under `src`: `source/emit.rs` is `source::emit`, `source/slot/mod.rs`
/// is `source::slot`, `lib.rs` is the crate root (empty).
fn module_of(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    let file = parts.pop().unwrap_or_default();
    let stem = file.trim_end_matches(".rs");
    if !matches!(stem, "mod" | "lib" | "main") {
        parts.push(stem.to_owned());
    }
    parts
}

/// The paths a module names through `crate::`, `super::` or `self::` (comments left out),
/// resolved against its own path `own`; a `{…}` group gives one path per item.
fn paths_named(text: &str, own: &[String]) -> Vec<Vec<String>> {
    let code: String = text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n");
    let ident = |s: &str| -> String { s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect() };
    let mut found = Vec::new();
    let mut at = 0;
    while let Some(i) = code[at..].find("::").map(|i| i + at) {
        at = i + 2;
        // The path's first segment: the identifier just before `::`.
        let start = code[..i].rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map_or(0, |j| j + 1);
        if code[..start].ends_with("::") {
            continue; // inside a path already read
        }
        let mut base: Vec<String> = match &code[start..i] {
            "crate" => Vec::new(),
            "self" => own.to_vec(),
            "super" => own[..own.len().saturating_sub(1)].to_vec(),
            _ => continue,
        };
        let mut rest = &code[i + 2..];
        loop {
            let seg = ident(rest);
            if seg == "super" {
                base.pop();
            } else if !seg.is_empty() {
                base.push(seg.clone());
            }
            rest = &rest[seg.len()..];
            if let Some(more) = rest.strip_prefix("::") {
                rest = more;
            } else {
                break;
            }
        }
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            for item in group.split(',') {
                let seg = ident(item.trim_start());
                if !seg.is_empty() && seg != "self" {
                    found.push([base.clone(), vec![seg]].concat());
                }
            }
        }
        found.push(base);
    }
    found
}

/// Pairs of modules of one parent that name each other (`parent: a <-> b`), each file counting
/// for the child of the parent it lies under (so `source/slot/` as a whole is `slot`).
fn import_circles(modules: &[(Vec<String>, String)]) -> Vec<String> {
    let known: std::collections::HashSet<&[String]> = modules.iter().map(|(m, _)| m.as_slice()).collect();
    let mut edges = std::collections::BTreeSet::new();
    for (own, text) in modules {
        for path in paths_named(text, own) {
            let common = own.iter().zip(&path).take_while(|(a, b)| a == b).count();
            if own.len() > common && path.len() > common && known.contains(&path[..=common]) {
                edges.insert((own[..common].join("::"), own[common].clone(), path[common].clone()));
            }
        }
    }
    edges
        .iter()
        .filter(|(parent, a, b)| a < b && edges.contains(&(parent.clone(), b.clone(), a.clone())))
        .map(|(parent, a, b)| format!("{}: {a} <-> {b}", if parent.is_empty() { "crate" } else { parent }))
        .collect()
}

#[test]
fn no_two_modules_of_one_folder_import_each_other() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    let modules: Vec<(Vec<String>, String)> = files
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(f).expect("readable");
            // A unit test naming a sibling's types is no dependency of the code.
            let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or_default().to_owned();
            (module_of(f.strip_prefix(&src).expect("under src")), code)
        })
        .collect();
    let circles = import_circles(&modules);
    assert!(circles.is_empty(), "modules of one folder that import each other:\n{}", circles.join("\n"));
}

#[test]
fn the_checker_sees_an_import_circle() {
    let module = |path: &str, text: &str| (module_of(Path::new(path)), text.to_owned());
    let modules = [
        module("source/mod.rs", "pub mod slot;\npub mod emit;\npub mod step;"),
        module("source/slot/mod.rs", "use crate::source::{emit::Emitter, step};\npub struct SlotError;"),
        module("source/slot/ceiling.rs", "use super::SlotError; // crate::source::step in a comment"),
        module("source/emit.rs", "fn f() -> crate::source::slot::ceiling::Ceiling { todo!() }"),
        module("source/step.rs", "use super::super::source::emit;"),
        module("security/listener/io.rs", "use super::room::Conn;"),
        module("security/listener/room.rs", "use super::{io::Activity, phase};"),
        module("security/listener/phase.rs", ""),
    ];
    assert_eq!(
        import_circles(&modules),
        vec!["security::listener: io <-> room".to_owned(), "source: emit <-> slot".to_owned()]
    );
}

#[test]
fn the_readme_code_map_names_every_layer_in_order() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).expect("README");
    let map = readme.split("## Code map").nth(1).expect("README has a code map").split("\n## ").next().unwrap_or("");
    let mut at = 0;
    for layer in LAYERS {
        let names = [format!("| `{layer}/` |"), format!("| `{layer}.rs` |")];
        let found = names.iter().filter_map(|n| map[at..].find(n.as_str())).min();
        let Some(i) = found else { panic!("the README's code map does not list {layer} after the layers below it") };
        at += i;
    }
}

/// Walhook's own tables: every `CREATE TABLE walhook.<name>` of the migrations in `sql/`.
fn walhook_tables(sql_dir: &Path) -> Vec<String> {
    let mut tables = Vec::new();
    for entry in std::fs::read_dir(sql_dir).expect("sql is readable") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "sql") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("readable");
        let mut rest = text.as_str();
        while let Some(i) = rest.find("CREATE TABLE walhook.") {
            let tail = &rest[i + "CREATE TABLE walhook.".len()..];
            tables.push(tail.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect());
            rest = tail;
        }
    }
    tables
}

/// The lines of `text` holding SQL on one of `tables`: `walhook.<table>` in a string literal
/// that, from its opening quote on, names an SQL clause (`FROM`, `INTO`, `UPDATE`, `JOIN`,
/// `TABLE`, upper case as walhook writes SQL). Messages that merely name a table ("recorded
/// in walhook.replication_gaps"), comments and privileges (`GRANT`, `REVOKE`: the
/// migration's role set-up) are not queries.
fn sql_on_tables(text: &str, tables: &[String]) -> Vec<usize> {
    const CLAUSES: [&str; 5] = ["FROM", "INTO", "UPDATE", "JOIN", "TABLE"];
    let code: String =
        text.lines().map(|l| if l.trim_start().starts_with("//") { "" } else { l }).collect::<Vec<_>>().join("\n");
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(i) = code[from..].find("walhook.").map(|i| i + from) {
        from = i + "walhook.".len();
        let name: String = code[from..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if !tables.contains(&name) {
            continue;
        }
        let literal = &code[code[..i].rfind('"').map_or(0, |q| q + 1)..i];
        let privileges = literal.starts_with("GRANT") || literal.starts_with("REVOKE");
        let line = code[..i].matches('\n').count() + 1;
        if !privileges
            && literal.split(|c: char| !c.is_ascii_alphanumeric()).any(|w| CLAUSES.contains(&w))
            && found.last() != Some(&line)
        {
            found.push(line);
        }
    }
    found
}

#[test]
fn only_the_store_queries_walhooks_tables() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tables = walhook_tables(&root.join("sql"));
    assert!(tables.contains(&"deliveries".to_owned()) && tables.len() >= 8, "tables read from sql/: {tables:?}");
    let src = root.join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    let mut outside = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).expect("under src");
        // The store owns the tables; migrations create them; this file is the checker.
        if rel.starts_with("store") || rel == Path::new("pg/migrate.rs") || rel == Path::new("layers.rs") {
            continue;
        }
        let text = std::fs::read_to_string(file).expect("readable");
        for line in sql_on_tables(&text, &tables) {
            outside.push(format!("src/{}:{line}", rel.display()));
        }
    }
    assert!(outside.is_empty(), "SQL on walhook's tables outside src/store/:\n{}", outside.join("\n"));
}

#[test]
fn the_checker_sees_sql_on_a_walhook_table() {
    let tables = vec!["deliveries".to_owned(), "endpoints".to_owned()];
    let text = "let a = client.query(\"SELECT id \\\n    FROM due, walhook.deliveries d\", &[]);\n\
                // SELECT 1 FROM walhook.endpoints\n\
                warn!(\"recorded in walhook.endpoints\");\n\
                let b = format!(\"SELECT {COLUMNS} FROM walhook.endpoints\");\n\
                let c = \"SELECT 1 FROM walhook.schema_migrations\";\n\
                let d = [\"GRANT SELECT, UPDATE ON walhook.deliveries TO walhook\"];\n\
                let e = \"UPDATE walhook.deliveries SET a = 1 FROM walhook.endpoints e\";";
    assert_eq!(sql_on_tables(text, &tables), vec![2, 5, 8]);
}
