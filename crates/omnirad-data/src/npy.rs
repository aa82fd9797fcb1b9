//! `.npy` files and `.npz` archives, read only after each array's header has been checked
//! against the bytes that follow it.
//!
//! Why not ndarray-npy alone: it allocates an array's whole buffer from the header's shape before
//! reading a byte, so a damaged or hostile header (shape 4·10⁹ × 28 × 28 in a 500 kB file) ends
//! the process with an allocation failure instead of an error naming the file. The header parser
//! and the element readers stay ndarray-npy's; the check between them is ours.

use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::Path;

use ndarray::{Array, ArrayD, Dimension};
use ndarray_npy::npy::header::Header;
use ndarray_npy::{ReadNpyError, ReadNpyExt, ReadableElement};
use zip::ZipArchive;

use crate::error::{DataError, Result};

/// Why an array could not be read.
#[derive(Debug)]
pub(crate) enum ArrayError {
    /// It holds another element type (numpy's descriptor, such as `'<f4'`): a caller trying
    /// several types goes on to the next.
    WrongType(String),
    Bad(String),
}

impl ArrayError {
    /// What went wrong, for an array that should have held `T`s.
    pub(crate) fn describe<T>(self) -> String {
        match self {
            Self::WrongType(d) => {
                format!("holds {d} values, expected {}", std::any::type_name::<T>())
            }
            Self::Bad(why) => why,
        }
    }
}

/// Reads a `.npy` file.
pub fn read_npy<T: ReadableElement, D: Dimension>(path: &Path) -> Result<Array<T, D>> {
    let read = || -> std::result::Result<Array<T, D>, ArrayError> {
        let bad = |e: std::io::Error| ArrayError::Bad(e.to_string());
        let mut f = BufReader::new(File::open(path).map_err(bad)?);
        let len = f.get_ref().metadata().map_err(bad)?.len();
        check(&mut f, len)?;
        f.rewind().map_err(bad)?;
        Array::<T, D>::read_npy(f).map_err(from_npy)
    };
    read().map_err(|e| DataError::format(path, "npy", e.describe::<T>()))
}

/// An `.npz` archive (a zip of `.npy` entries, compressed or stored).
pub(crate) struct Npz {
    zip: ZipArchive<BufReader<File>>,
    names: Vec<String>,
}

impl Npz {
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let f = File::open(path).map_err(|e| DataError::io(path, e))?;
        let zip =
            ZipArchive::new(BufReader::new(f)).map_err(|e| DataError::format(path, "npz", e))?;
        let names = zip
            .file_names()
            .map(|n| n.strip_suffix(".npy").unwrap_or(n).to_string())
            .collect();
        Ok(Self { zip, names })
    }

    /// The arrays' names, without `.npy`.
    pub(crate) fn names(&self) -> &[String] {
        &self.names
    }

    pub(crate) fn read<T: ReadableElement>(
        &mut self,
        key: &str,
    ) -> std::result::Result<ArrayD<T>, ArrayError> {
        let entry = if self.zip.index_for_name(&format!("{key}.npy")).is_some() {
            format!("{key}.npy")
        } else {
            key.to_string()
        };
        let bad = |e: zip::result::ZipError| ArrayError::Bad(e.to_string());
        let e = self.zip.by_name(&entry).map_err(bad)?;
        let len = e.size();
        check(e, len)?;
        let e = self.zip.by_name(&entry).map_err(bad)?;
        ArrayD::<T>::read_npy(e).map_err(from_npy)
    }
}

fn from_npy(e: ReadNpyError) -> ArrayError {
    match e {
        ReadNpyError::WrongDescriptor(d) => ArrayError::WrongType(d.to_string()),
        e => ArrayError::Bad(e.to_string()),
    }
}

/// Reads the header at the start of `r`, `len` bytes long in all, and checks that the data it
/// declares is the data that follows it, and that this machine can allocate it.
fn check(r: impl Read, len: u64) -> std::result::Result<(), ArrayError> {
    let mut r = r.take(u64::MAX);
    let header = Header::from_reader(&mut r).map_err(|e| ArrayError::Bad(e.to_string()))?;
    let follows = len.saturating_sub(u64::MAX - r.limit());
    // An element type without a plain size (structured, datetime) is refused by the element
    // reader before it allocates, with its own message.
    let Some(item) = item_size(&header.type_descriptor.to_string()) else {
        return Ok(());
    };
    let declared = header
        .shape
        .iter()
        .try_fold(item, |n, &d| n.checked_mul(d as u64));
    if declared != Some(follows) {
        let declared = declared.map_or("more than 2^64".into(), |n| n.to_string());
        return Err(ArrayError::Bad(format!(
            "its header declares shape {:?} of {item}-byte values ({declared} bytes) but {follows} \
             bytes follow it (damaged or truncated)",
            header.shape
        )));
    }
    // The archive's own sizes can lie too: a reservation that fails is an error, not an abort.
    if !crate::can_allocate(follows as f64) {
        return Err(ArrayError::Bad(format!(
            "holds {follows} bytes of data, more than this machine can allocate"
        )));
    }
    Ok(())
}

/// Bytes per element of a numpy type descriptor literal such as `'<f4'` or `'|u1'`.
fn item_size(descriptor: &str) -> Option<u64> {
    let d = descriptor.trim_matches(|c| c == '\'' || c == '"');
    let d = d.trim_start_matches(['<', '>', '|', '=']);
    let mut chars = d.chars();
    chars.next().filter(char::is_ascii_alphabetic)?;
    chars.as_str().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array1;
    use ndarray_npy::WriteNpyExt;

    #[test]
    fn item_sizes_of_numpy_descriptors() {
        assert_eq!(item_size("'<f4'"), Some(4));
        assert_eq!(item_size("'|u1'"), Some(1));
        assert_eq!(item_size("'<c16'"), Some(16));
        assert_eq!(item_size("'<M8[ns]'"), None);
        assert_eq!(item_size("[('a', '<i4')]"), None);
    }

    #[test]
    fn a_size_this_machine_cannot_allocate_is_an_error() {
        // Header and length agree (2^60 bytes): only the reservation can refuse it.
        let mut npy = Vec::new();
        Array1::<u8>::zeros(3).write_npy(&mut npy).unwrap();
        let mut h = Header::from_reader(&mut &npy[..]).unwrap();
        h.shape = vec![1 << 30, 1 << 30];
        let bytes = h.to_bytes().unwrap();
        let len = bytes.len() as u64 + (1 << 60);
        let Err(ArrayError::Bad(why)) = check(&bytes[..], len) else {
            panic!("2^60 bytes must be refused")
        };
        assert!(why.contains("more than this machine can allocate"), "{why}");
        // The same header with the data it declares missing.
        let Err(ArrayError::Bad(why)) = check(&bytes[..], bytes.len() as u64 + 10) else {
            panic!("a short file must be refused")
        };
        assert!(why.contains("but 10 bytes follow it"), "{why}");
        assert!(check(&npy[..], npy.len() as u64).is_ok());
    }
}
