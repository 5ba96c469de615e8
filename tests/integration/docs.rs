//! The documentation a newcomer copies from: the provider snippets in
//! config/providers/ and the README's quick start and configuration blocks.

use std::fs;
use std::path::{Path, PathBuf};

use rlsgate::config::Config;

/// A configuration that is valid once one `[[provider]]` is appended: one
/// role that requires a token, and a 32-byte claims key.
pub(crate) const MINIMAL_CONFIG: &str = r#"[listen]
address = "127.0.0.1:6432"

[upstream]
host = "127.0.0.1"

[[role]]
name = "authenticated"
token = "required"

[claims]
signing_key = "cmxzZ2F0ZS1kb2NzLXRlc3Qtc2lnbmluZy1rZXktMzI="
"#;

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn readme() -> String {
    read(&manifest_dir().join("README.md"))
}

/// Parses the minimal configuration with `snippet` appended.
fn parse_with(snippet: &str) -> anyhow::Result<Config> {
    Config::parse(&format!("{MINIMAL_CONFIG}\n{snippet}"))
}

/// A fenced code block of a Markdown text: its info string and its text.
struct CodeBlock {
    info: String,
    text: String,
}

/// The fenced (```) code blocks of `markdown`, in order, indented ones
/// (inside list items) included, with the fence's indentation removed.
fn code_blocks(markdown: &str) -> Vec<CodeBlock> {
    let mut blocks = Vec::new();
    let mut open: Option<(usize, CodeBlock)> = None;
    for line in markdown.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        match open.take() {
            None => {
                if let Some(info) = trimmed.strip_prefix("```") {
                    let block = CodeBlock {
                        info: info.trim().to_owned(),
                        text: String::new(),
                    };
                    open = Some((indent, block));
                }
            }
            Some((_, block)) if trimmed.starts_with("```") => blocks.push(block),
            Some((fence_indent, mut block)) => {
                block.text.push_str(&line[fence_indent.min(indent)..]);
                block.text.push('\n');
                open = Some((fence_indent, block));
            }
        }
    }
    assert!(open.is_none(), "the README has an unclosed code block");
    blocks
}

/// The commands of a shell block: its non-empty lines without `#` comments.
fn shell_commands(block: &str) -> Vec<String> {
    block
        .lines()
        .map(|line| line.split(" #").next().unwrap_or_default().trim())
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_provider_snippet_completes_a_minimal_configuration_with_one_https_provider() {
    let dir = manifest_dir().join("config/providers");
    let mut snippets: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    snippets.sort();
    let names: Vec<String> = snippets
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in [
        "auth0.toml",
        "azure-ad.toml",
        "clerk.toml",
        "keycloak.toml",
        "stack-auth.toml",
        "supabase.toml",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "config/providers/{expected} is missing (found {names:?})"
        );
    }
    for path in &snippets {
        let config = parse_with(&read(path))
            .unwrap_or_else(|e| panic!("{} does not parse: {e:#}", path.display()));
        assert_eq!(
            config.providers.len(),
            1,
            "{} should hold exactly one [[provider]]",
            path.display()
        );
        let issuer = &config.providers[0].issuer;
        assert!(
            issuer.starts_with("https://"),
            "{}: issuer {issuer:?} is not an https URL",
            path.display()
        );
    }
}

#[test]
fn the_quick_start_runs_the_demo_and_the_test_command_that_ci_runs() {
    let readme = readme();
    let first = code_blocks(&readme)
        .into_iter()
        .next()
        .expect("the README has a code block");
    let commands = shell_commands(&first.text);
    assert_eq!(
        commands.len(),
        2,
        "the quick start should hold exactly two commands: {commands:?}"
    );
    let demo = commands
        .iter()
        .filter(|c| c.split_whitespace().any(|word| word == "demo"))
        .count();
    assert_eq!(
        demo, 1,
        "exactly one quick-start command runs `demo`: {commands:?}"
    );
    let test_command = commands
        .iter()
        .find(|c| !c.split_whitespace().any(|word| word == "demo"))
        .expect("a quick-start command besides the demo");
    assert!(
        test_command.starts_with("cargo test"),
        "the second quick-start command should run the tests: {test_command:?}"
    );
    let ci = read(&manifest_dir().join(".ci/run"));
    assert!(
        ci.lines().any(|line| line.trim() == test_command),
        ".ci/run does not run the quick start's test command {test_command:?} as a line of its own"
    );
}

#[test]
fn every_provider_block_in_the_readme_completes_a_minimal_configuration() {
    let readme = readme();
    let blocks: Vec<CodeBlock> = code_blocks(&readme)
        .into_iter()
        .filter(|b| b.info == "toml" && b.text.contains("[[provider]]"))
        .collect();
    assert!(
        blocks.len() >= 6,
        "the README should show a [[provider]] block for each provider it names, found {}",
        blocks.len()
    );
    for block in &blocks {
        let config = parse_with(&block.text)
            .unwrap_or_else(|e| panic!("this README block does not parse: {e:#}\n{}", block.text));
        assert!(
            !config.providers.is_empty(),
            "this README block defines no provider:\n{}",
            block.text
        );
    }
}

#[test]
fn code_blocks_are_found_with_their_language_and_indentation_removed() {
    let markdown = "text\n```sh\na # c\n```\n1. item\n\n   ```toml\n   k = 1\n   ```\n";
    let blocks = code_blocks(markdown);
    assert_eq!(blocks.len(), 2);
    assert_eq!(blocks[0].info, "sh");
    assert_eq!(shell_commands(&blocks[0].text), ["a"]);
    assert_eq!(blocks[1].info, "toml");
    assert_eq!(blocks[1].text, "k = 1\n");
}

/// The part of the README's "Project layout" tree that draws `src/`.
fn src_layout() -> String {
    let readme = readme();
    let section = readme
        .split("\n## Project layout\n")
        .nth(1)
        .expect("the README has a \"Project layout\" section");
    let tree = code_blocks(section)
        .into_iter()
        .next()
        .expect("the Project layout section opens with the tree")
        .text;
    let start = tree.find("src/\n").expect("the tree draws src/");
    let end = tree
        .find("tests/integration/")
        .expect("the tree draws tests/");
    tree[start + "src/\n".len()..end].to_owned()
}

/// The folders below `dir` (recursively) and the `.rs` files directly in it.
fn folders_and_files(dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let (mut folders, mut files) = (Vec::new(), Vec::new());
    for entry in fs::read_dir(dir).unwrap().map(Result::unwrap) {
        let path = entry.path();
        if path.is_dir() {
            folders.push(path);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    (folders, files)
}

#[test]
fn the_readmes_project_layout_names_every_folder_and_module_of_src_and_nothing_else() {
    let layout = src_layout();
    let words: Vec<&str> = layout
        .split(|c: char| !(c.is_alphanumeric() || "_./".contains(c)))
        .map(|w| w.trim_end_matches('.'))
        .filter(|w| !w.is_empty())
        .collect();
    let src = manifest_dir().join("src");
    let name = |p: &Path| p.file_name().unwrap().to_string_lossy().into_owned();
    let stem = |p: &Path| p.file_stem().unwrap().to_string_lossy().into_owned();
    let (stages, top_files) = folders_and_files(&src);
    for file in &top_files {
        assert!(
            words.contains(&name(file).as_str()),
            "{} is missing",
            name(file)
        );
    }
    for stage in &stages {
        let folder = format!("{}/", name(stage));
        assert!(words.contains(&folder.as_str()), "src/{folder} is missing");
        let (inner, files) = folders_and_files(stage);
        for module in files.iter().map(|f| stem(f)).filter(|m| m != "mod") {
            assert!(
                words.contains(&module.as_str()),
                "src/{folder}{module}.rs is missing"
            );
        }
        for inner in &inner {
            let inner = format!("{}/", name(inner));
            assert!(
                words.contains(&inner.as_str()),
                "src/{folder}{inner} is missing"
            );
        }
    }
    for folder in words.iter().filter(|w| w.ends_with('/')) {
        let exists =
            src.join(folder).is_dir() || stages.iter().any(|stage| stage.join(folder).is_dir());
        assert!(
            exists,
            "the layout draws {folder}, which src/ does not have"
        );
    }
}
