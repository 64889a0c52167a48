//! Writes the seed inputs of `strait_fuzz::seeds` into a corpus directory.
//!
//! `cargo run --example seed_corpus -- corpus/request_parse` (from `fuzz/`). The corpus
//! directory is gitignored: seeds are regenerated, never committed.

use std::path::{Path, PathBuf};
use std::{env, fs, io, process};

fn main() {
    let dir = PathBuf::from(
        env::args()
            .nth(1)
            .unwrap_or_else(|| "corpus/request_parse".to_owned()),
    );
    if let Err(error) = write_seeds(&dir) {
        eprintln!("failed to write seeds into {}: {error}", dir.display());
        process::exit(1);
    }
}

fn write_seeds(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let seeds = strait_fuzz::seeds();
    for (name, bytes) in &seeds {
        fs::write(dir.join(format!("seed-{name}")), bytes)?;
    }
    eprintln!("wrote {} seeds into {}", seeds.len(), dir.display());
    Ok(())
}
