//! The WAN emulator for the tests that need one.

use strait_net::wanem::{Wanem, WanemConfig};

/// Starts `strait wanem` with `config`. It needs root and network namespaces: where they
/// are unusable the test is skipped with a loud message (`None`), except under CI (env
/// `CI` set), where that fails the test.
pub fn wanem_or_skip(config: WanemConfig) -> Option<Wanem> {
    match Wanem::start(config) {
        Ok(w) => Some(w),
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!(
                "\n**********\n*** SKIPPED: the WAN emulator cannot start here ({e}); it needs \
                 root and network namespaces\n**********\n"
            );
            None
        }
        Err(e) => panic!("the WAN emulator is required in CI: {e}"),
    }
}
