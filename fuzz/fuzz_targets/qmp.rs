//! A hostile or broken QEMU: arbitrary bytes as QMP lines (a greeting, replies, events)
//! and as the `query-migrate` answer the migration driver decodes. Parsing must return an
//! error for what is malformed, never panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_vmm::qmp::{Greeting, QmpMessage};
use strait_vmm::MigrationInfo;

fuzz_target!(|data: &[u8]| {
    for line in data.split(|&b| b == b'\n') {
        let _ = Greeting::parse(line);
        if let Ok(QmpMessage::Return { value, .. }) = QmpMessage::parse(line) {
            let _ = serde_json::from_value::<MigrationInfo>(value);
        }
    }
});
