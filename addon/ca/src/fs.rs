//! Small filesystem helpers for persisted key material.
//!
//! Keys are written to a temporary file in the same directory and renamed into place, so
//! a crash never leaves a half-written key that a restart would then trust.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode for private keys: owner read/write only.
pub(crate) const KEY_MODE: u32 = 0o600;
/// Mode for public material (certificates, JWKS).
pub(crate) const PUBLIC_MODE: u32 = 0o644;
/// Mode for the state directory: owner only, so nobody else can list or swap its files.
const DIR_MODE: u32 = 0o700;

/// Creates `dir` (and parents) with mode 0700 if it does not exist yet. An existing
/// directory keeps its mode: changing an operator's choice silently would surprise them.
pub(crate) fn ensure_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)
}

/// Writes `contents` to `path` atomically with the given mode.
pub(crate) fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    // A stale temporary from an earlier crash would make `create_new` fail forever.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // The mode is set at creation, so the key is never readable by others, not even
    // between `open` and a later `chmod`.
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, path)?;
    // Persist the rename itself, so a power loss cannot bring back the old (or no) file.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Whether a key file can be read by group or others (a warning, not an error: the
/// operator may have reasons, but should hear about it).
pub(crate) fn is_too_open(path: &Path) -> io::Result<bool> {
    Ok(fs::metadata(path)?.permissions().mode() & 0o077 != 0)
}
