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

/// Runs a third-party decoder on `path`'s data, turning a panic into an error naming the file.
///
/// Why: decoders index into their input without bounds checks on corrupt data (dicom-rs's RLE
/// decoder panics on a truncated segment), and one panic must not end a batch job or print a
/// backtrace location inside a dependency. The panic message is kept in the error; the default
/// panic report is suppressed for panics caught here, and only here.
pub(crate) fn catch_decoder_panic<T>(
    path: &std::path::Path,
    decode: impl FnOnce() -> Result<T>,
) -> Result<T> {
    use std::panic::{catch_unwind, AssertUnwindSafe};
    QUIET_HOOK.call_once(|| {
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_DECODER.with(|d| d.get()) {
                report(info);
            }
        }));
    });
    let outer = IN_DECODER.with(|d| d.replace(true));
    let r = catch_unwind(AssertUnwindSafe(decode));
    IN_DECODER.with(|d| d.set(outer));
    r.unwrap_or_else(|payload| {
        Err(DataError::invalid(
            path,
            format!(
                "the decoder failed on corrupt or truncated data ({})",
                panic_message(payload.as_ref())
            ),
        ))
    })
}

static QUIET_HOOK: std::sync::Once = std::sync::Once::new();

thread_local! {
    static IN_DECODER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The text of a panic payload (`panic!` with a literal gives `&str`, with formatting `String`).
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}
