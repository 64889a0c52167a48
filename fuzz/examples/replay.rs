//! Runs saved inputs through the `request_parse` harness outside libFuzzer: no sanitizer,
//! no nightly flags, a plain binary a debugger can step through. Prints each decoded input
//! and what the parser returned; a parser panic or broken promise panics here as it did
//! under the fuzzer.
//!
//! `cargo run --example replay -- artifacts/request_parse/crash-<sha1> [more inputs]`

use std::{env, fs, process};

fn main() {
    let paths: Vec<String> = env::args().skip(1).collect();
    if paths.is_empty() {
        eprintln!("usage: replay <input>...");
        process::exit(2);
    }
    for path in paths {
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) => {
                eprintln!("failed to read fuzz input {path}: {error}");
                process::exit(1);
            }
        };
        print_case(&path, &bytes);
        println!("{path}: {:#?}", strait_fuzz::request_parse(&bytes));
    }
}

/// One line per descriptor, the data as hex: compact enough to read a whole chain.
fn print_case(path: &str, bytes: &[u8]) {
    let Some(case) = strait_fuzz::ChainCase::decode(bytes) else {
        println!(
            "{path}: {} bytes, too short to describe a chain",
            bytes.len()
        );
        return;
    };
    println!("{path}: head {} control {:#04x}", case.head, case.control);
    for (table, descs) in [("main", &case.main), ("indirect", &case.indirect)] {
        for (index, desc) in descs.iter().enumerate() {
            println!("  {table}[{index}] {desc:x?}");
        }
    }
    println!(
        "  data ({} bytes at DATA_ADDR): {:02x?}",
        case.data.len(),
        case.data
    );
}
