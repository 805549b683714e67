//! `docs/architecture.md` stays true: every test it names exists, every "invariant N" a
//! comment cites is one of its numbered invariants, and nothing in the repository cites a
//! design file that lives outside it.

use std::path::{Path, PathBuf};

const DOC: &str = "docs/architecture.md";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every file under `dir` (recursively) whose name ends with one of `exts`.
fn files(dir: &Path, exts: &[&str], out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            files(&p, exts, out);
        } else if exts.iter().any(|x| p.to_string_lossy().ends_with(x)) {
            out.push(p);
        }
    }
}

fn rust_sources() -> Vec<(PathBuf, String)> {
    let mut paths = Vec::new();
    for dir in ["src", "tests", "benches"] {
        files(&root().join(dir), &[".rs"], &mut paths);
    }
    paths.into_iter().map(|p| (p.clone(), std::fs::read_to_string(&p).unwrap())).collect()
}

/// Whether `name` is defined as a test in any source: `fn name(`, or the first argument of a
/// test-generating macro (`event_test!(name, …` or `name,` alone on the macro's first line).
fn test_exists(name: &str, sources: &[(PathBuf, String)]) -> bool {
    sources.iter().any(|(_, text)| {
        text.contains(&format!("fn {name}("))
            || text.lines().any(|l| {
                let l = l.trim_start();
                l == format!("{name},") || (l.contains("!(") && l.contains(&format!("!({name},")))
            })
    })
}

/// `file::test_name` references: backticked, lowercase words joined by one `::`.
fn test_references(doc: &str) -> Vec<String> {
    let word = |w: &str| !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    doc.split('`')
        .skip(1)
        .step_by(2)
        .filter(|s| matches!(s.split_once("::"), Some((a, b)) if word(a) && word(b)))
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_test_the_architecture_names_exists() {
    let doc = std::fs::read_to_string(root().join(DOC)).unwrap();
    let sources = rust_sources();
    let refs = test_references(&doc);
    assert!(refs.len() > 40, "expected the invariants to name their tests, found {refs:?}");
    let missing: Vec<&String> = refs.iter().filter(|r| !test_exists(r.split_once("::").unwrap().1, &sources)).collect();
    assert!(missing.is_empty(), "{DOC} names tests that do not exist: {missing:?}");
}

/// The numbers of "invariant 4" or "invariants 3 and 7" in `line`, if it cites any.
fn cited_invariants(line: &str) -> Option<Vec<u32>> {
    let at = line.find("invariant")?;
    let rest = line[at..].trim_start_matches("invariants").trim_start_matches("invariant");
    let mut numbers = Vec::new();
    for (i, part) in rest.split(" and ").enumerate().take(2) {
        let digits: String = part.trim_start().chars().take_while(|c| c.is_ascii_digit()).collect();
        match digits.parse() {
            Ok(n) => numbers.push(n),
            Err(_) if i == 0 => return None,
            Err(_) => break,
        }
    }
    Some(numbers)
}

#[test]
fn every_invariant_a_comment_cites_is_in_the_architecture() {
    let doc = std::fs::read_to_string(root().join(DOC)).unwrap();
    let (mut bad, mut cited) = (Vec::new(), 0);
    for (path, text) in rust_sources() {
        for line in text.lines().filter(|l| l.trim_start().starts_with("//")) {
            let Some(numbers) = cited_invariants(line) else { continue };
            cited += numbers.len();
            for n in numbers {
                if !doc.contains(&format!("### {n}. ")) {
                    bad.push(format!("{}: invariant {n}", path.display()));
                }
            }
        }
    }
    assert!(cited > 5, "the modules' headers cite their invariants; found {cited} citations");
    assert!(bad.is_empty(), "comments cite invariants {DOC} does not define: {bad:?}");
}

#[test]
fn nothing_cites_a_design_file_outside_the_repository() {
    // Spelled in pieces so this file does not cite them itself.
    let needles =
        [concat!("DESIGN", ".md"), concat!("STYLE", ".md"), concat!("/work/", "shared"), concat!("../", "shared")];
    let mut paths = Vec::new();
    for dir in ["src", "tests", "benches", "helm", "docs", "config", "sql", ".ci"] {
        files(&root().join(dir), &[""], &mut paths);
    }
    for f in ["README.md", "BENCHMARKS.md", "Cargo.toml", "Dockerfile"] {
        paths.push(root().join(f));
    }
    let mut found = Vec::new();
    for p in paths {
        let Ok(text) = std::fs::read_to_string(&p) else { continue };
        for (i, line) in text.lines().enumerate() {
            if needles.iter().any(|n| line.contains(n)) {
                found.push(format!("{}:{}: {}", p.display(), i + 1, line.trim()));
            }
        }
    }
    assert!(found.is_empty(), "cite docs/architecture.md instead:\n{}", found.join("\n"));
}
