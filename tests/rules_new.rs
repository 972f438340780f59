//! `sluice rules new`: for each language, a new project is built by its own
//! `build.sh` with the language's real toolchain, outside the Sluice
//! repository, and its module is run on the project's `messages.jsonl`
//! through the real engine with `sluice rules test`.
//!
//! A missing toolchain fails the test with what to install; `.ci/run`
//! installs all of them.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn sluice() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
    command.env("NO_COLOR", "1");
    command
}

fn text(bytes: &[u8]) -> String {
    // Log lines may carry ANSI colours; drop them so the text can be searched.
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn show(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// Runs `sluice rules new NAME --lang LANG` in `cwd`, with `--dir` if given.
fn rules_new(cwd: &Path, name: &str, lang: &str, dir: Option<&Path>) -> Output {
    let mut command = sluice();
    command
        .current_dir(cwd)
        .args(["rules", "new", "--lang", lang]);
    if let Some(dir) = dir {
        command.arg("--dir").arg(dir);
    }
    command.arg("--").arg(name);
    command.output().expect("run sluice rules new")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The project's vendored SDK files are the repository's, byte for byte.
fn assert_vendored(project: &Path, vendored: &str, sdk: &str, files: &[&str]) {
    for file in files {
        assert_eq!(
            read(&project.join(vendored).join(file)),
            read(&repo().join("rules/sdk").join(sdk).join(file)),
            "{vendored}/{file} differs from rules/sdk/{sdk}/{file}"
        );
    }
}

/// Every file in `dir` (recursively), relative, `/`-separated.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(dir).unwrap();
                out.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    out.sort();
    out
}

/// Checks what every project has, then builds it with its build.sh.
fn build(project: &Path, name: &str, install: &str) {
    let manifest = read(&project.join(format!("{name}.toml")));
    let manifest = sluice_rules::manifest::Manifest::parse(&manifest)
        .unwrap_or_else(|e| panic!("{name}.toml is not a valid manifest: {e}\n{manifest}"));
    assert_eq!(manifest.topic, "devices/+/telemetry");
    assert_eq!(
        manifest.module.as_deref(),
        Some(Path::new(&format!("{name}.wasm")))
    );
    assert!(manifest.enabled);

    let readme = read(&project.join("README.md"));
    for command in [
        "./build.sh".to_owned(),
        format!(
            "sluice rules test {name}.wasm --input messages.jsonl --topic 'devices/+/telemetry'"
        ),
        format!("sluice rules deploy {name}.toml"),
    ] {
        assert!(readme.contains(&command), "README.md lacks `{command}`");
    }
    assert!(!readme.contains("{{"), "README.md keeps a placeholder");
    assert!(project.join("messages.jsonl").is_file());

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(project.join("build.sh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0o111, "build.sh is not executable");
    }

    // Run as a user would, from elsewhere, and with a clean environment for
    // the Rust toolchain (the test harness's cargo settings are not theirs).
    let out = Command::new(project.join("build.sh"))
        .current_dir(std::env::temp_dir())
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .expect("run build.sh");
    assert!(
        out.status.success(),
        "{name}: build.sh failed; is the toolchain installed? ({install})\n{}",
        show(&out)
    );
    let built = text(&out.stdout);
    assert!(
        built.contains(&format!("built {name}.wasm")),
        "{name}: build.sh said:\n{}",
        show(&out)
    );
    // The starting rule compiles without warnings (clang's and rustc's
    // `warning:`, asc's `WARNING AS…`; npm's own notices do not count).
    let stderr = text(&out.stderr);
    assert!(
        !stderr.contains("warning:") && !stderr.contains("WARNING AS"),
        "{name}: warnings from build.sh:\n{stderr}"
    );
    assert!(project.join(format!("{name}.wasm")).is_file());
}

/// `sluice rules test` with the README's command line, from the project.
fn rules_test(project: &Path, module: &str, input: &str) -> Output {
    sluice()
        .current_dir(project)
        .args(["rules", "test", module, "--input", input])
        .args(["--topic", "devices/+/telemetry"])
        .output()
        .expect("run sluice rules test")
}

/// The generated rule on the generated messages: every numeric field became
/// a point, each message logged a line, a bad payload is a dead letter.
fn check_hello(project: &Path, name: &str) {
    let module = format!("{name}.wasm");
    let out = rules_test(project, &module, "messages.jsonl");
    assert!(out.status.success(), "{name}: {}", show(&out));
    let mut points: Vec<(String, String, String, f64)> = Vec::new();
    for line in text(&out.stdout).lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert_eq!(v["kind"], "point", "{name}: unexpected output {line}");
        points.push((
            v["device_id"].as_str().unwrap().to_owned(),
            v["metric"].as_str().unwrap().to_owned(),
            v["time"].as_str().unwrap().to_owned(),
            v["value"].as_f64().unwrap(),
        ));
    }
    points.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let p = |device: &str, metric: &str, time: &str, value: f64| {
        (device.to_owned(), metric.to_owned(), time.to_owned(), value)
    };
    assert_eq!(
        points,
        vec![
            p("sensor-1", "humidity", "2026-01-01T00:00:00.000Z", 40.0),
            p("sensor-1", "temperature", "2026-01-01T00:00:00.000Z", 21.5),
            p("sensor-2", "battery", "2026-01-01T00:00:01.000Z", 0.87),
            p("sensor-2", "temperature", "2026-01-01T00:00:01.000Z", -3.25),
        ],
        "{name}: {}",
        show(&out)
    );
    let stderr = text(&out.stderr);
    for line in [
        "sensor-1: 2 points",
        "sensor-2: 2 points",
        "sensor-1: 0 points",
        "3 messages in, 4 outputs, 0 failed",
    ] {
        assert!(stderr.contains(line), "{name}: no {line:?} in\n{stderr}");
    }

    // Payloads that are not JSON objects go to the dead letters.
    std::fs::write(
        project.join("bad.jsonl"),
        concat!(
            r#"{"topic":"devices/d1/telemetry","payload":"[1,2]"}"#,
            "\n",
            r#"{"topic":"devices/d1/telemetry","payload":"{\"rpm\":1200"}"#,
            "\n",
            r#"{"topic":"devices/d1/telemetry","payload":{"rpm":1200}}"#,
            "\n",
        ),
    )
    .unwrap();
    let out = rules_test(project, &module, "bad.jsonl");
    assert_eq!(out.status.code(), Some(1), "{name}: {}", show(&out));
    let outputs: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(outputs.len(), 3, "{name}: {}", show(&out));
    for v in outputs.iter().filter(|v| v["kind"] == "dead_letter") {
        assert!(
            v["reason"]
                .as_str()
                .unwrap()
                .contains("payload is not a JSON object"),
            "{name}: {v}"
        );
    }
    let kinds: Vec<&str> = outputs
        .iter()
        .map(|v| v["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "dead_letter").count(),
        2,
        "{name}: {kinds:?}"
    );
    assert!(
        outputs
            .iter()
            .any(|v| v["kind"] == "point" && v["metric"] == "rpm" && v["value"] == 1200.0),
        "{name}: {}",
        show(&out)
    );
}

#[test]
fn c_project_builds_and_runs() {
    let tmp = tempfile::tempdir().unwrap();
    // The default directory: ./NAME.
    let out = rules_new(tmp.path(), "hello", "c", None);
    assert!(out.status.success(), "{}", show(&out));
    let stdout = text(&out.stdout);
    for line in [
        "./build.sh",
        "sluice rules test hello.wasm --input messages.jsonl --topic 'devices/+/telemetry'",
        "sluice rules deploy hello.toml",
        "hello.c",
    ] {
        assert!(stdout.contains(line), "no {line:?} in\n{stdout}");
    }
    let project = tmp.path().join("hello");
    assert_eq!(
        files_under(&project),
        [
            ".gitignore",
            "README.md",
            "build.sh",
            "hello.c",
            "hello.toml",
            "messages.jsonl",
            "sluice.h"
        ]
    );
    assert_vendored(&project, "", "c", &["sluice.h"]);
    build(&project, "hello", "apt-get install -y clang lld");
    check_hello(&project, "hello");
}

#[test]
fn assemblyscript_project_builds_and_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let project = tmp.path().join("rules").join("as-rule");
    let out = rules_new(tmp.path(), "Hello-AS", "assemblyscript", Some(&project));
    assert!(out.status.success(), "{}", show(&out));
    assert!(project.join("assembly/index.ts").is_file());
    assert_vendored(
        &project,
        "sluice-rule-sdk",
        "assemblyscript",
        &["index.ts", "assembly/index.ts", "asconfig.json"],
    );

    // npm's files agree: the pinned compiler is the SDK's, and the lock file
    // has the project's dependencies (what `npm ci` insists on).
    let json = |file: &str| -> Value { serde_json::from_str(&read(&project.join(file))).unwrap() };
    let (package, lock) = (json("package.json"), json("package-lock.json"));
    let sdk_package: Value =
        serde_json::from_str(&read(&repo().join("rules/sdk/assemblyscript/package.json"))).unwrap();
    assert_eq!(package["name"], "hello-as");
    assert_eq!(
        package["devDependencies"]["assemblyscript"],
        sdk_package["devDependencies"]["assemblyscript"]
    );
    assert_eq!(
        lock["packages"][""]["devDependencies"],
        package["devDependencies"]
    );

    build(
        &project,
        "Hello-AS",
        "Node.js 20 or newer with npm: apt-get install -y nodejs npm",
    );
    // build.sh ran `npm ci`, which refuses a lock file out of step.
    assert!(
        project
            .join("node_modules/@sluice/rule-sdk/assembly/index.ts")
            .is_file()
    );
    check_hello(&project, "Hello-AS");
}

#[test]
fn rust_project_builds_and_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let project = tmp.path().join("My-Rule_1");
    let out = rules_new(tmp.path(), "My-Rule_1", "rust", Some(&project));
    assert!(out.status.success(), "{}", show(&out));
    let sdk: Vec<String> = files_under(&repo().join("rules/sdk/rust/src"));
    let sdk: Vec<&str> = sdk.iter().map(String::as_str).collect();
    let vendored = files_under(&project.join("sluice-rule/src"));
    assert_eq!(
        vendored, sdk,
        "sluice-rule/src/ is not the SDK's src/ (list new files in src/rules_new.rs)"
    );
    assert_vendored(&project, "sluice-rule/src", "rust/src", &sdk);
    let cargo: toml::Table = read(&project.join("Cargo.toml")).parse().unwrap();
    assert_eq!(cargo["package"]["name"].as_str(), Some("My-Rule_1"));
    assert_eq!(cargo["lib"]["name"].as_str(), Some("my_rule_1"));

    build(
        &project,
        "My-Rule_1",
        "a rustc with the wasm32 target: apt-get install -y rustc libstd-rust-dev-wasm32",
    );
    check_hello(&project, "My-Rule_1");

    // It is also an ordinary cargo project: check it with the cargo running
    // these tests, for the host (its wasm32 target may not be installed),
    // offline (there is nothing to download), in its own target directory.
    // The rustc of that cargo's toolchain (rustup's proxies resolve to it),
    // whatever other rustc comes first on PATH.
    let beside_cargo = Path::new(env!("CARGO")).with_file_name("rustc");
    let rustc = if beside_cargo.is_file() {
        beside_cargo
    } else {
        PathBuf::from("rustc")
    };
    let host = Command::new(&rustc)
        .arg("-vV")
        .output()
        .expect("run rustc -vV");
    let host = text(&host.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .expect("rustc -vV names the host");
    let out = Command::new(env!("CARGO"))
        .current_dir(&project)
        .args(["check", "--offline", "--release", "--target", &host])
        .env("CARGO_TARGET_DIR", project.join("target"))
        .env("RUSTC", &rustc)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .output()
        .expect("run cargo");
    assert!(out.status.success(), "cargo check: {}", show(&out));
}

#[test]
fn invalid_names_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let long = "a".repeat(65);
    for name in [
        "1rule", "_rule", "-rule", "a b", "a.b", "a/b", "règle", &long,
    ] {
        for lang in ["c", "assemblyscript", "rust"] {
            let out = rules_new(tmp.path(), name, lang, None);
            assert!(!out.status.success(), "{name:?} {lang}: {}", show(&out));
            let stderr = text(&out.stderr);
            assert!(
                stderr.contains("invalid rule name"),
                "{name:?} {lang}: {stderr}"
            );
        }
    }
    // The SDK's crate name clashes for Rust only.
    let out = rules_new(tmp.path(), "sluice-rule", "rust", None);
    assert!(!out.status.success(), "{}", show(&out));
    assert!(text(&out.stderr).contains("clash"), "{}", show(&out));
    assert!(
        std::fs::read_dir(tmp.path()).unwrap().next().is_none(),
        "a refused name created something"
    );

    // The longest name is fine, and so is a keyword (for Rust too).
    let longest = "a".repeat(64);
    let out = rules_new(tmp.path(), &longest, "c", None);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        tmp.path()
            .join(&longest)
            .join(format!("{longest}.c"))
            .is_file()
    );
    let out = rules_new(tmp.path(), "fn", "rust", None);
    assert!(out.status.success(), "{}", show(&out));
    assert!(tmp.path().join("fn/src/lib.rs").is_file());
}

#[test]
fn existing_directories() {
    let tmp = tempfile::tempdir().unwrap();

    // Not empty: refused, and left as it was.
    let full = tmp.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("notes.txt"), "mine").unwrap();
    for lang in ["c", "assemblyscript", "rust"] {
        let out = rules_new(tmp.path(), "rule", lang, Some(&full));
        assert!(!out.status.success(), "{lang}: {}", show(&out));
        assert!(
            text(&out.stderr).contains("not empty"),
            "{lang}: {}",
            show(&out)
        );
    }
    assert_eq!(files_under(&full), ["notes.txt"]);
    assert_eq!(read(&full.join("notes.txt")), "mine");

    // The default directory ./NAME, already there with something in it.
    std::fs::create_dir(full.join("rule")).unwrap();
    std::fs::write(full.join("rule/rule.c"), "mine").unwrap();
    let out = rules_new(&full, "rule", "c", None);
    assert!(!out.status.success(), "{}", show(&out));
    assert!(text(&out.stderr).contains("not empty"), "{}", show(&out));
    assert_eq!(read(&full.join("rule/rule.c")), "mine");

    // A file: refused.
    let out = rules_new(tmp.path(), "rule", "c", Some(&full.join("notes.txt")));
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        text(&out.stderr).contains("not a directory"),
        "{}",
        show(&out)
    );

    // Empty: used.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = rules_new(tmp.path(), "rule", "c", Some(&empty));
    assert!(out.status.success(), "{}", show(&out));
    assert!(empty.join("rule.c").is_file());
    assert!(empty.join("rule.toml").is_file());

    // Creating it again over itself: refused, nothing changed.
    let before = read(&empty.join("rule.c"));
    let out = rules_new(tmp.path(), "rule", "rust", Some(&empty));
    assert!(!out.status.success(), "{}", show(&out));
    assert_eq!(read(&empty.join("rule.c")), before);
    assert!(!empty.join("Cargo.toml").exists());
}
