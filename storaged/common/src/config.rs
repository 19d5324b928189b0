//! Reading a settings file: TOML into a serde type. Each daemon owns its schema and how flags
//! override the file; this only reads and parses, naming the file in every error.

use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// A settings file that could not be read.
#[derive(Debug, Error)]
pub enum FileError {
    /// The file could not be read.
    #[error("reading {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The file is not valid TOML for this schema.
    #[error("parsing {0}")]
    Parse(PathBuf, #[source] toml::de::Error),
}

/// Reads the TOML file at `path` into `T`.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, FileError> {
    let text = std::fs::read_to_string(path).map_err(|e| FileError::Read(path.into(), e))?;
    toml::from_str(&text).map_err(|e| FileError::Parse(path.into(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct S {
        a: u32,
    }

    #[test]
    fn reads_and_names_the_file_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.toml");
        std::fs::write(&p, "a = 3\n").unwrap();
        assert_eq!(load_toml::<S>(&p).unwrap(), S { a: 3 });
        std::fs::write(&p, "b = 3\n").unwrap();
        assert!(matches!(load_toml::<S>(&p), Err(FileError::Parse(f, _)) if f == p));
        let missing = dir.path().join("none.toml");
        assert!(matches!(load_toml::<S>(&missing), Err(FileError::Read(..))));
    }
}
