//! Configuration errors: every problem found in a directory, each with where it is.
//!
//! Loading never stops at the first mistake: an operator fixing a directory should see
//! the whole list at once, so [`ConfigError`] carries one [`Problem`] per mistake and
//! prints one line per problem.

use std::fmt;
use std::path::{Path, PathBuf};

/// The exit code for bad configuration (`EX_CONFIG` from `sysexits.h`).
pub const EXIT_CONFIG: i32 = 64;

/// The crate's error type: a directory (or object set) that cannot become a snapshot.
pub type Error = ConfigError;

/// One or more problems that make a directory unusable; the running snapshot is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    problems: Vec<Problem>,
}

/// One mistake, located as precisely as the loader could.
///
/// Displays as `<file>[:<line>:<column>][ (document <n>)]: [<kind> <ns>/<name>: ][<field>: ]<message>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file (or the directory, for problems with the directory itself).
    pub file: PathBuf,
    /// Line and column of a YAML syntax error.
    pub position: Option<Position>,
    /// 1-based index of the YAML document in the file, counting empty documents, so it
    /// matches what a reader counts between `---` separators.
    pub document: Option<usize>,
    /// The object, as `<kind> <namespace>/<name>`, when it could be read.
    pub object: Option<String>,
    /// Path of the offending field, e.g. `spec.ports[1].port`.
    pub field: Option<String>,
    /// What is wrong, lowercase, with the bad value where it helps.
    pub message: String,
}

/// A 1-based line and column in a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

// === impl ConfigError ===

impl ConfigError {
    /// Wraps problems; `None` when there are none, so an error is never empty.
    pub(crate) fn from_problems(problems: Vec<Problem>) -> Option<Self> {
        if problems.is_empty() {
            None
        } else {
            Some(Self { problems })
        }
    }

    /// A single problem not tied to any document.
    pub(crate) fn single(file: &Path, message: impl Into<String>) -> Self {
        Self {
            problems: vec![Problem::new(file, message)],
        }
    }

    /// Every problem found, in file order, then those of checks that need every object
    /// (e.g. a Service's targetPort against the Workloads it selects).
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    /// The process exit code for this error: 64 (`EX_CONFIG`).
    pub fn exit_code(&self) -> i32 {
        EXIT_CONFIG
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

// === impl Problem ===

impl Problem {
    /// A problem with a whole file (or directory).
    pub(crate) fn new(file: &Path, message: impl Into<String>) -> Self {
        Self {
            file: file.to_owned(),
            position: None,
            document: None,
            object: None,
            field: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(Position { line, column }) = self.position {
            write!(f, ":{line}:{column}")?;
        }
        if let Some(document) = self.document {
            write!(f, " (document {document})")?;
        }
        f.write_str(": ")?;
        if let Some(object) = &self.object {
            write!(f, "{object}: ")?;
        }
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_display_includes_every_known_part() {
        let problem = Problem {
            file: PathBuf::from("/cfg/web.yaml"),
            position: Some(Position { line: 3, column: 7 }),
            document: Some(2),
            object: Some("Service demo/web".into()),
            field: Some("spec.ports[1].port".into()),
            message: "must be between 1 and 65535, got 0".into(),
        };
        assert_eq!(
            problem.to_string(),
            "/cfg/web.yaml:3:7 (document 2): Service demo/web: spec.ports[1].port: \
             must be between 1 and 65535, got 0"
        );
    }

    #[test]
    fn config_error_prints_one_line_per_problem_and_exits_64() {
        let err = ConfigError::from_problems(vec![
            Problem::new(Path::new("a.yaml"), "first"),
            Problem::new(Path::new("b.yaml"), "second"),
        ])
        .unwrap();
        assert_eq!(err.to_string(), "a.yaml: first\nb.yaml: second");
        assert_eq!(err.exit_code(), 64);
        assert!(ConfigError::from_problems(Vec::new()).is_none());
    }
}
