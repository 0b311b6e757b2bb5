//! The layers of `handshake-user`, read from its source: which top-level
//! module imports which. The imports must point one way (see `lib.rs`), and
//! the CLI's client must know the daemon only through `wire`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

/// Top-level modules and the ones each may import.
const ALLOWED: [(&str, &[&str]); 5] = [
    ("cli", &["daemon", "kernel", "wire"]),
    ("daemon", &["kernel", "model", "wire"]),
    ("model", &["kernel", "wire"]),
    ("kernel", &[]),
    ("wire", &[]),
];

/// The top-level modules named after `crate::` in `source`, including
/// every entry of a `crate::{...}` group.
fn imported(source: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (at, _) in source.match_indices("crate::") {
        let rest = &source[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut entry_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => entry_start = true,
                    c if entry_start && (c.is_alphanumeric() || c == '_') => {
                        entry_start = false;
                        found.insert(identifier(&group[i..]));
                    }
                    _ => {}
                }
            }
        } else {
            found.insert(identifier(rest));
        }
    }
    found
}

fn identifier(text: &str) -> String {
    text.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

fn sources(dir: &Path, out: &mut Vec<(String, String)>) {
    for entry in fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = fs::read_to_string(&path).expect("read source");
            out.push((path.display().to_string(), text));
        }
    }
}

/// Every source file's top-level module and what it imports.
fn imports() -> Vec<(String, String, BTreeSet<String>)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    files
        .into_iter()
        .filter_map(|(path, text)| {
            let relative = path
                .strip_prefix(&format!("{}/", src.display()))?
                .to_owned();
            let top = relative
                .split('/')
                .next()?
                .trim_end_matches(".rs")
                .to_owned();
            Some((relative, top, imported(&text)))
        })
        .collect()
}

#[test]
fn imports_point_one_way() {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.into_iter().collect();
    let mut checked = 0;
    for (file, top, imports) in imports() {
        let Some(may) = allowed.get(top.as_str()) else {
            assert!(
                ["lib", "main"].contains(&top.as_str()),
                "{file}: top-level module {top} is not in the layer table"
            );
            continue;
        };
        for module in imports.iter().filter(|m| **m != top) {
            assert!(
                may.contains(&module.as_str()),
                "{file} ({top}) imports crate::{module}; {top} may import only {may:?}"
            );
        }
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} source files found");
}

#[test]
fn the_client_knows_the_daemon_only_through_wire() {
    let (_, _, client) = imports()
        .into_iter()
        .find(|(file, _, _)| file == "cli/client.rs")
        .expect("cli/client.rs");
    let outside: Vec<_> = client
        .iter()
        .filter(|m| !["cli", "wire"].contains(&m.as_str()))
        .collect();
    assert!(outside.is_empty(), "cli/client.rs imports {outside:?}");
}

#[test]
fn groups_and_paths_are_both_read() {
    let source =
        "use crate::{\n    daemon::{a, b},\n    kernel::clock,\n};\nfn f() { crate::wire::x(); }";
    let found: Vec<String> = imported(source).into_iter().collect();
    assert_eq!(found, ["daemon", "kernel", "wire"]);
}
