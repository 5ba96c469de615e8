//! The container files against what the binary accepts, without a container
//! engine: every rlsgate command line in docker-compose.yml and the Dockerfile
//! parses with the real command line (in the environment compose gives it),
//! the configuration compose mounts parses and points at the compose
//! services, the services start in an order that works, and the runtime
//! image is small, unprivileged and free of build tools.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use clap::{CommandFactory, Parser};
use rlsgate::commands::cli::Cli;
use rlsgate::config::Config;
use serde_norway::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const COMPOSE_FILE: &str = "docker-compose.yml";
const DOCKERFILE: &str = "Dockerfile";
/// Compose's stop timeout when a service sets no `stop_grace_period`.
const COMPOSE_STOP_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(path))
        .unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

// ---- the command line ------------------------------------------------------

/// A command line the binary accepted, reduced to its subcommand.
pub(crate) struct Parsed {
    pub(crate) subcommand: String,
    matches: clap::ArgMatches,
}

impl Parsed {
    /// The value of `--long` as the binary sees it: from the command line,
    /// from the environment, or its default.
    pub(crate) fn value(&self, long: &str) -> Option<String> {
        self.values(long).into_iter().next()
    }

    /// Every value of a repeatable `--long`.
    pub(crate) fn values(&self, long: &str) -> Vec<String> {
        let command = Cli::command();
        let Some(subcommand) = command.find_subcommand(&self.subcommand) else {
            return Vec::new();
        };
        let arg = subcommand
            .get_arguments()
            .find(|arg| arg.get_long() == long.strip_prefix("--"))
            .unwrap_or_else(|| panic!("`rlsgate {}` has no {long}", self.subcommand));
        self.matches
            .get_raw(arg.get_id().as_str())
            .into_iter()
            .flatten()
            .map(|v| v.to_string_lossy().into_owned())
            .collect()
    }

    pub(crate) fn required(&self, long: &str) -> String {
        self.value(long)
            .unwrap_or_else(|| panic!("`rlsgate {}` is run without {long}", self.subcommand))
    }
}

/// Serialises changes to this process's environment (see `parse_in`).
static ENV_LOCK: Mutex<()> = Mutex::new(());

/// The variables the command line reads (`#[arg(env = …)]`), in any subcommand.
fn cli_env_names() -> BTreeSet<String> {
    fn walk(command: &clap::Command, names: &mut BTreeSet<String>) {
        for arg in command.get_arguments() {
            if let Some(name) = arg.get_env() {
                names.insert(name.to_string_lossy().into_owned());
            }
        }
        for subcommand in command.get_subcommands() {
            walk(subcommand, names);
        }
    }
    let mut names = BTreeSet::new();
    walk(&Cli::command(), &mut names);
    names
}

/// Parses `argv` as the binary does in a container whose environment is
/// `env`: the variables the command line reads come from `env` alone, never
/// from the environment this test runs in.
pub(crate) fn parse_in(argv: &[String], env: &BTreeMap<String, String>) -> Result<Parsed, String> {
    let names = cli_env_names();
    let _guard = ENV_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let saved: Vec<(String, Option<OsString>)> = names
        .iter()
        .map(|name| (name.clone(), std::env::var_os(name)))
        .collect();
    for name in &names {
        // SAFETY: this test binary changes its environment only here, under
        // ENV_LOCK, and reads it only through std::env (clap does), whose
        // own lock orders those reads with these writes; nothing here reads
        // it through libc (no DNS, locale or time zone look-ups).
        unsafe {
            match env.get(name) {
                Some(value) => std::env::set_var(name, value),
                None => std::env::remove_var(name),
            }
        }
    }
    let accepted = Cli::try_parse_from(argv).map(drop);
    let matches = Cli::command().try_get_matches_from(argv);
    for (name, value) in saved {
        // SAFETY: as above.
        unsafe {
            match value {
                Some(value) => std::env::set_var(&name, value),
                None => std::env::remove_var(&name),
            }
        }
    }
    accepted.map_err(|e| e.render().to_string())?;
    let matches = matches.map_err(|e| e.render().to_string())?;
    let (subcommand, matches) = matches.subcommand().ok_or("no subcommand")?;
    Ok(Parsed {
        subcommand: subcommand.to_owned(),
        matches: matches.clone(),
    })
}

pub(crate) fn is_rlsgate_program(word: &str) -> bool {
    word.rsplit('/').next() == Some("rlsgate")
}

// ---- shell words -----------------------------------------------------------

/// Splits a shell script into its simple commands (at `;`, `&&`, `||`, `|`,
/// `&` and newlines), each as words with quotes removed. Enough for the
/// one-line scripts of a compose file; expansions stay as written.
fn shell_commands(script: &str) -> Vec<Vec<String>> {
    let mut commands = Vec::new();
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = script.chars().peekable();
    let end_word = |word: &mut String, in_word: &mut bool, words: &mut Vec<String>| {
        if *in_word {
            words.push(std::mem::take(word));
            *in_word = false;
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    word.push(c);
                }
            }
            '"' => {
                in_word = true;
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' if matches!(chars.peek(), Some('"' | '\\' | '$' | '`')) => {
                            word.extend(chars.next());
                        }
                        c => word.push(c),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some('\n') | None => {}
                    Some(c) => word.push(c),
                }
            }
            '#' if !in_word => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
                end_word(&mut word, &mut in_word, &mut words);
                commands.push(std::mem::take(&mut words));
            }
            ';' | '&' | '|' | '\n' => {
                end_word(&mut word, &mut in_word, &mut words);
                commands.push(std::mem::take(&mut words));
            }
            c if c.is_whitespace() => end_word(&mut word, &mut in_word, &mut words),
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    end_word(&mut word, &mut in_word, &mut words);
    commands.push(words);
    commands.retain(|command| !command.is_empty());
    commands
}

/// The `rlsgate …` command lines in a shell script, after any `exec`,
/// keyword or variable assignment that starts their simple command.
fn rlsgate_commands_in_script(script: &str) -> Vec<Vec<String>> {
    const PREFIXES: &[&str] = &[
        "exec", "if", "then", "else", "elif", "do", "while", "until", "!", "time", "command",
    ];
    shell_commands(script)
        .into_iter()
        .filter_map(|words| {
            let start = words.iter().position(|word| {
                let assignment = word.split_once('=').is_some_and(|(name, _)| {
                    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                });
                !assignment && !PREFIXES.contains(&word.as_str())
            })?;
            is_rlsgate_program(&words[start]).then(|| words[start..].to_vec())
        })
        .collect()
}

// ---- docker-compose.yml ----------------------------------------------------

/// Compose's variable substitution, with each variable's default in place
/// of the caller's environment (a placeholder when it has none): what
/// `docker compose up` does with nothing set.
fn interpolate(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(dollar) = rest.find('$') {
        out.push_str(&rest[..dollar]);
        let after = &rest[dollar + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body
                .find('}')
                .unwrap_or_else(|| panic!("unclosed ${{ in {text:?}"));
            out.push_str(&substitute(&body[..end]));
            rest = &body[end + 1..];
        } else {
            let len = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            if len == 0 {
                out.push('$');
            } else {
                out.push_str(&placeholder(&after[..len]));
            }
            rest = &after[len..];
        }
    }
    out.push_str(rest);
    out
}

/// `${NAME}`, `${NAME:-default}`, `${NAME-default}`, `${NAME:?message}`, … for an unset NAME.
fn substitute(expression: &str) -> String {
    let name_len = expression
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(expression.len());
    let (name, operation) = expression.split_at(name_len);
    let operation = operation.strip_prefix(':').unwrap_or(operation);
    if let Some(default) = operation.strip_prefix('-') {
        interpolate(default)
    } else if operation.starts_with('+') {
        String::new()
    } else {
        placeholder(name)
    }
}

fn placeholder(name: &str) -> String {
    format!(
        "placeholder-{}",
        name.to_ascii_lowercase().replace('_', "-")
    )
}

fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(interpolate(s)),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

struct Compose {
    services: BTreeMap<String, Value>,
}

fn compose() -> Compose {
    let document: Value =
        serde_norway::from_str(&read(COMPOSE_FILE)).expect("docker-compose.yml is YAML");
    let services = document
        .get("services")
        .and_then(Value::as_mapping)
        .expect("docker-compose.yml has services");
    let services = services
        .iter()
        .map(|(name, service)| {
            let name = name.as_str().expect("service names are strings").to_owned();
            (name, service.clone())
        })
        .collect();
    Compose { services }
}

impl Compose {
    fn service(&self, name: &str) -> &Value {
        self.services
            .get(name)
            .unwrap_or_else(|| panic!("docker-compose.yml has no service {name:?}"))
    }

    fn rlsgate_services(&self) -> impl Iterator<Item = (&String, &Value)> {
        self.services
            .iter()
            .filter(|(_, service)| uses_rlsgate_image(service))
    }

    /// Every rlsgate command line of the rlsgate services, parsed in its
    /// service's environment; panics naming each one the binary refuses.
    fn invocations(&self) -> Vec<(String, Parsed)> {
        let image = image();
        let mut parsed = Vec::new();
        let mut refused = Vec::new();
        for (name, service) in self.rlsgate_services() {
            let env = environment(service);
            let invocations = rlsgate_invocations(service, &image);
            assert!(
                !invocations.is_empty(),
                "service {name} uses the rlsgate image but runs no rlsgate command"
            );
            for argv in invocations {
                match parse_in(&argv, &env) {
                    Ok(p) => parsed.push((name.clone(), p)),
                    Err(e) => refused.push(format!("service {name}: {argv:?}\n{e}")),
                }
            }
        }
        assert!(
            refused.is_empty(),
            "the binary refuses these command lines of {COMPOSE_FILE}:\n\n{}",
            refused.join("\n")
        );
        parsed
    }

    /// The one service running `rlsgate <subcommand>`, and that command line.
    fn running(&self, subcommand: &str) -> (String, Parsed) {
        let mut found: Vec<_> = self
            .invocations()
            .into_iter()
            .filter(|(_, parsed)| parsed.subcommand == subcommand)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "{COMPOSE_FILE} should run `rlsgate {subcommand}` in exactly one service"
        );
        found.pop().unwrap()
    }

    /// The proxy's configuration as the `serve` service reads it.
    fn proxy_config(&self) -> (String, Config) {
        let (name, serve) = self.running("serve");
        let service = self.service(&name);
        let path = serve.required("--config");
        let text = read(&mounted_file(service, &path));
        let env = environment(service);
        let config = Config::parse_with_env(&text, |var| env.get(var).cloned())
            .unwrap_or_else(|e| panic!("the configuration service {name} reads ({path}): {e:#}"));
        (name, config)
    }

    /// `(service, condition)` for each service `name` waits for.
    fn depends_on(&self, name: &str) -> Vec<(String, String)> {
        match self.service(name).get("depends_on") {
            None => Vec::new(),
            Some(Value::Sequence(names)) => names
                .iter()
                .map(|n| (scalar(n).unwrap(), "service_started".to_owned()))
                .collect(),
            Some(Value::Mapping(entries)) => entries
                .iter()
                .map(|(n, entry)| {
                    let condition = entry
                        .get("condition")
                        .and_then(scalar)
                        .unwrap_or_else(|| "service_started".to_owned());
                    (scalar(n).unwrap(), condition)
                })
                .collect(),
            Some(other) => panic!("service {name}: depends_on {other:?}"),
        }
    }

    /// Whether `from` starts only once `to` has met `condition`, directly or
    /// through services in between.
    fn waits_for(&self, from: &str, to: &str, condition: &str) -> bool {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.to_owned()];
        while let Some(current) = stack.pop() {
            if !seen.insert(current.clone()) {
                continue;
            }
            for (dependency, how) in self.depends_on(&current) {
                if dependency == to && how == condition {
                    return true;
                }
                stack.push(dependency);
            }
        }
        false
    }
}

fn uses_rlsgate_image(service: &Value) -> bool {
    let context = match service.get("build") {
        Some(Value::String(context)) => Some(context.as_str()),
        Some(build) => build.get("context").and_then(Value::as_str),
        None => None,
    };
    let built_here = context.is_some_and(|c| matches!(c.trim_end_matches('/'), "." | ""));
    let image = service.get("image").and_then(Value::as_str).unwrap_or("");
    built_here || image == "rlsgate" || image.starts_with("rlsgate:")
}

/// `command` or `entrypoint`: a list, or a string compose splits into words.
fn words(value: Option<&Value>) -> Option<Vec<String>> {
    match value? {
        Value::Sequence(items) => Some(items.iter().map(|v| scalar(v).unwrap()).collect()),
        Value::String(line) => Some(shell_commands(&interpolate(line)).concat()),
        Value::Null => None,
        other => panic!("unexpected command {other:?}"),
    }
}

/// The rlsgate command lines a service runs: its command after the image's
/// entrypoint, or after its own; or each `rlsgate …` of a `sh -c` script.
fn rlsgate_invocations(service: &Value, image: &Image) -> Vec<Vec<String>> {
    let command = words(service.get("command"));
    let argv = match words(service.get("entrypoint")) {
        // Compose drops the image's CMD when the entrypoint is overridden.
        Some(entrypoint) => [entrypoint, command.unwrap_or_default()].concat(),
        None => [
            image.entrypoint.clone(),
            command.unwrap_or(image.cmd.clone()),
        ]
        .concat(),
    };
    let shell = argv
        .first()
        .is_some_and(|program| matches!(program.rsplit('/').next(), Some("sh" | "bash" | "dash")));
    if shell {
        let script = argv
            .iter()
            .position(|arg| arg == "-c")
            .and_then(|c| argv.get(c + 1))
            .expect("a shell entrypoint runs a script with -c");
        rlsgate_commands_in_script(script)
    } else if argv
        .first()
        .is_some_and(|program| is_rlsgate_program(program))
    {
        vec![argv]
    } else {
        Vec::new()
    }
}

/// A service's environment as compose sets it with nothing in the caller's.
fn environment(service: &Value) -> BTreeMap<String, String> {
    match service.get("environment") {
        None => BTreeMap::new(),
        Some(Value::Mapping(entries)) => entries
            .iter()
            .filter_map(|(name, value)| Some((scalar(name)?, scalar(value).unwrap_or_default())))
            .collect(),
        Some(Value::Sequence(entries)) => entries
            .iter()
            .filter_map(|entry| {
                let entry = scalar(entry)?;
                let (name, value) = entry.split_once('=')?;
                Some((name.to_owned(), value.to_owned()))
            })
            .collect(),
        Some(other) => panic!("unexpected environment {other:?}"),
    }
}

struct Mount {
    /// A named volume, or a host path relative to the compose file.
    source: String,
    named: bool,
    target: String,
}

fn mounts(service: &Value) -> Vec<Mount> {
    let Some(Value::Sequence(entries)) = service.get("volumes") else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|entry| {
            let (source, target) = match entry {
                Value::String(short) => {
                    let short = interpolate(short);
                    let mut parts = short.split(':');
                    let source = parts.next()?.to_owned();
                    (source, parts.next()?.to_owned())
                }
                long => (
                    long.get("source").and_then(scalar)?,
                    long.get("target").and_then(scalar)?,
                ),
            };
            let named = !source.starts_with(['.', '/', '~']);
            Some(Mount {
                source,
                named,
                target,
            })
        })
        .collect()
}

/// The file of this repository that a service sees at `container_path`.
fn mounted_file(service: &Value, container_path: &str) -> String {
    mounts(service)
        .into_iter()
        .filter(|mount| !mount.named)
        .find_map(|mount| {
            let rest = container_path.strip_prefix(mount.target.trim_end_matches('/'))?;
            let source = mount.source.trim_start_matches("./").trim_end_matches('/');
            match rest {
                "" => Some(source.to_owned()),
                rest if rest.starts_with('/') => Some(format!("{source}{rest}")),
                _ => None,
            }
        })
        .unwrap_or_else(|| panic!("nothing of this repository is mounted at {container_path}"))
}

/// The named volume mounted at `dir` (or a parent of it).
fn volume_at(service: &Value, dir: &str) -> Option<String> {
    mounts(service)
        .into_iter()
        .filter(|mount| mount.named)
        .find(|mount| {
            let target = mount.target.trim_end_matches('/');
            dir == target || dir.starts_with(&format!("{target}/"))
        })
        .map(|mount| mount.source)
}

struct Published {
    host_ip: Option<String>,
    host_port: Option<u16>,
    container_port: u16,
}

fn published_ports(service: &Value) -> Vec<Published> {
    let Some(Value::Sequence(entries)) = service.get("ports") else {
        return Vec::new();
    };
    entries
        .iter()
        .map(|entry| match entry {
            Value::Mapping(_) => Published {
                host_ip: entry.get("host_ip").and_then(scalar),
                host_port: entry
                    .get("published")
                    .and_then(scalar)
                    .and_then(|p| p.parse().ok()),
                container_port: entry
                    .get("target")
                    .and_then(scalar)
                    .unwrap()
                    .parse()
                    .unwrap(),
            },
            short => {
                let short = scalar(short).unwrap();
                let short = short.split('/').next().unwrap();
                let parts: Vec<&str> = short.split(':').collect();
                Published {
                    host_ip: (parts.len() == 3).then(|| parts[0].to_owned()),
                    host_port: (parts.len() >= 2).then(|| parts[parts.len() - 2].parse().unwrap()),
                    container_port: parts.last().unwrap().parse().unwrap(),
                }
            }
        })
        .collect()
}

// ---- Dockerfile ------------------------------------------------------------

struct Instruction {
    keyword: String,
    args: String,
}

struct Stage {
    base: String,
    instructions: Vec<Instruction>,
}

/// The Dockerfile's stages, with continuation lines joined and comments dropped.
fn dockerfile() -> Vec<Stage> {
    let text = read(DOCKERFILE);
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                logical.push(std::mem::take(&mut current));
            }
        }
    }
    assert!(
        current.is_empty(),
        "the Dockerfile ends inside a continuation"
    );
    let mut stages: Vec<Stage> = Vec::new();
    for line in logical {
        let (keyword, args) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
        let keyword = keyword.to_ascii_uppercase();
        let args = args.trim().to_owned();
        if keyword == "FROM" {
            let base = args
                .split_whitespace()
                .find(|word| !word.starts_with("--"))
                .expect("FROM names an image")
                .to_owned();
            stages.push(Stage {
                base,
                instructions: Vec::new(),
            });
        } else {
            stages
                .last_mut()
                .expect("the Dockerfile starts with FROM")
                .instructions
                .push(Instruction { keyword, args });
        }
    }
    stages
}

impl Stage {
    fn all<'a>(&'a self, keyword: &str) -> impl Iterator<Item = &'a str> + use<'a> {
        let keyword = keyword.to_owned();
        self.instructions
            .iter()
            .filter(move |instruction| instruction.keyword == keyword)
            .map(|instruction| instruction.args.as_str())
    }

    fn last(&self, keyword: &str) -> Option<&str> {
        self.all(keyword).last()
    }
}

/// What the final stage runs, as a container of the image starts.
pub(crate) struct Image {
    pub(crate) entrypoint: Vec<String>,
    pub(crate) cmd: Vec<String>,
    pub(crate) user: Option<String>,
    pub(crate) env: BTreeMap<String, String>,
}

fn exec_form(keyword: &str, args: &str) -> Vec<String> {
    serde_json::from_str(args).unwrap_or_else(|_| {
        panic!("{keyword} {args} is not in exec form (a JSON array); a shell form would not pass signals on")
    })
}

pub(crate) fn image() -> Image {
    let stages = dockerfile();
    let last = stages.last().expect("the Dockerfile has a stage");
    let entrypoint = last
        .last("ENTRYPOINT")
        .expect("the final stage sets ENTRYPOINT");
    let cmd = last.last("CMD").expect("the final stage sets CMD");
    let env = last
        .all("ENV")
        .filter_map(|args| {
            let (name, value) = args.split_once(['=', ' '])?;
            Some((name.to_owned(), value.trim_matches('"').to_owned()))
        })
        .collect();
    Image {
        entrypoint: exec_form("ENTRYPOINT", entrypoint),
        cmd: exec_form("CMD", cmd),
        user: last.last("USER").map(str::to_owned),
        env,
    }
}

/// The image's default command line, as the binary parses it.
pub(crate) fn image_default_command() -> Parsed {
    let image = image();
    let argv = [image.entrypoint.clone(), image.cmd.clone()].concat();
    assert!(
        argv.first()
            .is_some_and(|program| is_rlsgate_program(program)),
        "the image runs {argv:?}, not rlsgate"
    );
    parse_in(&argv, &image.env)
        .unwrap_or_else(|e| panic!("the image's ENTRYPOINT and CMD {argv:?} are refused:\n{e}"))
}

/// `*` and `?` within one path segment, as .dockerignore patterns match.
fn glob(pattern: &str, text: &str) -> bool {
    fn go(p: &[u8], t: &[u8]) -> bool {
        match (p.first(), t.first()) {
            (None, None) => true,
            (Some(b'*'), _) => {
                go(&p[1..], t) || (t.first().is_some_and(|&c| c != b'/') && go(p, &t[1..]))
            }
            (Some(b'?'), Some(&c)) if c != b'/' => go(&p[1..], &t[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &t[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), text.as_bytes())
}

/// Whether .dockerignore leaves `path` (relative to the context) in the build context.
fn in_build_context(path: &str) -> bool {
    let ignore = std::fs::read_to_string(Path::new(ROOT).join(".dockerignore")).unwrap_or_default();
    let mut included = true;
    for line in ignore.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (negated, pattern) = match line.strip_prefix('!') {
            Some(pattern) => (true, pattern),
            None => (false, line),
        };
        let pattern = pattern.trim_start_matches("./").trim_matches('/');
        // A pattern matches the path or any directory above it.
        let mut prefixes = path
            .match_indices('/')
            .map(|(i, _)| &path[..i])
            .collect::<Vec<_>>();
        prefixes.push(path);
        if prefixes.iter().any(|prefix| glob(pattern, prefix)) {
            included = negated;
        }
    }
    included
}

fn files_under(path: &Path, out: &mut Vec<String>) {
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            files_under(&entry.unwrap().path(), out);
        }
    } else {
        let relative = path.strip_prefix(ROOT).unwrap();
        out.push(relative.to_string_lossy().into_owned());
    }
}

/// Words of a Dockerfile line, split at anything but the characters of
/// program and package names.
fn name_words(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.' | '_')))
        .filter(|word| !word.is_empty())
}

/// The `docker compose exec [OPTIONS] SERVICE rlsgate …` lines that the
/// compose file's comments show, as (service, command line).
fn documented_exec_commands() -> Vec<(String, Vec<String>)> {
    const OPTIONS_WITH_VALUES: &[&str] =
        &["-e", "--env", "-u", "--user", "-w", "--workdir", "--index"];
    read(COMPOSE_FILE)
        .lines()
        .filter_map(|line| line.trim_start().strip_prefix('#'))
        .filter_map(|comment| {
            let (before, rest) = comment.split_once("docker compose exec ")?;
            // In `$(docker compose exec …)`, the command ends at the closing parenthesis.
            let rest = match before.ends_with("$(") {
                true => &rest[..rest.rfind(')').expect("$( is closed")],
                false => rest,
            };
            let words = shell_commands(rest).concat();
            let mut i = 0;
            while words[i].starts_with('-') {
                i += if OPTIONS_WITH_VALUES.contains(&words[i].as_str()) {
                    2
                } else {
                    1
                };
            }
            Some((words[i].clone(), words[i + 1..].to_vec()))
        })
        .collect()
}

// ---- the compose file -------------------------------------------------------

#[test]
fn every_rlsgate_command_in_the_compose_file_is_accepted_by_the_cli() {
    let compose = compose();
    assert!(
        compose.rlsgate_services().count() > 0,
        "no service of {COMPOSE_FILE} uses the rlsgate image"
    );
    compose.invocations();
}

#[test]
fn compose_generates_a_key_serves_the_issuer_installs_schema_auth_and_runs_the_proxy() {
    let subcommands: BTreeSet<String> = compose()
        .invocations()
        .into_iter()
        .map(|(_, parsed)| parsed.subcommand)
        .collect();
    for expected in ["keygen", "issuer", "init-db", "serve"] {
        assert!(
            subcommands.contains(expected),
            "{COMPOSE_FILE} runs no `rlsgate {expected}` (it runs {subcommands:?})"
        );
    }
}

#[test]
fn the_issuer_reads_the_key_the_keys_service_writes_once() {
    let compose = compose();
    let (keys, keygen) = compose.running("keygen");
    let (issuer, serving) = compose.running("issuer");
    let out = keygen.required("--out");
    let key = format!("{}/issuer.pem", out.trim_end_matches('/'));
    assert_eq!(serving.required("--key"), key, "the issuer's --key");

    let written_to = volume_at(compose.service(&keys), &out)
        .unwrap_or_else(|| panic!("service {keys} writes {out} into no named volume"));
    let read_from = volume_at(compose.service(&issuer), &key);
    assert_eq!(
        read_from.as_deref(),
        Some(written_to.as_str()),
        "the volume holding {key}"
    );

    // keygen refuses to overwrite a key, so a second `docker compose up`
    // must skip it: the script tests for the key before running keygen.
    let script = words(compose.service(&keys).get("command"))
        .unwrap_or_default()
        .concat();
    let guarded = [format!("test -f {key}"), format!("[ -f {key} ]")]
        .iter()
        .any(|guard| script.contains(&format!("{guard} ||")));
    assert!(
        guarded,
        "service {keys} runs keygen even when {key} exists: {script:?}"
    );
}

#[test]
fn the_proxy_trusts_the_issuer_service_at_its_compose_address() {
    let compose = compose();
    let (issuer, serving) = compose.running("issuer");
    let (_, config) = compose.proxy_config();
    let url = serving.required("--issuer");
    let issuers: Vec<&str> = config.providers.iter().map(|p| p.issuer.as_str()).collect();
    assert!(
        issuers.contains(&url.as_str()),
        "the issuer service is {url}, the configuration trusts {issuers:?}"
    );

    let parsed = url::Url::parse(&url).unwrap();
    assert_eq!(
        parsed.host_str(),
        Some(issuer.as_str()),
        "the issuer URL's host"
    );
    let listen: SocketAddr = serving.required("--listen").parse().unwrap();
    assert_eq!(
        parsed.port_or_known_default(),
        Some(listen.port()),
        "the issuer URL's port"
    );
    assert!(
        listen.ip().is_unspecified(),
        "the issuer listens on {listen}, out of reach of the other containers"
    );
}

#[test]
fn the_mounted_configuration_is_valid_in_the_proxy_service_environment() {
    let (_, config) = compose().proxy_config();
    assert!(!config.roles.is_empty());
}

#[test]
fn the_proxy_reaches_postgres_by_its_service_name_and_port() {
    let compose = compose();
    let (_, config) = compose.proxy_config();
    let postgres = compose.service(&config.upstream.host);
    let image = postgres.get("image").and_then(scalar).unwrap_or_default();
    assert!(
        image.starts_with("postgres:"),
        "upstream host {:?} is the service of {image:?}, not a postgres image",
        config.upstream.host
    );
    assert_eq!(
        config.upstream.port, 5432,
        "the postgres image listens on 5432"
    );
}

#[test]
fn the_proxy_listens_on_its_published_port_and_on_host_loopback_only_without_tls() {
    let compose = compose();
    let (proxy, config) = compose.proxy_config();
    let listen = config.listen.address;
    assert!(
        listen.ip().is_unspecified(),
        "the proxy listens on {listen}: the published port would not reach it"
    );
    let published = published_ports(compose.service(&proxy));
    let port = published
        .iter()
        .find(|p| p.container_port == listen.port())
        .unwrap_or_else(|| panic!("service {proxy} does not publish port {}", listen.port()));
    if config.listen.tls_cert.is_none() {
        assert!(config.listen.allow_plaintext_tokens);
        assert_eq!(
            port.host_ip.as_deref(),
            Some("127.0.0.1"),
            "tokens reach the proxy in plaintext: publish its port on the host's loopback only"
        );
    }
}

#[test]
fn init_db_registers_the_key_the_proxy_signs_with_in_the_proxy_database() {
    let compose = compose();
    let (init_db, installing) = compose.running("init-db");
    let (_, config) = compose.proxy_config();

    let key = match installing.value("--signing-key") {
        Some(text) => rlsgate::auth::claims::SigningKey::from_base64(&text).unwrap(),
        None => {
            let path = installing.required("--config");
            let service = compose.service(&init_db);
            let env = environment(service);
            Config::parse_with_env(&read(&mounted_file(service, &path)), |v| {
                env.get(v).cloned()
            })
            .unwrap()
            .claims
            .signing_key
        }
    };
    assert_eq!(
        key.bytes(),
        config.claims.signing_key.bytes(),
        "init-db registers another key than the proxy signs with"
    );

    let url = url::Url::parse(&installing.required("--database-url")).unwrap();
    let postgres = environment(compose.service(&config.upstream.host));
    assert_eq!(
        url.host_str(),
        Some(config.upstream.host.as_str()),
        "init-db's host"
    );
    assert_eq!(url.port_or_known_default(), Some(config.upstream.port));
    assert_eq!(url.username(), "postgres", "init-db runs as the superuser");
    assert_eq!(
        url.password(),
        postgres.get("POSTGRES_PASSWORD").map(String::as_str)
    );
    assert_eq!(
        Some(url.path().trim_start_matches('/')),
        postgres.get("POSTGRES_DB").map(String::as_str),
        "init-db installs schema auth in the database the image creates"
    );
}

#[test]
fn the_claims_key_comes_from_the_environment_with_a_development_default() {
    let text = read(COMPOSE_FILE);
    let compose = compose();
    for (name, service) in compose.rlsgate_services() {
        let Some(raw) = service
            .get("environment")
            .and_then(|env| env.get("RLSGATE_CLAIMS_KEY"))
        else {
            continue;
        };
        let raw = raw.as_str().unwrap();
        assert!(
            raw.starts_with("${RLSGATE_CLAIMS_KEY:-"),
            "service {name} takes RLSGATE_CLAIMS_KEY as {raw:?}, not from the environment"
        );
    }
    assert!(
        text.to_lowercase().contains("development key"),
        "{COMPOSE_FILE} should say that its default claims key is for development only"
    );
}

#[test]
fn services_start_in_an_order_that_works() {
    let compose = compose();
    let (keys, _) = compose.running("keygen");
    let (issuer, _) = compose.running("issuer");
    let (init_db, _) = compose.running("init-db");
    let (proxy, config) = compose.proxy_config();
    let postgres = config.upstream.host.clone();
    let sample = compose
        .services
        .iter()
        .find(|(_, service)| {
            mounts(service)
                .iter()
                .any(|m| m.source.ends_with("deploy/compose/sample.sql"))
        })
        .map(|(name, _)| name.clone())
        .expect("a service runs deploy/compose/sample.sql");

    let completed = "service_completed_successfully";
    let required = [
        (
            &issuer,
            &keys,
            completed,
            "the issuer needs the generated key",
        ),
        (
            &init_db,
            &postgres,
            "service_healthy",
            "init-db connects to postgres",
        ),
        (
            &sample,
            &init_db,
            completed,
            "the sample schema calls auth.user_id()",
        ),
        (
            &proxy,
            &init_db,
            completed,
            "sessions need schema auth and the key",
        ),
        (
            &proxy,
            &sample,
            completed,
            "the proxy logs in as the sample roles",
        ),
        (
            &proxy,
            &issuer,
            "service_started",
            "the proxy fetches the issuer's keys",
        ),
    ];
    for (from, to, condition, why) in required {
        assert!(
            compose.waits_for(from, to, condition)
                || (condition == "service_started"
                    && (compose.waits_for(from, to, "service_healthy")
                        || compose.waits_for(from, to, completed))),
            "{from} should wait for {to} ({condition}): {why}"
        );
    }

    for name in compose.services.keys() {
        for (dependency, condition) in compose.depends_on(name) {
            assert!(
                compose.services.contains_key(&dependency),
                "{name} depends on an unknown service {dependency}"
            );
            assert!(
                ["service_started", "service_healthy", completed].contains(&condition.as_str()),
                "{name} waits for {dependency} on an unknown condition {condition}"
            );
            if condition == "service_healthy" {
                assert!(
                    compose.service(&dependency).get("healthcheck").is_some(),
                    "{name} waits for {dependency} to be healthy, which has no healthcheck"
                );
            }
        }
    }
}

#[test]
fn postgres_counts_as_healthy_only_once_it_accepts_tcp_connections() {
    let compose = compose();
    let (_, config) = compose.proxy_config();
    let postgres = compose.service(&config.upstream.host);
    let test = postgres
        .get("healthcheck")
        .and_then(|check| words(check.get("test")))
        .expect("postgres has a healthcheck");
    let test = match test.first().map(String::as_str) {
        Some("CMD") => test[1..].to_vec(),
        Some("CMD-SHELL") => shell_commands(&test[1..].join(" ")).concat(),
        _ => panic!("healthcheck test {test:?}"),
    };
    assert!(
        test.iter().any(|w| w == "pg_isready"),
        "healthcheck {test:?}"
    );
    // The image initialises a new database on a server that listens on the
    // Unix socket only; a socket check would pass before the real start.
    let host = test
        .iter()
        .position(|w| w == "-h" || w == "--host")
        .and_then(|i| test.get(i + 1).cloned())
        .or_else(|| {
            test.iter()
                .find_map(|w| w.strip_prefix("--host=").map(str::to_owned))
        });
    assert!(
        host.is_some_and(|h| !h.starts_with('/')),
        "pg_isready should check over TCP (--host 127.0.0.1): {test:?}"
    );
}

#[test]
fn the_sample_schema_creates_the_roles_the_proxy_logs_in_as() {
    let (_, config) = compose().proxy_config();
    let sql = read("deploy/compose/sample.sql");
    for role in &config.roles {
        if let Some(password) = &role.upstream_password {
            let create = format!(
                "create role {} login password '{}'",
                role.upstream_user(),
                password.as_str()
            );
            assert!(
                sql.contains(&create),
                "deploy/compose/sample.sql lacks `{create}`"
            );
        }
    }
}

/// SQL without `--` comments, whitespace collapsed, one entry per statement.
fn sql_statements(sql: &str) -> Vec<String> {
    let without_comments: String = sql
        .lines()
        .map(|line| line.split("--").next().unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    without_comments
        .split(';')
        .map(|statement| statement.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|statement| !statement.is_empty())
        .collect()
}

#[test]
fn the_compose_sample_schema_is_the_demo_schema_made_rerunnable() {
    let compose_sql = sql_statements(&read("deploy/compose/sample.sql")).join(";\n");
    for statement in sql_statements(&read("src/dev/sample.sql")) {
        let rerunnable = statement.replace("create table ", "create table if not exists ");
        assert!(
            compose_sql.contains(&rerunnable),
            "deploy/compose/sample.sql lacks `{rerunnable}` of src/dev/sample.sql"
        );
        if let Some(rest) = statement.strip_prefix("create policy ") {
            let mut words = rest.split(' ');
            let (name, table) = (words.next().unwrap(), words.nth(1).unwrap());
            let drop = format!("drop policy if exists {name} on {table}");
            assert!(
                compose_sql.contains(&drop),
                "a second run fails without `{drop}`"
            );
        }
        if let Some(rest) = statement.strip_prefix("create role ") {
            let name = rest.split(' ').next().unwrap();
            let guard = format!("if not exists (select from pg_roles where rolname = '{name}')");
            assert!(
                compose_sql.contains(&guard),
                "a second run fails without `{guard}`"
            );
        }
    }
}

#[test]
fn compose_gives_the_proxy_longer_to_stop_than_its_shutdown_drain() {
    let compose = compose();
    let (proxy, config) = compose.proxy_config();
    let grace = compose
        .service(&proxy)
        .get("stop_grace_period")
        .and_then(scalar)
        .map(|text| humantime::parse_duration(&text).unwrap())
        .unwrap_or(COMPOSE_STOP_TIMEOUT);
    assert!(
        config.listen.shutdown_drain < grace,
        "compose kills the proxy after {grace:?}, before its shutdown_drain of {:?} ends",
        config.listen.shutdown_drain
    );
}

#[test]
fn the_documented_token_command_mints_a_token_the_proxy_accepts() {
    let compose = compose();
    let (_, config) = compose.proxy_config();
    let (_, issuer) = compose.running("issuer");
    let mut minted = 0;
    for (service, argv) in documented_exec_commands() {
        assert!(
            is_rlsgate_program(&argv[0]),
            "{COMPOSE_FILE} shows `docker compose exec {service} {}`",
            argv.join(" ")
        );
        let env = environment(compose.service(&service));
        let parsed = parse_in(&argv, &env)
            .unwrap_or_else(|e| panic!("the documented {argv:?} is refused:\n{e}"));
        if parsed.subcommand != "token" {
            continue;
        }
        minted += 1;
        let key = parsed.required("--key");
        assert_eq!(
            key,
            issuer.required("--key"),
            "it signs with another key than the issuer publishes"
        );
        assert!(
            volume_at(compose.service(&service), &key).is_some(),
            "service {service} has no {key}"
        );
        let iss = parsed.required("--issuer");
        let provider = config
            .providers
            .iter()
            .find(|p| p.issuer == iss)
            .unwrap_or_else(|| panic!("the proxy trusts no issuer {iss}"));
        if !provider.audience.is_empty() {
            let aud = parsed.values("--aud");
            assert!(
                aud.iter().any(|a| provider.audience.contains(a)),
                "the token's aud {aud:?} is none of the proxy's {:?}",
                provider.audience
            );
        }
    }
    assert_eq!(minted, 1, "{COMPOSE_FILE} should show how to mint a token");
}

#[test]
fn the_documented_connection_reaches_the_proxy_as_a_served_role() {
    let compose = compose();
    let (proxy, config) = compose.proxy_config();
    let postgres = environment(compose.service(&config.upstream.host));
    let text = read(COMPOSE_FILE);
    let urls: Vec<url::Url> = text
        .lines()
        .filter(|line| line.trim_start().starts_with('#'))
        .filter_map(|line| {
            let start = line.find("postgresql://")?;
            let url = line[start..].split(['"', '\'', ' ']).next()?;
            Some(url::Url::parse(&url.replace('$', "")).unwrap())
        })
        .collect();
    assert!(!urls.is_empty(), "{COMPOSE_FILE} shows no connection URL");
    let published: Vec<u16> = published_ports(compose.service(&proxy))
        .iter()
        .filter_map(|p| p.host_port)
        .collect();
    for url in urls {
        assert_eq!(url.host_str(), Some("localhost"), "{url}");
        assert!(
            published.contains(&url.port().unwrap_or(5432)),
            "{url}: port not published"
        );
        let role = config
            .role(url.username())
            .unwrap_or_else(|| panic!("{url}: the proxy serves no role {}", url.username()));
        assert_eq!(role.token, rlsgate::config::TokenPolicy::Required, "{url}");
        assert_eq!(
            Some(url.path().trim_start_matches('/')),
            postgres.get("POSTGRES_DB").map(String::as_str),
            "{url}: the database"
        );
    }
}

// ---- the Dockerfile ---------------------------------------------------------

#[test]
fn the_image_default_command_serves_the_configuration_where_compose_mounts_it() {
    let default = image_default_command();
    assert_eq!(default.subcommand, "serve");
    let path = default.required("--config");

    let compose = compose();
    let (proxy, serve) = compose.running("serve");
    assert_eq!(
        serve.required("--config"),
        path,
        "the config path of service {proxy}"
    );
    let mounted = mounted_file(compose.service(&proxy), &path);
    assert_eq!(mounted, "deploy/compose/rlsgate.toml");
}

#[test]
fn the_image_runs_as_a_non_root_user() {
    let user = image().user.expect("the final stage sets USER");
    let name = user.split(':').next().unwrap();
    assert!(
        !["root", "0", ""].contains(&name),
        "the image runs as {user:?}"
    );
}

#[test]
fn the_runtime_stage_installs_only_ca_certificates_and_no_build_tools() {
    const BUILD_TOOLS: &[&str] = &[
        "cargo",
        "rustc",
        "rustup",
        "gcc",
        "g++",
        "cc",
        "clang",
        "cmake",
        "make",
        "build-essential",
        "binutils",
    ];
    let stages = dockerfile();
    let last = stages.last().unwrap();
    assert!(
        !last.base.starts_with("rust"),
        "the final stage is based on {}",
        last.base
    );
    for instruction in &last.instructions {
        if instruction.keyword == "COPY" && instruction.args.starts_with("--from") {
            continue; // checked by the_runtime_stage_takes_only_the_binary_from_the_build_stage
        }
        for word in name_words(&instruction.args) {
            let tool = BUILD_TOOLS
                .iter()
                .find(|tool| word == **tool || word.starts_with(&format!("{tool}-")));
            assert!(
                tool.is_none(),
                "the final stage mentions {word}: {} {}",
                instruction.keyword,
                instruction.args
            );
        }
    }

    let mut installed = BTreeSet::new();
    for run in last.all("RUN") {
        for step in run.split("&&").map(str::trim) {
            let words: Vec<&str> = step.split_whitespace().collect();
            if let Some(install) = words.iter().position(|w| *w == "install")
                && matches!(words.first(), Some(&("apt-get" | "apt")))
            {
                installed.extend(words[install + 1..].iter().filter(|w| !w.starts_with('-')));
            }
        }
    }
    assert_eq!(installed, BTreeSet::from(["ca-certificates"]));
}

#[test]
fn the_runtime_stage_takes_only_the_binary_from_the_build_stage() {
    let stages = dockerfile();
    let last = stages.last().unwrap();
    let copies: Vec<&str> = last
        .all("COPY")
        .filter(|args| args.starts_with("--from"))
        .collect();
    assert_eq!(
        copies.len(),
        1,
        "COPY --from lines of the final stage: {copies:?}"
    );
    let words: Vec<&str> = copies[0].split_whitespace().skip(1).collect();
    assert_eq!(words.len(), 2, "one source, one destination: {}", copies[0]);
    assert!(words[0].ends_with("/rlsgate"), "it copies {}", words[0]);
    assert_eq!(words[1], "/usr/local/bin/rlsgate");
    let image = image();
    assert!(
        image.entrypoint[0] == "rlsgate" || image.entrypoint[0] == "/usr/local/bin/rlsgate",
        "the entrypoint {:?} is not the copied binary",
        image.entrypoint
    );
}

#[test]
fn the_build_stage_builds_the_locked_release() {
    let stages = dockerfile();
    let builds = stages[..stages.len() - 1]
        .iter()
        .flat_map(|stage| stage.all("RUN"))
        .any(|run| {
            run.split("&&").any(|step| {
                let words: BTreeSet<&str> = step.split_whitespace().collect();
                ["cargo", "build", "--release", "--locked"]
                    .iter()
                    .all(|w| words.contains(w))
            })
        });
    assert!(
        builds,
        "no build stage runs `cargo build --release --locked`"
    );
}

#[test]
fn the_image_exposes_the_port_the_compose_proxy_listens_on() {
    let (_, config) = compose().proxy_config();
    let stages = dockerfile();
    let exposed: Vec<u16> = stages
        .last()
        .unwrap()
        .all("EXPOSE")
        .flat_map(str::split_whitespace)
        .map(|port| port.split('/').next().unwrap().parse().unwrap())
        .collect();
    assert!(
        exposed.contains(&config.listen.address.port()),
        "EXPOSE {exposed:?}, the proxy listens on {}",
        config.listen.address
    );
}

#[test]
fn the_keys_volume_mount_point_belongs_to_the_image_user() {
    // Docker gives a new named volume the owner of the image's directory it
    // is mounted on; keygen (as the image's user) must be able to write there.
    let compose = compose();
    let (_, keygen) = compose.running("keygen");
    let out = keygen.required("--out");
    let user = image().user.unwrap();
    let uid = user.split(':').next().unwrap();
    let stages = dockerfile();
    let runs: Vec<&str> = stages.last().unwrap().all("RUN").collect();
    let names: BTreeSet<String> = runs
        .iter()
        .flat_map(|run| run.split("&&"))
        .filter_map(|step| {
            let words: Vec<&str> = step.split_whitespace().collect();
            if !words.contains(&"useradd") {
                return None;
            }
            let id = words.iter().position(|w| *w == "--uid" || *w == "-u")?;
            (words.get(id + 1) == Some(&uid)).then(|| words.last().unwrap().to_string())
        })
        .chain([uid.to_owned()])
        .collect();
    let owned = runs.iter().flat_map(|run| run.split("&&")).any(|step| {
        let words: Vec<&str> = step.split_whitespace().collect();
        words.first() == Some(&"chown")
            && words.contains(&out.as_str())
            && words
                .iter()
                .skip(1)
                .find(|w| !w.starts_with('-'))
                .is_some_and(|owner| names.contains(owner.split(':').next().unwrap()))
    });
    assert!(
        owned,
        "the final stage should create {out} owned by the image's user {user} ({names:?})"
    );
}

#[test]
fn the_build_context_holds_every_file_the_build_copies() {
    let stages = dockerfile();
    for stage in &stages {
        for args in stage.all("COPY").filter(|args| !args.starts_with("--from")) {
            let words: Vec<&str> = args
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            for source in &words[..words.len() - 1] {
                let path = Path::new(ROOT).join(source);
                assert!(path.exists(), "COPY {source}: no such file");
                let mut files = Vec::new();
                files_under(&path, &mut files);
                for file in files {
                    assert!(
                        in_build_context(&file),
                        ".dockerignore leaves out {file}, which COPY {source} needs"
                    );
                }
            }
        }
    }
    assert!(
        !in_build_context("target/release/rlsgate"),
        "target/ is sent to the builder"
    );
    assert!(
        !in_build_context(".git/HEAD"),
        ".git/ is sent to the builder"
    );
}
