//! `sluice rules new NAME --lang …`: a ready-to-build rule project.
//!
//! A project is self-contained: the SDK of its language is embedded in this
//! binary (the files of `rules/sdk/`) and written into the project, so it
//! builds without a Sluice checkout. The starting rule, a "hello" rule that
//! turns every numeric field of a JSON payload into a point and logs a line
//! per message, comes with its build script, manifest, sample messages and
//! README from `rules/templates/`, where `{{name}}` and friends are filled in.
//!
//! | language | rule | SDK, vendored as |
//! |---|---|---|
//! | C | `NAME.c` | `sluice.h` beside it |
//! | AssemblyScript | `assembly/index.ts` | `sluice-rule-sdk/`, the local package `@sluice/rule-sdk` |
//! | Rust | `src/lib.rs` | `sluice-rule/`, a path dependency |

use anyhow::{Context, bail};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    C,
    Assemblyscript,
    Rust,
}

impl Lang {
    fn title(self) -> &'static str {
        match self {
            Lang::C => "C",
            Lang::Assemblyscript => "AssemblyScript",
            Lang::Rust => "Rust",
        }
    }
}

/// The topic filter of a new rule's manifest and of the commands we print.
const TOPIC: &str = "devices/+/telemetry";

/// Files every project gets.
mod common {
    pub const README: &str = include_str!("../rules/templates/common/README.md");
    pub const MANIFEST: &str = include_str!("../rules/templates/common/rule.toml");
    pub const MESSAGES: &str = include_str!("../rules/templates/common/messages.jsonl");
}

mod c {
    pub const RULE: &str = include_str!("../rules/templates/c/rule.c");
    pub const BUILD: &str = include_str!("../rules/templates/c/build.sh");
    pub const GITIGNORE: &str = include_str!("../rules/templates/c/gitignore");
    pub const README_FILES: &str = include_str!("../rules/templates/c/README-files.md");
    pub const README_BUILD: &str = include_str!("../rules/templates/c/README-build.md");
    pub const SDK_HEADER: &str = include_str!("../rules/sdk/c/sluice.h");
}

mod assemblyscript {
    pub const RULE: &str = include_str!("../rules/templates/assemblyscript/index.ts");
    pub const BUILD: &str = include_str!("../rules/templates/assemblyscript/build.sh");
    pub const GITIGNORE: &str = include_str!("../rules/templates/assemblyscript/gitignore");
    pub const README_FILES: &str =
        include_str!("../rules/templates/assemblyscript/README-files.md");
    pub const README_BUILD: &str =
        include_str!("../rules/templates/assemblyscript/README-build.md");
    pub const PACKAGE: &str = include_str!("../rules/templates/assemblyscript/package.json");
    pub const ASCONFIG: &str = include_str!("../rules/templates/assemblyscript/asconfig.json");
    pub const TSCONFIG: &str = include_str!("../rules/templates/assemblyscript/tsconfig.json");
    /// Where the SDK goes, and the dependency that names it.
    pub const SDK_DIR: &str = "sluice-rule-sdk";
    pub const SDK_PACKAGE: &str = include_str!("../rules/sdk/assemblyscript/package.json");
    pub const SDK_LOCK: &str = include_str!("../rules/sdk/assemblyscript/package-lock.json");
    /// The SDK's files, copied as they are (its package.json is derived).
    pub const SDK_FILES: &[(&str, &str)] = &[
        (
            "index.ts",
            include_str!("../rules/sdk/assemblyscript/index.ts"),
        ),
        (
            "assembly/index.ts",
            include_str!("../rules/sdk/assemblyscript/assembly/index.ts"),
        ),
        (
            "asconfig.json",
            include_str!("../rules/sdk/assemblyscript/asconfig.json"),
        ),
        (
            "README.md",
            include_str!("../rules/sdk/assemblyscript/README.md"),
        ),
    ];
}

mod rust {
    pub const RULE: &str = include_str!("../rules/templates/rust/lib.rs");
    pub const BUILD: &str = include_str!("../rules/templates/rust/build.sh");
    pub const GITIGNORE: &str = include_str!("../rules/templates/rust/gitignore");
    pub const README_FILES: &str = include_str!("../rules/templates/rust/README-files.md");
    pub const README_BUILD: &str = include_str!("../rules/templates/rust/README-build.md");
    pub const CARGO: &str = include_str!("../rules/templates/rust/Cargo.toml");
    pub const CARGO_CONFIG: &str = include_str!("../rules/templates/rust/cargo-config.toml");
    /// Where the SDK crate goes (the path dependency in the Cargo.toml template).
    pub const SDK_DIR: &str = "sluice-rule";
    pub const SDK_CARGO: &str = include_str!("../rules/sdk/rust/Cargo.toml");
    /// The SDK's files, copied as they are (its Cargo.toml is derived).
    /// Every module of `rules/sdk/rust/src/` must be listed here.
    pub const SDK_FILES: &[(&str, &str)] = &[
        ("README.md", include_str!("../rules/sdk/rust/README.md")),
        ("src/lib.rs", include_str!("../rules/sdk/rust/src/lib.rs")),
        ("src/json.rs", include_str!("../rules/sdk/rust/src/json.rs")),
        ("src/sys.rs", include_str!("../rules/sdk/rust/src/sys.rs")),
        ("src/text.rs", include_str!("../rules/sdk/rust/src/text.rs")),
    ];
}

/// One file of a project, at a `/`-separated path relative to its root.
#[derive(Debug)]
struct File {
    path: String,
    contents: String,
    executable: bool,
}

impl File {
    fn new(path: impl Into<String>, contents: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            contents: contents.into(),
            executable: false,
        }
    }

    fn executable(path: impl Into<String>, contents: impl Into<String>) -> Self {
        Self {
            executable: true,
            ..Self::new(path, contents)
        }
    }
}

/// Creates the project for rule `name` in `dir`, which must not exist or be
/// empty, and tells the user what to run next.
pub fn create(name: &str, lang: Lang, dir: &Path) -> anyhow::Result<()> {
    check_name(name, lang)?;
    let files = project(name, lang)?;
    let existed = check_target(dir)?;
    if let Err(e) = write(dir, &files) {
        // Leave nothing half-made behind: the directory was absent or empty.
        if existed {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for entry in entries.flatten() {
                    let path = entry.path();
                    let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
                }
            }
        } else {
            let _ = std::fs::remove_dir_all(dir);
        }
        return Err(e);
    }

    println!(
        "Created the {} rule project `{name}` in {}:",
        lang.title(),
        dir.display()
    );
    for file in &files {
        println!("  {}", dir.join(&file.path).display());
    }
    println!();
    println!("Next:");
    println!("  cd {}", shell_quote(&dir.display().to_string()));
    println!("  ./build.sh");
    println!("  sluice rules test {name}.wasm --input messages.jsonl --topic '{TOPIC}'");
    println!("  sluice rules deploy {name}.toml");
    Ok(())
}

/// Names become file names, the manifest's rule name and, per language,
/// identifiers: keep them to what every one of those accepts.
fn check_name(name: &str, lang: Lang) -> anyhow::Result<()> {
    let valid = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !valid {
        bail!(
            "invalid rule name {name:?}: use 1 to 64 characters of A-Z, a-z, 0-9, _ and -, \
             starting with a letter"
        );
    }
    if lang == Lang::Rust {
        // The crate name is never written as an identifier in the source,
        // so even keywords work; the SDK's own name clashes with the
        // dependency (in cargo's workspace and in rustc's crate graph).
        let krate = crate_name(name);
        if krate == crate_name(rust::SDK_DIR) {
            bail!(
                "a Rust rule cannot be named {name:?}: its crate `{krate}` would clash with \
                 the SDK crate `{}` it depends on; choose another name",
                rust::SDK_DIR
            );
        }
    }
    Ok(())
}

/// The Rust crate (library) name: a snake_case identifier.
fn crate_name(name: &str) -> String {
    name.to_ascii_lowercase().replace('-', "_")
}

/// Checks that `dir` is absent or an empty directory; returns whether it exists.
fn check_target(dir: &Path) -> anyhow::Result<bool> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("cannot use {}", dir.display())),
        Ok(_) if !dir.is_dir() => bail!("{} exists and is not a directory", dir.display()),
        Ok(_) => {
            let mut entries = std::fs::read_dir(dir)
                .with_context(|| format!("cannot read the directory {}", dir.display()))?;
            if entries.next().is_some() {
                bail!(
                    "{} already exists and is not empty: choose another directory with --dir",
                    dir.display()
                );
            }
            Ok(true)
        }
    }
}

fn write(dir: &Path, files: &[File]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for file in files {
        let path: PathBuf = dir.join(&file.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(if file.executable { 0o755 } else { 0o644 });
        }
        let mut out = options
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        std::io::Write::write_all(&mut out, file.contents.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// Fills in `{{key}}` placeholders.
fn render(template: &str, vars: &[(&str, &str)]) -> String {
    vars.iter().fold(template.to_owned(), |text, (key, value)| {
        text.replace(&format!("{{{{{key}}}}}"), value)
    })
}

/// Every file of the project, in the order they are listed to the user.
fn project(name: &str, lang: Lang) -> anyhow::Result<Vec<File>> {
    let krate = crate_name(name);
    let npm_name = name.to_ascii_lowercase();
    let assemblyscript_version = assemblyscript_version()?;
    let (source, readme_files, readme_build) = match lang {
        Lang::C => (format!("{name}.c"), c::README_FILES, c::README_BUILD),
        Lang::Assemblyscript => (
            "assembly/index.ts".to_owned(),
            assemblyscript::README_FILES,
            assemblyscript::README_BUILD,
        ),
        Lang::Rust => (
            "src/lib.rs".to_owned(),
            rust::README_FILES,
            rust::README_BUILD,
        ),
    };
    let mut vars = vec![
        ("name", name),
        ("crate", &krate),
        ("npm_name", &npm_name),
        ("assemblyscript", &assemblyscript_version),
        ("language", lang.title()),
        ("source", &source),
    ];
    let files_rows = render(readme_files, &vars);
    let build_section = render(readme_build, &vars);
    vars.push(("files", &files_rows));
    vars.push(("build", &build_section));
    let fill = |template: &str| render(template, &vars);

    let mut files = Vec::new();
    match lang {
        Lang::C => {
            files.push(File::new(&source, fill(c::RULE)));
            files.push(File::new("sluice.h", c::SDK_HEADER));
            files.push(File::executable("build.sh", fill(c::BUILD)));
        }
        Lang::Assemblyscript => {
            use assemblyscript as a;
            let package = fill(a::PACKAGE);
            files.push(File::new(&source, fill(a::RULE)));
            files.push(File::executable("build.sh", fill(a::BUILD)));
            files.push(File::new("asconfig.json", fill(a::ASCONFIG)));
            files.push(File::new("tsconfig.json", fill(a::TSCONFIG)));
            let lock = npm_lock(&package)?;
            files.push(File::new("package.json", package));
            files.push(File::new("package-lock.json", lock));
            files.push(File::new(
                format!("{}/package.json", a::SDK_DIR),
                sdk_package()?,
            ));
            for (path, contents) in a::SDK_FILES {
                files.push(File::new(format!("{}/{path}", a::SDK_DIR), *contents));
            }
        }
        Lang::Rust => {
            files.push(File::new(&source, fill(rust::RULE)));
            files.push(File::executable("build.sh", fill(rust::BUILD)));
            files.push(File::new("Cargo.toml", fill(rust::CARGO)));
            files.push(File::new(".cargo/config.toml", rust::CARGO_CONFIG));
            files.push(File::new(
                format!("{}/Cargo.toml", rust::SDK_DIR),
                sdk_cargo_toml()?,
            ));
            for (path, contents) in rust::SDK_FILES {
                files.push(File::new(format!("{}/{path}", rust::SDK_DIR), *contents));
            }
        }
    }
    let gitignore = match lang {
        Lang::C => c::GITIGNORE,
        Lang::Assemblyscript => assemblyscript::GITIGNORE,
        Lang::Rust => rust::GITIGNORE,
    };
    files.push(File::new(format!("{name}.toml"), fill(common::MANIFEST)));
    files.push(File::new("messages.jsonl", common::MESSAGES));
    files.push(File::new("README.md", fill(common::README)));
    files.push(File::new(".gitignore", gitignore));
    Ok(files)
}

fn parse_json(text: &str, what: &str) -> anyhow::Result<Value> {
    serde_json::from_str(text).with_context(|| format!("the embedded {what} is not valid JSON"))
}

/// The AssemblyScript compiler the SDK pins.
fn assemblyscript_version() -> anyhow::Result<String> {
    let package = parse_json(assemblyscript::SDK_PACKAGE, "SDK package.json")?;
    package["devDependencies"]["assemblyscript"]
        .as_str()
        .map(str::to_owned)
        .context("the SDK's package.json does not pin assemblyscript")
}

/// The vendored SDK's package.json: the SDK's identity, without its
/// scripts and its own copy of the compiler (the project has that).
fn sdk_package() -> anyhow::Result<String> {
    let sdk = parse_json(assemblyscript::SDK_PACKAGE, "SDK package.json")?;
    let fields: Vec<(&str, Value)> = ["name", "version", "private", "description", "license"]
        .into_iter()
        .filter_map(|key| Some((key, sdk.get(key)?.clone())))
        .collect();
    Ok(ordered_json(&fields))
}

/// A package-lock.json that `npm ci` accepts for `package` (the project's
/// package.json): the root from it, the SDK as a link to its directory, and
/// the compiler's packages, with their integrity hashes, from the SDK's own
/// lock file, so a project installs exactly what the SDK was tested with.
fn npm_lock(package: &str) -> anyhow::Result<String> {
    let package = parse_json(package, "package.json template")?;
    let sdk = parse_json(assemblyscript::SDK_PACKAGE, "SDK package.json")?;
    let sdk_lock = parse_json(assemblyscript::SDK_LOCK, "SDK package-lock.json")?;
    let sdk_name = sdk["name"]
        .as_str()
        .context("the SDK's package.json has no name")?;

    let mut root = serde_json::Map::new();
    for key in [
        "name",
        "version",
        "license",
        "dependencies",
        "devDependencies",
    ] {
        if let Some(value) = package.get(key) {
            root.insert(key.into(), value.clone());
        }
    }
    let mut packages = serde_json::Map::new();
    packages.insert(String::new(), root.into());
    packages.insert(
        format!("node_modules/{sdk_name}"),
        json!({"resolved": assemblyscript::SDK_DIR, "link": true}),
    );
    let sdk_packages = sdk_lock["packages"]
        .as_object()
        .context("the SDK's package-lock.json has no packages")?;
    for (path, entry) in sdk_packages {
        if !path.is_empty() {
            packages.insert(path.clone(), entry.clone());
        }
    }
    let mut link = serde_json::Map::new();
    for key in ["name", "version"] {
        link.insert(key.into(), sdk[key].clone());
    }
    link.insert("dev".into(), true.into());
    if let Some(license) = sdk.get("license") {
        link.insert("license".into(), license.clone());
    }
    packages.insert(assemblyscript::SDK_DIR.into(), link.into());

    Ok(ordered_json(&[
        ("name", package["name"].clone()),
        ("version", package["version"].clone()),
        ("lockfileVersion", sdk_lock["lockfileVersion"].clone()),
        ("requires", true.into()),
        ("packages", packages.into()),
    ]))
}

/// A pretty-printed JSON object with its keys in the given order (serde_json
/// sorts them), as npm writes its files.
fn ordered_json(fields: &[(&str, Value)]) -> String {
    let mut out = String::from("{\n");
    for (i, (key, value)) in fields.iter().enumerate() {
        let value = serde_json::to_string_pretty(value)
            .expect("a JSON value serializes")
            .replace('\n', "\n  ");
        let comma = if i + 1 < fields.len() { "," } else { "" };
        out.push_str(&format!("  {}: {value}{comma}\n", Value::from(*key)));
    }
    out.push_str("}\n");
    out
}

/// The vendored SDK crate's Cargo.toml: the SDK's, without what only makes
/// sense in the Sluice repository (its examples, its own workspace and
/// profiles: the project's workspace and profiles apply).
fn sdk_cargo_toml() -> anyhow::Result<String> {
    let mut manifest: toml::Table = rust::SDK_CARGO
        .parse()
        .context("the embedded SDK Cargo.toml is not valid TOML")?;
    for key in [
        "workspace",
        "profile",
        "example",
        "bench",
        "test",
        "bin",
        "dev-dependencies",
    ] {
        manifest.remove(key);
    }
    let mut out = String::from(
        "# Sluice's Rust SDK, vendored by `sluice rules new`; its README documents it.\n",
    );
    // [package] first, name and version at its top (a toml::Table sorts its
    // keys), then the other tables.
    let Some(toml::Value::Table(mut package)) = manifest.remove("package") else {
        bail!("the SDK's Cargo.toml has no [package]");
    };
    out.push_str("\n[package]\n");
    for key in ["name", "version", "edition", "rust-version"] {
        if let Some(value) = package.remove(key) {
            out.push_str(&format!("{key} = {value}\n"));
        }
    }
    out.push_str(&toml::to_string(&package).context("cannot write the SDK's Cargo.toml")?);
    for (key, value) in manifest {
        let mut table = toml::Table::new();
        table.insert(key, value);
        out.push('\n');
        out.push_str(&toml::to_string(&table).context("cannot write the SDK's Cargo.toml")?);
    }
    Ok(out)
}

/// Quotes a path for a POSIX shell when it needs it.
fn shell_quote(text: &str) -> String {
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+:,@%=".contains(c));
    if plain {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LANGS: [Lang; 3] = [Lang::C, Lang::Assemblyscript, Lang::Rust];

    #[test]
    fn names() {
        for good in ["a", "hello", "My-Rule_2", &"x".repeat(64)] {
            for lang in LANGS {
                check_name(good, lang).unwrap();
            }
        }
        for bad in [
            "",
            "1a",
            "-a",
            "_a",
            "a b",
            "a.b",
            "a/b",
            "é",
            &"x".repeat(65),
        ] {
            for lang in LANGS {
                assert!(check_name(bad, lang).is_err(), "{bad:?} accepted");
            }
        }
        for taken in ["sluice-rule", "Sluice_Rule", "sluice_rule"] {
            assert!(check_name(taken, Lang::Rust).is_err(), "{taken:?} accepted");
            check_name(taken, Lang::C).unwrap();
        }
    }

    #[test]
    fn templates_are_filled_in() {
        for lang in LANGS {
            let files = project("My-Rule", lang).unwrap();
            for file in &files {
                if file.path.starts_with("sluice") {
                    continue; // the SDK, as it is
                }
                assert!(
                    !file.contents.contains("{{"),
                    "{lang:?} {}: a placeholder is left:\n{}",
                    file.path,
                    file.contents
                );
            }
            let paths: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
            for path in ["build.sh", "My-Rule.toml", "messages.jsonl", "README.md"] {
                assert!(paths.contains(&path), "{lang:?}: no {path}");
            }
        }
    }

    #[test]
    fn npm_lock_matches_package_json() {
        let files = project("Hello", Lang::Assemblyscript).unwrap();
        let get = |path: &str| -> Value {
            let file = files.iter().find(|f| f.path == path).unwrap();
            serde_json::from_str(&file.contents).unwrap()
        };
        let package = get("package.json");
        let lock = get("package-lock.json");
        assert_eq!(package["name"], "hello");
        assert_eq!(lock["name"], "hello");
        assert_eq!(
            lock["packages"][""]["devDependencies"],
            package["devDependencies"]
        );
        let version = package["devDependencies"]["assemblyscript"].clone();
        assert_eq!(
            lock["packages"]["node_modules/assemblyscript"]["version"],
            version
        );
        assert_eq!(
            lock["packages"]["node_modules/@sluice/rule-sdk"]["resolved"],
            "sluice-rule-sdk"
        );
        let sdk = get("sluice-rule-sdk/package.json");
        assert_eq!(lock["packages"]["sluice-rule-sdk"]["name"], sdk["name"]);
        assert!(sdk.get("devDependencies").is_none());
    }

    #[test]
    fn sdk_cargo_toml_is_a_plain_member() {
        let manifest: toml::Table = sdk_cargo_toml().unwrap().parse().unwrap();
        assert_eq!(manifest["package"]["name"].as_str(), Some("sluice-rule"));
        for key in ["workspace", "example", "profile"] {
            assert!(!manifest.contains_key(key), "{key} kept");
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("my-rule"), "my-rule");
        assert_eq!(shell_quote("/tmp/a b"), "'/tmp/a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
