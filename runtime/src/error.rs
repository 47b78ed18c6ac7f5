//! The one error type of the runtime.

use std::path::PathBuf;

/// Everything that can go wrong in the runtime. Each variant names what was wrong and where.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// ONNX Runtime could not be found, downloaded or loaded.
    #[error("ONNX Runtime: {0}")]
    OnnxRuntime(String),

    /// ONNX Runtime reported an error while building or running a session.
    #[error("ONNX Runtime failed while {context}: {message}")]
    Ort {
        /// What the runtime was doing.
        context: String,
        /// ONNX Runtime's own message.
        message: String,
    },

    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A dictionary file is malformed or breaks the format v1 contract.
    #[error("dictionary {}: {message}", path.display())]
    Dictionary {
        /// The dictionary file (or `<memory>`).
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// A tensor given by the caller has the wrong shape, dtype or contents.
    #[error("tensor `{name}`: {message}")]
    Tensor {
        /// The tensor's name (an input, a weight).
        name: String,
        /// What is wrong with it.
        message: String,
    },

    /// A configuration file is invalid.
    #[error("{file}:{line}: {message}")]
    Config {
        /// The file (or `<config>`).
        file: String,
        /// The 1-based line (0 when unknown).
        line: usize,
        /// What is wrong, naming the key.
        message: String,
    },

    /// A request, hook or profile the caller named does not exist or is in the wrong state.
    #[error("{what} `{name}`: {message}")]
    Unknown {
        /// What kind of thing (request, hook, profile).
        what: &'static str,
        /// Its name or id.
        name: String,
        /// Why.
        message: String,
    },

    /// A request's overrides were refused: malformed, or beyond what the operator's `[requests]`
    /// allows. The whole request is refused; a host answers its caller's fault (an HTTP 400).
    #[error("request overrides: {}{message}", if field.is_empty() { String::new() } else { format!("{field}: ") })]
    Override {
        /// The field, as a path into the overrides (`steer[3].strength`; empty: the whole text).
        field: String,
        /// Why, naming the operator's bound where one was crossed.
        message: String,
    },

    /// A value is out of its allowed range or inconsistent with another.
    #[error("invalid {what}: {message}")]
    Invalid {
        /// What was invalid.
        what: String,
        /// Why.
        message: String,
    },
}

impl Error {
    /// A [`Error::Dictionary`] for `path`.
    pub fn dictionary(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Dictionary {
            path: path.into(),
            message: message.into(),
        }
    }

    /// A [`Error::Tensor`] for the tensor `name`.
    pub fn tensor(name: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Tensor {
            name: name.into(),
            message: message.into(),
        }
    }

    /// A [`Error::Invalid`].
    pub fn invalid(what: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            what: what.into(),
            message: message.into(),
        }
    }

    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn ort(context: impl Into<String>, e: impl std::fmt::Display) -> Self {
        Self::Ort {
            context: context.into(),
            message: e.to_string(),
        }
    }
}

/// The runtime's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
