//! The deploy records this node keeps, and their file (`workloads/records.json` in the config
//! directory, written whole and renamed into place). Imports nothing of the node.

use std::path::PathBuf;

use macula_workloads::record::Records;
use parking_lot::Mutex;

/// The records, and where they are kept.
pub struct Desired {
    pub records: Mutex<Records>,
    file: Option<PathBuf>,
}

impl Desired {
    /// Loads the records kept at `file` (none if it does not exist; a file that cannot be read
    /// is moved aside, logged, and the node starts from what peers send it).
    pub fn load(file: Option<PathBuf>) -> Desired {
        let records = file
            .as_ref()
            .and_then(|f| match std::fs::read_to_string(f) {
                Ok(text) => match serde_json::from_str(&text) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        tracing::error!(file = %f.display(), "deploy records unreadable ({e}); moved aside");
                        let _ = std::fs::rename(f, f.with_extension("json.bad"));
                        None
                    }
                },
                Err(_) => None,
            })
            .unwrap_or_default();
        Desired {
            records: Mutex::new(records),
            file,
        }
    }

    /// Writes the records to their file (a temporary file renamed over it).
    pub fn save(&self, records: &Records) -> std::io::Result<()> {
        let Some(f) = &self.file else {
            return Ok(());
        };
        if let Some(dir) = f.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = f.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(records)?)?;
        std::fs::rename(&tmp, f)
    }
}
