//! What is wrong with a manifest: every problem with the path of the field it is in.

use std::fmt;

/// One problem, at one field (`spec.template.spec.containers[0].image`, `resources.memory`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field's path; empty for the document as a whole.
    pub path: String,
    pub message: String,
}

/// Every problem found in a manifest (validation does not stop at the first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    pub errors: Vec<FieldError>,
}

impl ManifestError {
    pub fn one(path: impl Into<String>, message: impl Into<String>) -> ManifestError {
        ManifestError {
            errors: vec![FieldError {
                path: path.into(),
                message: message.into(),
            }],
        }
    }

    /// Whether some problem is at `path`.
    pub fn has(&self, path: &str) -> bool {
        self.errors.iter().any(|e| e.path == path)
    }
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            match e.path.as_str() {
                "" => write!(f, "{}", e.message)?,
                p => write!(f, "{p}: {}", e.message)?,
            }
        }
        Ok(())
    }
}

impl std::error::Error for ManifestError {}

/// Collects problems while a manifest is checked.
#[derive(Default)]
pub(crate) struct Problems(pub(crate) Vec<FieldError>);

impl Problems {
    pub(crate) fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }

    /// `message` at each of `fields` that is set (a field of the other kind of manifest).
    pub(crate) fn refuse_set(&mut self, fields: &[(&str, bool)], message: &str) {
        for (field, set) in fields {
            if *set {
                self.add(*field, message);
            }
        }
    }

    /// `value` if there were no problems, else all of them.
    pub(crate) fn into_result<T>(self, value: T) -> Result<T, ManifestError> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(ManifestError { errors: self.0 })
        }
    }
}

/// A serde error with the path of the field where it happened.
pub(crate) fn from_serde<E: fmt::Display>(e: serde_path_to_error::Error<E>) -> ManifestError {
    let path = e.path().to_string();
    let path = if path == "." { String::new() } else { path };
    let inner = e.into_inner().to_string();
    // serde_yaml_ng starts with the path of the mapping ("spec.template: unknown field ...")
    // that the error's own path already says; it ends with " at line L column C", which helps.
    let message = match inner.split_once(": ") {
        Some((head, rest)) if !head.contains(' ') && path.starts_with(head) => rest.to_owned(),
        _ => inner,
    };
    ManifestError::one(path, message)
}
