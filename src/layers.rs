//! The layer rule of `lib.rs`, checked: a module imports only from its own folder and the
//! layers below it, so the data flow reads one way (source → delivery → store) and the
//! shared vocabulary lives in `model`.

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
