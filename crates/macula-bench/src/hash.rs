//! Content hashing, as the Hub verifies packages: the SHA-256 of a file streamed through
//! `macula_hub::digest::hash_stream` (what the blob store and its verified reads do), side by
//! side with `sha256sum` of the same file, in one run (goal ≥ 1 GiB/s).

use std::io::Write;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};

use crate::Figure;

pub fn run(mib: u64, runs: usize) -> Result<Vec<Figure>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("blob");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
        let mut chunk = vec![0u8; 1 << 20];
        for i in 0..mib {
            // Bytes that differ from MiB to MiB (nothing a hash could shortcut).
            for (j, b) in chunk.iter_mut().enumerate() {
                *b = (i as usize * 31 + j * 7) as u8;
            }
            f.write_all(&chunk)?;
        }
        f.flush()?;
    }
    let bytes = mib << 20;
    let gib = bytes as f64 / (1u64 << 30) as f64;
    let mut ours = vec![];
    let mut theirs = vec![];
    for _ in 0..runs.max(1) {
        // The file is in the page cache after it was written: both read it from memory.
        let t = Instant::now();
        let mut f = std::fs::File::open(&path)?;
        let (d, n) = macula_hub::digest::hash_stream(&mut f, u64::MAX, |_| Ok(()))
            .map_err(|e| anyhow!("hashing: {e}"))?;
        ours.push(gib / t.elapsed().as_secs_f64());
        anyhow::ensure!(n == bytes, "read {n} of {bytes} bytes");
        let digest = d.hex();
        let t = Instant::now();
        let out = std::process::Command::new("sha256sum")
            .arg(&path)
            .output()
            .context("sha256sum (coreutils) is needed for the side-by-side figure")?;
        theirs.push(gib / t.elapsed().as_secs_f64());
        let text = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(
            text.split_whitespace().next() == Some(digest.as_str()),
            "sha256sum says {text}, macula {digest}"
        );
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (ours, theirs) = (median(&mut ours), median(&mut theirs));
    Ok(vec![
        Figure {
            scenario: format!("sha256 of {mib} MiB"),
            server: "macula",
            value: ours,
            unit: "GiB/s",
            note: format!(
                "median of {runs}; hash_stream, as the blob store reads (goal ≥ 1 GiB/s)"
            ),
        },
        Figure {
            scenario: format!("sha256 of {mib} MiB"),
            server: "sha256sum",
            value: theirs,
            unit: "GiB/s",
            note: format!(
                "median of {runs}; the process included; same digest; macula/sha256sum = {:.2}",
                ours / theirs
            ),
        },
    ])
}
