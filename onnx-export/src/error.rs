//! The one error type of the offline tool.

use std::path::PathBuf;

/// What can go wrong reading a checkpoint or writing a dictionary. Each names the file and the problem.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file's contents are wrong: a bad config key, a tensor of the wrong shape, a truncated file.
    #[error("{}: {message}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the key or tensor.
        message: String,
    },
    /// The runtime refused what was built.
    #[error(transparent)]
    Tiller(#[from] tiller_runtime::Error),
}

impl Error {
    /// A [`Error::Format`] for `path`.
    pub fn format(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Format {
            path: path.into(),
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
}

/// The tool's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
