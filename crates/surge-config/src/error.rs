//! Errors that point at the offending key, line and column, with the line itself shown.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// A place in a configuration file: where a value was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    pub file: PathBuf,
    /// 1-based line, 0 when the problem has no place in the file (an unreadable file).
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// Dotted key, such as `services.api.instances.min`.
    pub key: String,
    /// The text of the line, shown under an error message.
    pub snippet: Option<String>,
}

impl Site {
    /// The place of `span` (byte offsets) in `source`, the text of `file`.
    pub fn new(source: &str, file: &Path, span: Range<usize>, key: String) -> Self {
        let start = span.start.min(source.len());
        let before = &source[..start];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = source[line_start..start].chars().count() + 1;
        let snippet = source[line_start..].lines().next().map(str::to_owned);
        Site { file: file.to_owned(), line, column, key, snippet }
    }

    /// The whole file, for problems that have no narrower place.
    pub fn file(file: &Path) -> Self {
        Site { file: file.to_owned(), line: 0, column: 0, key: String::new(), snippet: None }
    }

    pub fn error(&self, message: impl Into<String>) -> ConfigError {
        ConfigError { site: self.clone(), message: message.into() }
    }
}

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub site: Site,
    pub message: String,
}

impl ConfigError {
    pub(crate) fn unreadable(file: &Path, err: &std::io::Error) -> Self {
        Site::file(file).error(format!("cannot read the configuration file: {err}"))
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Site { file, line, column, key, snippet } = &self.site;
        let file = file.display();
        match (line, key.is_empty()) {
            (0, true) => write!(f, "{file}: {}", self.message)?,
            (0, false) => write!(f, "{file}: `{key}`: {}", self.message)?,
            (_, true) => write!(f, "{file}:{line}:{column}: {}", self.message)?,
            (_, false) => write!(f, "{file}:{line}:{column}: `{key}`: {}", self.message)?,
        }
        if let Some(snippet) = snippet {
            let number = line.to_string();
            let pad = " ".repeat(number.len());
            let caret = " ".repeat(column.saturating_sub(1));
            write!(f, "\n {pad} |\n {number} | {snippet}\n {pad} | {caret}^")?;
        }
        Ok(())
    }
}

/// Every problem found in one configuration file, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    pub fn single(error: ConfigError) -> Self {
        ConfigErrors(vec![error])
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            writeln!(f, "error: {error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}
