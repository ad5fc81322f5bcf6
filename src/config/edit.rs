//! Editing the config file the way a technician or the cloud does: one key at a time, checked at
//! once, saved atomically with a backup, comments and layout of the file kept.
//!
//! A [`Draft`] is the file as it will be saved; [`Draft::set`] refuses a value that makes the file
//! invalid (the error names the key), [`Draft::diff`] lists what changes against the file on disk,
//! [`Draft::save`] validates the whole file and replaces it (temp file, fsync, rename, fsync the
//! directory, previous file kept as `.bak`). [`plan`] compares two validated configurations and says
//! which changes apply at runtime ([`super::live::RUNTIME_KEYS`]) and which need a restart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use toml_edit::{DocumentMut, Item, Value};

use super::live::is_runtime_key;
use super::{Config, MASK};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{key:?} is not a settable key: {reason}")]
    Key { key: String, reason: String },
    #[error("{0}")]
    Invalid(super::Error),
    #[error("cannot write config file {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One changed key, values as TOML text, secrets masked; `None` means not set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: String,
    pub old: Option<String>,
    pub new: Option<String>,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "(unset)".to_owned());
        write!(f, "{} {} -> {}", self.key, show(&self.old), show(&self.new))
    }
}

/// The config file being edited.
#[derive(Debug, Clone)]
pub struct Draft {
    path: PathBuf,
    /// The file as last read or saved.
    on_disk: DocumentMut,
    doc: DocumentMut,
}

impl Draft {
    /// Reads `path`. A file that is valid TOML but not a valid configuration loads, so that a person
    /// can repair it; a missing file is an empty draft.
    pub fn load(path: &Path) -> Result<Draft, Error> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(Error::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        Draft::from_text(path, &text)
    }

    /// A draft of `text`, as if read from `path` (which resolves a relative `journal.dir`).
    pub fn from_text(path: &Path, text: &str) -> Result<Draft, Error> {
        let doc: DocumentMut = text
            .parse()
            .map_err(|e: toml_edit::TomlError| Error::Syntax {
                path: path.to_owned(),
                message: e.message().to_owned(),
            })?;
        Ok(Draft {
            path: path.to_owned(),
            on_disk: doc.clone(),
            doc,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The draft's text, as it would be saved.
    pub fn text(&self) -> String {
        self.doc.to_string()
    }

    /// Validates the whole draft.
    pub fn validate(&self) -> Result<Config, Error> {
        Config::parse_str(&self.text(), &self.path).map_err(Error::Invalid)
    }

    /// Sets `key` (`section.name`) to `value` as typed by a person: a TOML value (`500`, `true`,
    /// `"text"`, `["a/#", "b/#"]`) or bare text, which is taken as a string (`64MiB`, `30s`,
    /// `http://host/ingest`). Refused, with the draft unchanged, if the value makes the file invalid
    /// where it was valid before (or invalid in a new way).
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), Error> {
        let (section, name) = split_key(key)?;
        let before = self.validate().err().map(|e| e.to_string());
        let mut last_err = None;
        for candidate in candidates(value) {
            let mut next = self.doc.clone();
            let table = next
                .entry(section)
                .or_insert_with(|| Item::Table(toml_edit::Table::new()));
            let Some(table) = table.as_table_like_mut() else {
                return Err(Error::Key {
                    key: key.to_owned(),
                    reason: format!("{section} is not a table in the file"),
                });
            };
            // Keep the comment and spacing that decorate the old value.
            let decor = table
                .get(name)
                .and_then(Item::as_value)
                .map(|v| v.decor().clone());
            let mut candidate = candidate;
            if let Some(decor) = decor {
                *candidate.decor_mut() = decor;
            }
            table.insert(name, Item::Value(candidate));
            let draft = Draft {
                doc: next,
                ..self.clone()
            };
            match draft.validate() {
                Ok(_) => {
                    *self = draft;
                    return Ok(());
                }
                Err(e) if Some(e.to_string()) == before => {
                    *self = draft;
                    return Ok(());
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| Error::Key {
            key: key.to_owned(),
            reason: "no value given".to_owned(),
        }))
    }

    /// Removes `key` from the file, so that its default applies.
    pub fn unset(&mut self, key: &str) -> Result<(), Error> {
        let (section, name) = split_key(key)?;
        let before = self.validate().err().map(|e| e.to_string());
        let mut next = self.clone();
        if let Some(t) = next.doc.get_mut(section).and_then(Item::as_table_like_mut) {
            t.remove(name);
        }
        match next.validate() {
            Err(e) if Some(e.to_string()) != before => Err(e),
            _ => {
                *self = next;
                Ok(())
            }
        }
    }

    /// The value of `key` as written in the draft (secrets masked), `None` if not set.
    pub fn get(&self, key: &str) -> Option<String> {
        flatten(&self.doc).remove(key).map(|v| masked(key, v))
    }

    /// Every key with the value the draft gives it, sorted, secrets masked, and whether the file
    /// sets it (`false`: a default). Defaults are known only while the draft is valid; values as
    /// written win over effective ones (a relative `journal.dir` stays relative).
    pub fn show(&self) -> Vec<(String, String, bool)> {
        let written = flatten(&self.doc);
        let mut all = match self.validate() {
            Ok(cfg) => cfg
                .to_masked_toml()
                .parse::<DocumentMut>()
                .map(|d| flatten(&d))
                .unwrap_or_default(),
            Err(_) => BTreeMap::new(),
        };
        all.extend(written.clone());
        all.into_iter()
            .map(|(k, v)| {
                let set = written.contains_key(&k);
                let v = masked(&k, v);
                (k, v, set)
            })
            .collect()
    }

    /// What the draft changes against the file on disk.
    pub fn diff(&self) -> Vec<Change> {
        changes(flatten(&self.on_disk), flatten(&self.doc))
    }

    /// Forgets every change since the last load or save.
    pub fn discard(&mut self) {
        self.doc = self.on_disk.clone();
    }

    /// Validates the whole draft and replaces the file atomically, keeping the previous one as `.bak`.
    /// If the file changed on disk since it was read (the cloud's `set_config`, another console),
    /// the draft's own changes are applied on top of the file as it is now rather than overwriting
    /// it; [`Saved::rebased`] says so. Returns the configuration now on disk.
    pub fn save(&mut self) -> Result<Saved, Error> {
        let current = Draft::load(&self.path)?;
        let changed_on_disk = changes(flatten(&self.on_disk), flatten(&current.on_disk));
        let rebased = !changed_on_disk.is_empty();
        let mut overridden = Vec::new();
        if rebased {
            let mine = self.diff();
            overridden = mine
                .iter()
                .filter(|m| changed_on_disk.iter().any(|c| c.key == m.key))
                .map(|m| m.key.clone())
                .collect();
            let mut doc = current.on_disk.clone();
            for change in &mine {
                copy_key(&self.doc, &mut doc, &change.key);
            }
            self.on_disk = current.on_disk;
            self.doc = doc;
        }
        let config = self.validate()?;
        crate::atomic_file::replace(&self.path, self.text().as_bytes(), true).map_err(
            |source| Error::Write {
                path: self.path.clone(),
                source,
            },
        )?;
        self.on_disk = self.doc.clone();
        Ok(Saved {
            config,
            rebased,
            overridden,
        })
    }
}

/// What [`Draft::save`] wrote.
#[derive(Debug)]
pub struct Saved {
    /// The configuration now on disk.
    pub config: Config,
    /// The file had changed on disk since the draft read it; the draft's changes went on top.
    pub rebased: bool,
    /// Keys changed both on disk and in the draft: the draft's value was saved.
    pub overridden: Vec<String>,
}

/// Makes `key` (`section.name`, or a top-level key) in `to` what it is in `from`: copied with its
/// decoration, or removed.
fn copy_key(from: &DocumentMut, to: &mut DocumentMut, key: &str) {
    let (section, name) = match key.split_once('.') {
        Some((s, n)) => (s, Some(n)),
        None => (key, None),
    };
    let Some(name) = name else {
        match from.get(section) {
            Some(item) => {
                to.insert(section, item.clone());
            }
            None => {
                to.remove(section);
            }
        }
        return;
    };
    let item = from
        .get(section)
        .and_then(Item::as_table_like)
        .and_then(|t| t.get(name))
        .cloned();
    match item {
        Some(item) => {
            let table = to
                .entry(section)
                .or_insert_with(|| Item::Table(toml_edit::Table::new()));
            if let Some(t) = table.as_table_like_mut() {
                t.insert(name, item);
            }
        }
        None => {
            if let Some(t) = to.get_mut(section).and_then(Item::as_table_like_mut) {
                t.remove(name);
            }
        }
    }
}

/// What applying `new` to an agent running `running` means.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Every effective change, secrets masked.
    pub changes: Vec<Change>,
    /// The changed keys that are not runtime keys: the agent must restart for them.
    pub restart_keys: Vec<String>,
}

impl Plan {
    pub fn needs_restart(&self) -> bool {
        !self.restart_keys.is_empty()
    }
}

/// Compares two configurations key by key (effective values, defaults filled in).
pub fn plan(running: &Config, new: &Config) -> Plan {
    let effective = |c: &Config| {
        c.to_toml_with_secrets()
            .parse::<DocumentMut>()
            .map(|d| flatten(&d))
            .unwrap_or_default()
    };
    let changes = changes(effective(running), effective(new));
    let restart_keys = changes
        .iter()
        .filter(|c| !is_runtime_key(&c.key))
        .map(|c| c.key.clone())
        .collect();
    Plan {
        changes,
        restart_keys,
    }
}

/// True for keys whose values are never shown.
pub fn is_secret(key: &str) -> bool {
    let name = key.rsplit('.').next().unwrap_or(key);
    matches!(name, "password" | "token" | "pin_sha256") || name.ends_with("_key")
}

fn split_key(key: &str) -> Result<(&str, &str), Error> {
    let bad = |reason: &str| Error::Key {
        key: key.to_owned(),
        reason: reason.to_owned(),
    };
    let (section, name) = key
        .split_once('.')
        .ok_or_else(|| bad("expected section.name, e.g. uplink.url"))?;
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 64
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    };
    if !ok(section) || !ok(name) {
        return Err(bad(
            "expected section.name in lowercase letters, digits and _ (lists of tables such as \
             mqtt.parse are edited in the file)",
        ));
    }
    Ok((section, name))
}

/// The ways to read what a person typed, most specific first: as TOML, as a string, as a list of
/// comma-separated strings.
fn candidates(text: &str) -> Vec<Value> {
    let text = text.trim();
    if text.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    if let Ok(v) = text.parse::<Value>() {
        out.push(v);
    }
    out.push(Value::from(text));
    let list: toml_edit::Array = text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    out.push(Value::Array(list));
    for v in &mut out {
        v.decor_mut().clear();
    }
    out
}

/// `section.key` → value as TOML text, for every key of every table (arrays of tables as one key).
fn flatten(doc: &DocumentMut) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (section, item) in doc.iter() {
        match item.as_table_like() {
            Some(t) => {
                for (name, value) in t.iter() {
                    out.insert(format!("{section}.{name}"), text_of(value));
                }
            }
            None => {
                out.insert(section.to_owned(), text_of(item));
            }
        }
    }
    out
}

fn text_of(item: &Item) -> String {
    match item {
        Item::Value(v) => v.clone().decorated("", "").to_string(),
        other => other.to_string().trim().to_owned(),
    }
}

fn masked(key: &str, value: String) -> String {
    if is_secret(key) {
        MASK.to_owned()
    } else {
        value
    }
}

fn changes(old: BTreeMap<String, String>, mut new: BTreeMap<String, String>) -> Vec<Change> {
    let mut out = Vec::new();
    for (key, o) in old {
        match new.remove(&key) {
            Some(n) if n == o => {}
            n => out.push(Change {
                old: Some(masked(&key, o)),
                new: n.map(|n| masked(&key, n)),
                key,
            }),
        }
    }
    for (key, n) in new {
        out.push(Change {
            old: None,
            new: Some(masked(&key, n)),
            key,
        });
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

#[cfg(test)]
mod tests;
