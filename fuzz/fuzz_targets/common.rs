//! Shared by the targets whose parser reads a path: the input is written to one file in a
//! per-process scratch folder (tmpfs when there is one) and the parser opens it.

use std::path::PathBuf;

/// Writes `data` to `name` in this process's scratch folder and returns the path.
pub fn scratch_file(name: &str, data: &[u8]) -> PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("tiller-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch folder");
    let path = dir.join(name);
    std::fs::write(&path, data).expect("scratch file");
    path
}
