//! Edits of a configuration file's text through its parsed TOML document,
//! for tests that hand a file to the real binary (`rlsgate serve`, `check`):
//! the parsed `Config` cannot be written back as a file.

use toml::Table;

/// `text` with `edit` applied to its parsed document, written out again.
pub fn edit_toml(text: &str, edit: impl FnOnce(&mut Table)) -> String {
    let mut doc: Table = text.parse().expect("the test configuration is TOML");
    edit(&mut doc);
    doc.to_string()
}

/// The table `[name]` of `doc`, e.g. `listen` or `upstream`.
pub fn section<'a>(doc: &'a mut Table, name: &str) -> &'a mut Table {
    doc.get_mut(name)
        .and_then(toml::Value::as_table_mut)
        .unwrap_or_else(|| panic!("the configuration has a [{name}] table"))
}

/// The `[[role]]` of `doc` named `name`.
pub fn role<'a>(doc: &'a mut Table, name: &str) -> &'a mut Table {
    doc.get_mut("role")
        .and_then(toml::Value::as_array_mut)
        .into_iter()
        .flatten()
        .filter_map(toml::Value::as_table_mut)
        .find(|role| role.get("name").and_then(toml::Value::as_str) == Some(name))
        .unwrap_or_else(|| panic!("the configuration has a [[role]] named {name}"))
}

/// Sets `key` to `value` in `table`.
pub fn set(table: &mut Table, key: &str, value: impl Into<toml::Value>) {
    table.insert(key.to_owned(), value.into());
}
