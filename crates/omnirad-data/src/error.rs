use std::path::PathBuf;

/// Every failure names the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a readable {format} file: {reason}")]
    Format {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },
    #[error("{path}: unsupported {what}: {value}")]
    Unsupported {
        path: PathBuf,
        what: &'static str,
        value: String,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{path}: no images found")]
    Empty { path: PathBuf },
    #[error("{0}")]
    Other(String),
}

impl DataError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
    pub fn format(path: impl Into<PathBuf>, format: &'static str, reason: impl ToString) -> Self {
        Self::Format {
            path: path.into(),
            format,
            reason: reason.to_string(),
        }
    }
    pub fn invalid(path: impl Into<PathBuf>, reason: impl ToString) -> Self {
        Self::Invalid {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
}

pub type Result<T> = std::result::Result<T, DataError>;
