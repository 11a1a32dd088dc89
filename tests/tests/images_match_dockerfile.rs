//! The images `hack/images.sh` builds against the `Dockerfile` they stand in for.
//!
//! The published images come from the multi-stage `Dockerfile` (stages `operator`, `sidecar`,
//! `example`), but no machine the tests run on has Docker, so the Dockerfile itself is never built
//! here. What runs in the real-pods tier are the images `hack/images.sh` assembles from this build's
//! binaries (`qmesh/<stage>:dev`, docker-archive tars). Nothing else ties the two together, so this
//! test does: it parses the Dockerfile's final stages (the binary each COPYs from the build stage,
//! USER, ENTRYPOINT, EXPOSE, ENV, on top of what the distroless base brings), builds the images with
//! `hack/images.sh --no-import --from target/<profile>`, unpacks each tar (manifest.json, the image
//! config, layer.tar) and checks, stage by stage, that the image runs as the same user, with the same
//! entrypoint, ports, environment and working directory, holds exactly the binaries the stage COPYs
//! (byte-identical to the ones it was made from), and that the Dockerfile's `cargo build` builds
//! every one of them. A change to either file that the other does not follow fails here, naming
//! what differs. Needs root (images.sh chroots and chowns), as CI has.
//!
//! The unit tests at the bottom feed the comparison a Dockerfile with one thing changed, so a
//! comparison that cannot fail would not go unnoticed.

#![allow(clippy::unwrap_used)]

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use qmesh_tests::repo_root;
use serde_json::Value;

/// The base every final stage is built on; the `BASE_*` values are what its image config brings
/// (GoogleContainerTools/distroless, `base/base.bzl`), which images.sh writes out itself.
const BASE_IMAGE: &str = "gcr.io/distroless/cc-debian12:nonroot";
const BASE_ENV: [(&str, &str); 2] = [
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"),
];
const BASE_USER: &str = "65532";
const BASE_WORKDIR: &str = "/home/nonroot";

// ---------------------------------------------------------------------------------------------
// The Dockerfile
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Dockerfile {
    stages: Vec<Stage>,
}

#[derive(Debug, Clone, Default)]
struct Stage {
    /// `AS name`, else the stage's index (as `COPY --from=0` names it).
    name: String,
    from: String,
    /// Line of the FROM instruction.
    line: usize,
    workdir: Option<String>,
    copies: Vec<CopyInstr>,
    runs: Vec<String>,
    user: Option<String>,
    entrypoint: Option<Vec<String>>,
    /// `port/proto`, as image configs write them (`EXPOSE 7070` is `7070/tcp`).
    expose: BTreeSet<String>,
    env: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
struct CopyInstr {
    from: Option<String>,
    sources: Vec<String>,
    dest: String,
}

impl CopyInstr {
    /// Where each source lands in the image (`dest/` or several sources: a directory).
    fn placements(&self) -> Vec<(String, String)> {
        if self.sources.len() == 1 && !self.dest.ends_with('/') {
            return vec![(self.sources[0].clone(), self.dest.clone())];
        }
        self.sources
            .iter()
            .map(|src| {
                let name = src.rsplit('/').next().unwrap_or(src);
                (
                    src.clone(),
                    format!("{}/{name}", self.dest.trim_end_matches('/')),
                )
            })
            .collect()
    }
}

/// Words of a shell-form argument list; double and single quotes group, `\` escapes in `"..."`.
fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                in_word = true;
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => word.extend(chars.next()),
                        c => word.push(c),
                    }
                }
            }
            '\'' => {
                in_word = true;
                word.extend(chars.by_ref().take_while(|&c| c != '\''));
            }
            c if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        out.push(word);
    }
    out
}

impl Dockerfile {
    /// Parses the instructions this Dockerfile uses (FROM, WORKDIR, COPY, RUN, USER, ENTRYPOINT,
    /// EXPOSE, ENV), with comments and `\` continuations; any other instruction is an error, so a
    /// new one is taught to this test (and to images.sh) before it can slip past both.
    fn parse(text: &str) -> Result<Self, String> {
        // Logical lines: `\` at a line's end continues it; comment lines inside are dropped.
        let mut logical: Vec<(usize, String)> = Vec::new();
        let mut pending: Option<(usize, String)> = None;
        for (i, raw) in text.lines().enumerate() {
            let trimmed = raw.trim();
            if trimmed.starts_with('#') || trimmed.is_empty() {
                continue;
            }
            let (start, mut acc) = pending.take().unwrap_or((i + 1, String::new()));
            match trimmed.strip_suffix('\\') {
                Some(part) => {
                    acc.push_str(part);
                    acc.push(' ');
                    pending = Some((start, acc));
                }
                None => {
                    acc.push_str(trimmed);
                    logical.push((start, acc));
                }
            }
        }
        if let Some((line, _)) = pending {
            return Err(format!(
                "line {line}: the file ends inside a `\\` continuation"
            ));
        }

        let mut stages: Vec<Stage> = Vec::new();
        for (line, instr) in logical {
            let (keyword, rest) = instr
                .split_once(char::is_whitespace)
                .map(|(k, r)| (k, r.trim()))
                .unwrap_or((instr.as_str(), ""));
            let keyword = keyword.to_ascii_uppercase();
            let err = |what: &str| format!("line {line}: {keyword}: {what}");
            if keyword == "FROM" {
                let args: Vec<String> = words(rest)
                    .into_iter()
                    .filter(|w| !w.starts_with("--"))
                    .collect();
                let (from, name) = match args.as_slice() {
                    [image] => (image.clone(), stages.len().to_string()),
                    [image, as_, name] if as_.eq_ignore_ascii_case("as") => {
                        (image.clone(), name.clone())
                    }
                    _ => return Err(err("expected `FROM image [AS name]`")),
                };
                stages.push(Stage {
                    name,
                    from,
                    line,
                    ..Stage::default()
                });
                continue;
            }
            let stage = stages
                .last_mut()
                .ok_or_else(|| err("instruction before the first FROM"))?;
            match keyword.as_str() {
                "WORKDIR" => {
                    let dir = rest.to_string();
                    stage.workdir = Some(match (&stage.workdir, dir.starts_with('/')) {
                        (Some(base), false) => format!("{}/{dir}", base.trim_end_matches('/')),
                        _ => dir,
                    });
                }
                "COPY" => {
                    let mut from = None;
                    let mut args = Vec::new();
                    let mut tokens = words(rest).into_iter().peekable();
                    while let Some(flag) = tokens.next_if(|t| t.starts_with("--")) {
                        if let Some(stage) = flag.strip_prefix("--from=") {
                            from = Some(stage.to_string());
                        }
                    }
                    let remaining: Vec<String> = tokens.collect();
                    if remaining.first().is_some_and(|t| t.starts_with('[')) {
                        let json = remaining.join(" ");
                        args = serde_json::from_str::<Vec<String>>(&json)
                            .map_err(|e| err(&format!("bad JSON form {json}: {e}")))?;
                    } else {
                        args.extend(remaining);
                    }
                    let Some((dest, sources)) = args.split_last() else {
                        return Err(err("no source or destination"));
                    };
                    if sources.is_empty() {
                        return Err(err("expected `COPY [--from=stage] src... dest`"));
                    }
                    stage.copies.push(CopyInstr {
                        from,
                        sources: sources.to_vec(),
                        dest: dest.clone(),
                    });
                }
                "RUN" => stage.runs.push(rest.to_string()),
                "USER" => stage.user = Some(rest.to_string()),
                "ENTRYPOINT" => {
                    let argv = serde_json::from_str::<Vec<String>>(rest).map_err(|e| {
                        err(&format!(
                            "only the JSON (exec) form is compared, `{rest}` is not: {e}"
                        ))
                    })?;
                    stage.entrypoint = Some(argv);
                }
                "EXPOSE" => {
                    for port in words(rest) {
                        stage.expose.insert(match port.split_once('/') {
                            Some((port, proto)) => format!("{port}/{}", proto.to_lowercase()),
                            None => format!("{port}/tcp"),
                        });
                    }
                }
                "ENV" => {
                    let args = words(rest);
                    match args.first() {
                        Some(first) if first.contains('=') => {
                            for pair in &args {
                                let (name, value) = pair
                                    .split_once('=')
                                    .ok_or_else(|| err(&format!("`{pair}` is not name=value")))?;
                                stage.env.insert(name.to_string(), value.to_string());
                            }
                        }
                        // The old `ENV name value with spaces` form.
                        Some(name) => {
                            let value = rest[name.len()..].trim().to_string();
                            stage.env.insert(name.clone(), value);
                        }
                        None => return Err(err("no variable")),
                    }
                }
                other => {
                    return Err(format!(
                        "line {line}: instruction {other} is not one this test compares: teach \
                         tests/tests/images_match_dockerfile.rs (and hack/images.sh) about it"
                    ));
                }
            }
        }
        if stages.is_empty() {
            return Err("no FROM".to_string());
        }
        Ok(Self { stages })
    }

    fn stage(&self, name: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// The stages that are images, not build steps: those no other stage copies from.
    fn final_stages(&self) -> Vec<&Stage> {
        let sources: BTreeSet<&str> = self
            .stages
            .iter()
            .flat_map(|s| s.copies.iter().filter_map(|c| c.from.as_deref()))
            .collect();
        self.stages
            .iter()
            .filter(|s| !sources.contains(s.name.as_str()))
            .collect()
    }
}

/// What a stage's `cargo build` commands build.
#[derive(Debug, Default)]
struct CargoBuild {
    release: bool,
    /// `None`: every binary of the workspace (no `--bin`, or `--bins`).
    bins: Option<BTreeSet<String>>,
}

impl CargoBuild {
    fn of(stage: &Stage) -> Option<Self> {
        let mut found: Option<Self> = None;
        for run in &stage.runs {
            let tokens = words(run);
            for start in 0..tokens.len().saturating_sub(1) {
                if tokens[start] != "cargo" || tokens[start + 1] != "build" {
                    continue;
                }
                let build = found.get_or_insert_with(|| Self {
                    release: false,
                    bins: Some(BTreeSet::new()),
                });
                let mut named = BTreeSet::new();
                let mut all = false;
                let mut args = tokens[start + 2..]
                    .iter()
                    .take_while(|t| !matches!(t.as_str(), "&&" | "||" | ";" | "|"));
                while let Some(arg) = args.next() {
                    match arg.as_str() {
                        "--release" => build.release = true,
                        "--bins" => all = true,
                        "--bin" => named.extend(args.next().cloned()),
                        a => {
                            if let Some(bin) = a.strip_prefix("--bin=") {
                                named.insert(bin.to_string());
                            }
                        }
                    }
                }
                if all || named.is_empty() {
                    build.bins = None;
                } else if let Some(bins) = &mut build.bins {
                    bins.extend(named);
                }
            }
        }
        found
    }

    fn builds(&self, bin: &str) -> bool {
        self.bins.as_ref().is_none_or(|bins| bins.contains(bin))
    }
}

/// A binary a final stage COPYs out of a build stage: where it lands and the cargo binary it is.
#[derive(Debug, Clone)]
struct Installed {
    /// Absolute path in the image.
    path: String,
    /// The cargo binary's name (`target/<profile>/<bin>`).
    bin: String,
}

/// The binaries `stage` copies from its build stages, checked against what those build: each
/// source must be `<build WORKDIR>/target/<profile>/<bin>` of a `cargo build` that builds `<bin>`
/// for that profile. Problems are returned as differences.
fn installed_binaries(dockerfile: &Dockerfile, stage: &Stage) -> (Vec<Installed>, Vec<String>) {
    let mut installed = Vec::new();
    let mut problems = Vec::new();
    for copy in &stage.copies {
        let Some(from) = &copy.from else {
            problems.push(format!(
                "Dockerfile stage `{}` COPYs {:?} from the build context; only binaries from a \
                 build stage are compared",
                stage.name, copy.sources
            ));
            continue;
        };
        let Some(build_stage) = dockerfile.stage(from) else {
            problems.push(format!(
                "Dockerfile stage `{}`: COPY --from={from} names no stage",
                stage.name
            ));
            continue;
        };
        let Some(cargo) = CargoBuild::of(build_stage) else {
            problems.push(format!(
                "Dockerfile stage `{from}` runs no `cargo build`, yet stage `{}` copies {:?} \
                 from it",
                stage.name, copy.sources
            ));
            continue;
        };
        let target = format!(
            "{}/target/",
            build_stage
                .workdir
                .as_deref()
                .unwrap_or("/")
                .trim_end_matches('/')
        );
        for (source, dest) in copy.placements() {
            let Some((profile, bin)) = source
                .strip_prefix(&target)
                .and_then(|rest| rest.split_once('/'))
            else {
                problems.push(format!(
                    "Dockerfile stage `{}` copies {source}, which is not a binary under \
                     {target} of stage `{from}`",
                    stage.name
                ));
                continue;
            };
            let expected_profile = if cargo.release { "release" } else { "debug" };
            if profile != expected_profile {
                problems.push(format!(
                    "Dockerfile stage `{}` copies {source}, but stage `{from}`'s cargo build \
                     writes target/{expected_profile}",
                    stage.name
                ));
            }
            if !cargo.builds(bin) {
                problems.push(format!(
                    "Dockerfile stage `{}` copies {source}, but stage `{from}`'s cargo build \
                     does not build it (no `--bin {bin}`; it builds {:?})",
                    stage.name,
                    cargo.bins.iter().flatten().collect::<Vec<_>>()
                ));
            }
            installed.push(Installed {
                path: dest,
                bin: bin.to_string(),
            });
        }
    }
    (installed, problems)
}

// ---------------------------------------------------------------------------------------------
// The image archives
// ---------------------------------------------------------------------------------------------

/// One docker-archive image, unpacked.
#[derive(Debug, Clone, Default)]
struct Image {
    tag: String,
    user: Option<String>,
    entrypoint: Option<Vec<String>>,
    exposed_ports: BTreeSet<String>,
    env: Vec<String>,
    working_dir: Option<String>,
    /// Its layers, unpacked in order.
    rootfs: PathBuf,
}

fn tar(args: &[&std::ffi::OsStr]) {
    let out = Command::new("tar").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "tar {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Unpacks `archive` (manifest.json, the config, the layer tars) into `dir` and reads it.
fn load_image(archive: &Path, dir: &Path) -> Image {
    let unpacked = dir.join("archive");
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(&unpacked).unwrap();
    std::fs::create_dir_all(&rootfs).unwrap();
    tar(&[
        "-xf".as_ref(),
        archive.as_os_str(),
        "-C".as_ref(),
        unpacked.as_os_str(),
    ]);
    let read_json = |name: &str| -> Value {
        let text = std::fs::read_to_string(unpacked.join(name))
            .unwrap_or_else(|e| panic!("{}: {name}: {e}", archive.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {name}: {e}", archive.display()))
    };
    let manifest = read_json("manifest.json");
    let [entry] = manifest.as_array().map(Vec::as_slice).unwrap_or_default() else {
        panic!(
            "{}: manifest.json should describe one image: {manifest}",
            archive.display()
        );
    };
    let config = read_json(entry["Config"].as_str().unwrap());
    for layer in entry["Layers"].as_array().unwrap() {
        let layer = unpacked.join(layer.as_str().unwrap());
        tar(&[
            "-xf".as_ref(),
            layer.as_os_str(),
            "-C".as_ref(),
            rootfs.as_os_str(),
        ]);
        std::fs::remove_file(layer).unwrap();
    }
    let config = &config["config"];
    let strings = |v: &Value| -> Option<Vec<String>> {
        v.as_array().map(|a| {
            a.iter()
                .map(|s| s.as_str().unwrap_or_default().to_string())
                .collect()
        })
    };
    Image {
        tag: entry["RepoTags"][0]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        user: config["User"].as_str().map(str::to_string),
        entrypoint: strings(&config["Entrypoint"]),
        exposed_ports: config["ExposedPorts"]
            .as_object()
            .map(|ports| ports.keys().cloned().collect())
            .unwrap_or_default(),
        env: strings(&config["Env"]).unwrap_or_default(),
        working_dir: config["WorkingDir"]
            .as_str()
            .filter(|d| !d.is_empty())
            .map(str::to_string),
        rootfs,
    }
}

/// The image hack/images.sh builds for a Dockerfile stage.
fn image_tag(stage: &str) -> String {
    format!("qmesh/{stage}:dev")
}

/// An image config field for a message: its value, or "none" where the config has none.
fn shown<T: std::fmt::Debug>(field: &Option<T>) -> String {
    field
        .as_ref()
        .map_or_else(|| "none".to_string(), |v| format!("{v:?}"))
}

/// Whether two files hold the same bytes.
fn same_bytes(a: &Path, b: &Path) -> std::io::Result<bool> {
    if std::fs::metadata(a)?.len() != std::fs::metadata(b)?.len() {
        return Ok(false);
    }
    Ok(std::fs::read(a)? == std::fs::read(b)?)
}

// ---------------------------------------------------------------------------------------------
// The comparison
// ---------------------------------------------------------------------------------------------

/// Every way `image` differs from the Dockerfile's `stage`, one sentence each (empty: they match).
/// `binaries` is the directory the image's binaries were taken from.
fn differences(
    dockerfile: &Dockerfile,
    stage: &Stage,
    image: &Image,
    binaries: &Path,
) -> Vec<String> {
    let mut diffs = Vec::new();
    let name = &stage.name;
    let tag = &image.tag;

    if *tag != image_tag(name) {
        diffs.push(format!(
            "image tag: the image for stage `{name}` is `{tag}`, expected `{}`",
            image_tag(name)
        ));
    }
    if stage.from != BASE_IMAGE {
        diffs.push(format!(
            "FROM: stage `{name}` (line {}) is built on {}, but images.sh (and this test) \
             reproduce {BASE_IMAGE} only",
            stage.line, stage.from
        ));
    }

    let user = stage.user.as_deref().unwrap_or(BASE_USER);
    if image.user.as_deref() != Some(user) {
        diffs.push(format!(
            "USER: Dockerfile stage `{name}` runs as {user:?}, image {tag} as {}",
            shown(&image.user)
        ));
    }

    match &stage.entrypoint {
        None => diffs.push(format!("ENTRYPOINT: Dockerfile stage `{name}` has none")),
        Some(entrypoint) if image.entrypoint.as_ref() != Some(entrypoint) => {
            diffs.push(format!(
                "ENTRYPOINT: Dockerfile stage `{name}` has {entrypoint:?}, image {tag} has {}",
                shown(&image.entrypoint)
            ));
        }
        Some(_) => {}
    }

    if stage.expose != image.exposed_ports {
        diffs.push(format!(
            "EXPOSE: Dockerfile stage `{name}` exposes {:?}, image {tag} {:?} (only in the \
             Dockerfile: {:?}; only in the image: {:?})",
            stage.expose,
            image.exposed_ports,
            stage
                .expose
                .difference(&image.exposed_ports)
                .collect::<Vec<_>>(),
            image
                .exposed_ports
                .difference(&stage.expose)
                .collect::<Vec<_>>()
        ));
    }

    // ENV: the base's variables, overridden and extended by the stage's.
    let mut expected: BTreeMap<&str, &str> = BASE_ENV.into_iter().collect();
    for (k, v) in &stage.env {
        expected.insert(k, v);
    }
    let mut actual: BTreeMap<&str, &str> = BTreeMap::new();
    for pair in &image.env {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if actual.insert(k, v).is_some() {
            diffs.push(format!("ENV: image {tag} sets {k} twice"));
        }
    }
    for (k, v) in &expected {
        let whose = if stage.env.contains_key(*k) {
            format!("Dockerfile stage `{name}`")
        } else {
            format!("the base image {BASE_IMAGE}")
        };
        match actual.get(k) {
            None => diffs.push(format!(
                "ENV: {whose} sets {k}={v}, image {tag} does not set {k}"
            )),
            Some(got) if got != v => diffs.push(format!(
                "ENV: {whose} sets {k}={v}, image {tag} sets {k}={got}"
            )),
            Some(_) => {}
        }
    }
    for (k, v) in &actual {
        if !expected.contains_key(k) {
            diffs.push(format!(
                "ENV: image {tag} sets {k}={v}, which neither Dockerfile stage `{name}` nor \
                 its base sets"
            ));
        }
    }

    let workdir = stage.workdir.as_deref().unwrap_or(BASE_WORKDIR);
    if image.working_dir.as_deref() != Some(workdir) {
        diffs.push(format!(
            "WORKDIR: Dockerfile stage `{name}` works in {workdir}, image {tag} in {}",
            shown(&image.working_dir)
        ));
    }

    // The binaries: what the stage COPYs (and its build stage builds) is what the image holds.
    let (installed, problems) = installed_binaries(dockerfile, stage);
    diffs.extend(problems);
    if let Some(program) = stage.entrypoint.as_ref().and_then(|e| e.first())
        && !installed.iter().any(|i| &i.path == program)
    {
        diffs.push(format!(
            "ENTRYPOINT: Dockerfile stage `{name}` runs {program}, which no COPY of a built \
             binary puts there"
        ));
    }
    let in_image = |path: &str| image.rootfs.join(path.trim_start_matches('/'));
    for Installed { path, bin } in &installed {
        let file = in_image(path);
        let source = binaries.join(bin);
        match std::fs::symlink_metadata(&file) {
            Err(_) => diffs.push(format!(
                "binary: Dockerfile stage `{name}` puts `{bin}` at {path}, image {tag} has \
                 nothing there"
            )),
            Ok(meta) if !meta.is_file() => diffs.push(format!(
                "binary: {path} in image {tag} is not a regular file"
            )),
            Ok(meta) => {
                if meta.permissions().mode() & 0o111 == 0 {
                    diffs.push(format!("binary: {path} in image {tag} is not executable"));
                }
                match same_bytes(&file, &source) {
                    Ok(true) => {}
                    Ok(false) => diffs.push(format!(
                        "binary: {path} in image {tag} is not the bytes of {} (the binary \
                         Dockerfile stage `{name}` copies there is `{bin}`)",
                        source.display()
                    )),
                    Err(e) => diffs.push(format!(
                        "binary: cannot compare {path} in image {tag} with {}: {e}",
                        source.display()
                    )),
                }
            }
        }
    }
    // Nothing more in the directories the binaries go to than the Dockerfile puts there.
    let dirs: BTreeSet<&str> = installed
        .iter()
        .filter_map(|i| i.path.rsplit_once('/').map(|(dir, _)| dir))
        .collect();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(in_image(dir)) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = format!("{dir}/{}", entry.file_name().to_string_lossy());
            if !installed.iter().any(|i| i.path == path) {
                diffs.push(format!(
                    "binary: image {tag} holds {path}, which Dockerfile stage `{name}` does not \
                     COPY"
                ));
            }
        }
    }
    diffs
}

// ---------------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------------

/// This build's binaries: `target/<profile>`, the parent of the test executable's `deps`.
fn binaries_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("the test executable lives in target/<profile>/deps")
        .to_path_buf()
}

#[test]
fn images_sh_builds_the_images_the_dockerfile_describes() {
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid());
    assert!(
        matches!(uid, Ok(0)),
        "this test needs root (hack/images.sh chroots into each image's layer and chowns \
         /home/nonroot to 65532), but runs as uid {}; CI runs it as root",
        uid.map_or_else(|e| format!("unknown ({e})"), |u| u.to_string())
    );

    let root = repo_root();
    let text = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let dockerfile = Dockerfile::parse(&text).unwrap_or_else(|e| panic!("Dockerfile: {e}"));
    let stages = dockerfile.final_stages();
    assert!(
        !stages.is_empty(),
        "the Dockerfile has no final stage: {dockerfile:?}"
    );

    let binaries = binaries_dir();
    let mut needed: BTreeSet<String> = BTreeSet::new();
    for stage in &stages {
        needed.extend(
            installed_binaries(&dockerfile, stage)
                .0
                .into_iter()
                .map(|i| i.bin),
        );
    }
    let missing: Vec<&String> = needed
        .iter()
        .filter(|b| !binaries.join(b).is_file())
        .collect();
    assert!(
        missing.is_empty(),
        "{missing:?} not in {}: run `cargo build --workspace --bins` first (a workspace test run \
         builds them)",
        binaries.display()
    );

    let cache = tempfile::Builder::new()
        .prefix("qmesh-images-")
        .tempdir()
        .unwrap();
    let out = Command::new("bash")
        .arg(root.join("hack/images.sh"))
        .args(["--no-import", "--from"])
        .arg(&binaries)
        .env("QMESH_CACHE_DIR", cache.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "hack/images.sh --no-import --from {} failed: {}\n{}",
        binaries.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let refs: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();

    // One image per final stage, one final stage per image.
    let expected: BTreeSet<String> = stages.iter().map(|s| image_tag(&s.name)).collect();
    assert_eq!(
        refs,
        expected,
        "hack/images.sh builds {refs:?}, the Dockerfile's final stages {:?} are {expected:?}",
        stages.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    let archives = cache.path().join("image-archives");
    let mut tars: Vec<String> = std::fs::read_dir(&archives)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    tars.sort();
    let mut expected_tars: Vec<String> = expected
        .iter()
        .map(|tag| format!("{}.tar", tag.replace(['/', ':'], "_")))
        .collect();
    expected_tars.sort();
    assert_eq!(tars, expected_tars, "archives in {}", archives.display());

    let mut report = Vec::new();
    for stage in &stages {
        let tag = image_tag(&stage.name);
        let dir = cache.path().join("unpacked").join(&stage.name);
        let image = load_image(
            &archives.join(format!("{}.tar", tag.replace(['/', ':'], "_"))),
            &dir,
        );
        let diffs = differences(&dockerfile, stage, &image, &binaries);
        eprintln!(
            "stage `{}` <-> image {tag}: {} difference(s)",
            stage.name,
            diffs.len()
        );
        report.extend(
            diffs
                .into_iter()
                .map(|d| format!("stage `{}` <-> {tag}: {d}", stage.name)),
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
    assert!(
        report.is_empty(),
        "hack/images.sh and the Dockerfile disagree:\n  {}",
        report.join("\n  ")
    );
}

// ---------------------------------------------------------------------------------------------
// The comparison can fail
// ---------------------------------------------------------------------------------------------

/// A Dockerfile of the same shape as the real one (with a continuation line and comments).
const SAMPLE: &str = r#"# A sample.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked \
    # a comment inside a continuation
    --bin qmesh-sidecar --bin other

FROM gcr.io/distroless/cc-debian12:nonroot AS sidecar
COPY --from=build /src/target/release/qmesh-sidecar /usr/local/bin/qmesh-sidecar
USER 65532:65532
EXPOSE 7070 7071/tcp
ENV MALLOC_ARENA_MAX=2 QUOTED="a b"
ENTRYPOINT ["/usr/local/bin/qmesh-sidecar"]
"#;

/// The image SAMPLE's `sidecar` stage describes, with its binary, and the binary it came from.
fn sample_image() -> (tempfile::TempDir, Image, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let binaries = dir.path().join("bin");
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir_all(&binaries).unwrap();
    std::fs::create_dir_all(rootfs.join("usr/local/bin")).unwrap();
    let program = rootfs.join("usr/local/bin/qmesh-sidecar");
    std::fs::write(binaries.join("qmesh-sidecar"), b"\x7fELF sidecar").unwrap();
    std::fs::write(&program, b"\x7fELF sidecar").unwrap();
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
    let image = Image {
        tag: "qmesh/sidecar:dev".into(),
        user: Some("65532:65532".into()),
        entrypoint: Some(vec!["/usr/local/bin/qmesh-sidecar".into()]),
        exposed_ports: ["7070/tcp", "7071/tcp"].map(String::from).into(),
        env: vec![
            format!("PATH={}", BASE_ENV[0].1),
            format!("SSL_CERT_FILE={}", BASE_ENV[1].1),
            "MALLOC_ARENA_MAX=2".into(),
            "QUOTED=a b".into(),
        ],
        working_dir: Some(BASE_WORKDIR.into()),
        rootfs,
    };
    (dir, image, binaries)
}

/// The differences between SAMPLE with `edit` (from, to) applied and [`sample_image`] changed by
/// `change`.
fn sample_differences(edit: Option<(&str, &str)>, change: impl FnOnce(&mut Image)) -> Vec<String> {
    let text = match edit {
        Some((from, to)) => {
            assert!(SAMPLE.contains(from), "{from:?} not in the sample");
            SAMPLE.replace(from, to)
        }
        None => SAMPLE.to_string(),
    };
    let dockerfile = Dockerfile::parse(&text).unwrap();
    let (_dir, mut image, binaries) = sample_image();
    change(&mut image);
    let stage = dockerfile.stage("sidecar").unwrap();
    differences(&dockerfile, stage, &image, &binaries)
}

fn assert_one_difference(diffs: &[String], mentions: &[&str]) {
    assert_eq!(diffs.len(), 1, "{diffs:#?}");
    for m in mentions {
        assert!(
            diffs[0].contains(m),
            "{:?} does not mention {m:?}",
            diffs[0]
        );
    }
}

#[test]
fn the_parser_reads_stages_continuations_and_the_instructions_compared() {
    let dockerfile = Dockerfile::parse(SAMPLE).unwrap();
    let names: Vec<&str> = dockerfile.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["build", "sidecar"]);
    let final_names: Vec<&str> = dockerfile
        .final_stages()
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(final_names, ["sidecar"]);
    let cargo = CargoBuild::of(dockerfile.stage("build").unwrap()).unwrap();
    assert!(cargo.release);
    assert_eq!(
        cargo.bins,
        Some(["qmesh-sidecar", "other"].map(String::from).into())
    );
    let sidecar = dockerfile.stage("sidecar").unwrap();
    assert_eq!(sidecar.line, 9);
    assert_eq!(sidecar.user.as_deref(), Some("65532:65532"));
    assert_eq!(
        sidecar.expose,
        ["7070/tcp", "7071/tcp"].map(String::from).into()
    );
    assert_eq!(sidecar.env["QUOTED"], "a b");
    assert_eq!(sidecar.env["MALLOC_ARENA_MAX"], "2");
    let err = Dockerfile::parse("FROM scratch\nLABEL a=b\n").unwrap_err();
    assert!(err.contains("LABEL"), "{err}");
    let err = Dockerfile::parse("FROM scratch\nENTRYPOINT /bin/sh\n").unwrap_err();
    assert!(err.contains("JSON"), "{err}");
}

#[test]
fn the_real_dockerfile_parses_into_the_three_images() {
    let text = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    let dockerfile = Dockerfile::parse(&text).unwrap_or_else(|e| panic!("Dockerfile: {e}"));
    let names: Vec<&str> = dockerfile
        .final_stages()
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    // The sidecar last: what `docker build .` without `--target` builds.
    assert_eq!(names, ["example", "operator", "sidecar"]);
    for stage in dockerfile.final_stages() {
        let (installed, problems) = installed_binaries(&dockerfile, stage);
        assert!(problems.is_empty(), "{problems:#?}");
        assert_eq!(installed.len(), 1, "stage `{}`: {installed:?}", stage.name);
    }
}

#[test]
fn a_matching_image_has_no_differences() {
    let diffs = sample_differences(None, |_| {});
    assert!(diffs.is_empty(), "{diffs:#?}");
}

#[test]
fn a_different_user_is_a_difference() {
    let diffs = sample_differences(Some(("USER 65532:65532", "USER 1000:1000")), |_| {});
    assert_one_difference(&diffs, &["USER", "1000:1000", "65532:65532"]);
}

#[test]
fn a_different_entrypoint_port_or_env_is_a_difference() {
    let diffs = sample_differences(None, |image| {
        image.entrypoint = Some(vec!["/usr/local/bin/qmesh-sidecar".into(), "run".into()]);
    });
    assert_one_difference(&diffs, &["ENTRYPOINT", "run"]);
    let diffs = sample_differences(Some(("EXPOSE 7070 7071/tcp", "EXPOSE 7070 7072")), |_| {});
    assert_one_difference(&diffs, &["EXPOSE", "7072/tcp", "7071/tcp"]);
    let diffs = sample_differences(Some(("MALLOC_ARENA_MAX=2", "MALLOC_ARENA_MAX=4")), |_| {});
    assert_one_difference(&diffs, &["ENV", "MALLOC_ARENA_MAX=4", "MALLOC_ARENA_MAX=2"]);
    let diffs = sample_differences(None, |image| image.env.push("EXTRA=1".into()));
    assert_one_difference(&diffs, &["ENV", "EXTRA=1"]);
}

#[test]
fn a_binary_not_built_or_not_the_same_bytes_is_a_difference() {
    let diffs = sample_differences(Some(("--bin qmesh-sidecar ", "")), |_| {});
    assert_one_difference(&diffs, &["does not build", "--bin qmesh-sidecar"]);
    let diffs = sample_differences(None, |image| {
        std::fs::write(
            image.rootfs.join("usr/local/bin/qmesh-sidecar"),
            b"\x7fELF other",
        )
        .unwrap();
    });
    assert_one_difference(&diffs, &["not the bytes", "qmesh-sidecar"]);
    let diffs = sample_differences(None, |image| {
        std::fs::write(image.rootfs.join("usr/local/bin/extra"), b"x").unwrap();
    });
    assert_one_difference(&diffs, &["/usr/local/bin/extra", "does not"]);
}
