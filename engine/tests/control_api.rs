//! The control API end to end: a [`ControlServer`] on a per-test socket, driven by
//! [`ControlClient`] and by raw sockets, through the public `strait_engine::control` API.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use strait_engine::control::{
    ControlClient, ControlError, ControlServer, Handler, API_VERSION, MAX_CONNECTIONS,
    MAX_REQUEST_BYTES,
};

/// Upper bound on waiting for the server to notice something asynchronous (a closed client
/// freeing its slot); the wait ends as soon as it does.
const ASYNC_DEADLINE: Duration = Duration::from_secs(5);

/// Answers with fixed JSON; panics in `status` when told to.
struct FixedHandler {
    panic_on_status: bool,
}

impl Handler for FixedHandler {
    fn status(&self) -> Value {
        if self.panic_on_status {
            panic!("status handler exploded");
        }
        status_fixture()
    }

    fn stats(&self) -> Value {
        stats_fixture()
    }
}

fn status_fixture() -> Value {
    json!({
        "engine_version": "0.1.0", "api_version": 1,
        "disk": {"path": "/x/disk.img", "size_bytes": 1073741824u64, "read_only": false,
                 "block_size_bytes": 512, "direct_io": true, "serial": "strait-test"},
        "queues": 2, "queue_size": 256, "cores": [0, 1], "vmm_connected": true,
        "features": {"offered": ["VERSION_1", "FLUSH"], "acked": ["VERSION_1"],
                     "protocol": ["MQ"], "dirty_logging": false},
        "uptime_s": 12.5
    })
}

fn stats_fixture() -> Value {
    json!({
        "uptime_s": 12.5, "interval_s": 3.1,
        "queues": [{"index": 0, "core": 0, "requests": 100, "iops": 32.2,
                    "latency_us": {"p50": 40, "p99": 200, "p999": 900}}],
        "totals": {"requests": 100, "iops": 32.2}
    })
}

/// A server on a fresh temporary directory; the directory lives as long as the fixture.
struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    server: Option<ControlServer>,
}

impl Fixture {
    fn new() -> Self {
        Self::with_handler(FixedHandler {
            panic_on_status: false,
        })
    }

    fn with_handler(handler: FixedHandler) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let server = ControlServer::start(&path, Arc::new(handler)).unwrap();
        assert_eq!(server.path(), path);
        Fixture {
            _dir: dir,
            path,
            server: Some(server),
        }
    }

    fn client(&self) -> ControlClient {
        ControlClient::connect(&self.path).unwrap()
    }
}

fn handler() -> Arc<dyn Handler> {
    Arc::new(FixedHandler {
        panic_on_status: false,
    })
}

fn remote_code(result: Result<Value, ControlError>) -> (String, String) {
    match result {
        Err(ControlError::Remote { code, message }) => (code, message),
        other => panic!("expected an error response, got {other:?}"),
    }
}

fn error_code(response: &Value) -> &str {
    assert_eq!(response["ok"], json!(false), "{response}");
    response["error"]["code"].as_str().unwrap()
}

#[test]
fn status_and_stats_round_trip() {
    let fixture = Fixture::new();
    let mut client = fixture.client();
    assert_eq!(client.call("status").unwrap(), status_fixture());
    assert_eq!(client.call("stats").unwrap(), stats_fixture());
    // The same connection keeps answering.
    assert_eq!(client.call("status").unwrap(), status_fixture());
}

#[test]
fn version_and_help_are_answered_by_the_server() {
    let fixture = Fixture::new();
    let mut client = fixture.client();
    let version = client.call("version").unwrap();
    assert_eq!(version["api_version"], json!(API_VERSION));
    assert_eq!(version["engine_version"], json!(env!("CARGO_PKG_VERSION")));
    let help = client.call("help").unwrap();
    let names: Vec<&str> = help["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|command| command["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "status",
            "stats",
            "version",
            "help",
            "replicate",
            "verify",
            "promote",
            "demote",
            "migrate",
            "migrate-cancel"
        ]
    );
}

/// `replicate` checks its arguments; a handler that does not replicate refuses it.
#[test]
fn replicate_checks_its_arguments_and_is_refused_where_unsupported() {
    let fixture = Fixture::new();
    let mut client = fixture.client();
    let raw = client.call_raw(r#"{"id":1,"cmd":"replicate","args":{"to":"10.0.0.2:7400"}}"#);
    let response = raw.unwrap();
    assert_eq!(response["ok"], json!(false));
    assert_eq!(response["error"]["code"], json!("refused"));
    let raw = client.call_raw(r#"{"id":2,"cmd":"status","args":{"to":"x"}}"#);
    let response = raw.unwrap();
    assert_eq!(response["error"]["code"], json!("invalid_request"));
    // `verify` takes arguments too, and is refused where nothing replicates.
    let raw = client.call_raw(r#"{"id":3,"cmd":"verify","args":{"repair":true}}"#);
    let response = raw.unwrap();
    assert_eq!(response["error"]["code"], json!("refused"));
}

#[test]
fn ids_are_echoed() {
    let fixture = Fixture::new();
    let mut client = fixture.client();
    let response = client.call_raw(r#"{"id":42,"cmd":"version"}"#).unwrap();
    assert_eq!(response["id"], json!(42));
    assert_eq!(response["ok"], json!(true));
    let response = client.call_raw(r#"{"id":"req-7","cmd":"stats"}"#).unwrap();
    assert_eq!(response["id"], json!("req-7"));
    assert_eq!(response["result"], stats_fixture());
    // Errors echo the id too, when there is one to echo.
    let response = client.call_raw(r#"{"id":"bad","cmd":"nope"}"#).unwrap();
    assert_eq!(response["id"], json!("bad"));
    assert_eq!(error_code(&response), "unknown_command");
    // No id: null.
    let response = client.call_raw(r#"{"cmd":"version"}"#).unwrap();
    assert_eq!(response["id"], Value::Null);
}

#[test]
fn malformed_json_is_a_parse_error_and_the_connection_survives() {
    let fixture = Fixture::new();
    let mut client = fixture.client();
    let response = client.call_raw(r#"{"id":1,"cmd":"sta"#).unwrap();
    assert_eq!(error_code(&response), "parse_error");
    assert_eq!(response["id"], Value::Null);
    assert_eq!(client.call("status").unwrap(), status_fixture());
}

#[test]
fn unknown_command_lists_the_known_ones() {
    let fixture = Fixture::new();
    let mut client = fixture.client();
    let (code, message) = remote_code(client.call("reboot"));
    assert_eq!(code, "unknown_command");
    for known in ["status", "stats", "version", "help"] {
        assert!(message.contains(known), "{message}");
    }
}

#[test]
fn invalid_requests_are_refused() {
    let fixture = Fixture::new();
    let mut client = fixture.client();
    for line in [
        r#"{"id":1}"#,
        r#"{"id":1,"cmd":7}"#,
        r#"{"id":1,"cmd":"status","args":"x"}"#,
        r#"["status"]"#,
    ] {
        let response = client.call_raw(line).unwrap();
        assert_eq!(error_code(&response), "invalid_request", "{line}");
    }
    let response = client.call_raw(r#"{"id":1}"#).unwrap();
    assert_eq!(response["id"], json!(1));
    assert_eq!(client.call("stats").unwrap(), stats_fixture());
}

#[test]
fn blank_lines_are_skipped_and_pipelined_requests_answered_in_order() {
    let fixture = Fixture::new();
    let stream = UnixStream::connect(&fixture.path).unwrap();
    stream.set_read_timeout(Some(ASYNC_DEADLINE)).unwrap();
    let mut writer = &stream;
    writer
        .write_all(b"\n{\"id\":1,\"cmd\":\"version\"}\n  \n{\"id\":2,\"cmd\":\"x\"}\n{\"id\":3,\"cmd\":\"stats\"}\n")
        .unwrap();
    let mut reader = BufReader::new(&stream);
    let mut ids = Vec::new();
    for _ in 0..3 {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let response: Value = serde_json::from_str(&line).unwrap();
        ids.push(response["id"].clone());
    }
    assert_eq!(ids, [json!(1), json!(2), json!(3)]);
}

#[test]
fn oversized_line_is_refused_and_the_server_keeps_working() {
    let fixture = Fixture::new();
    let mut client = fixture.client();
    let padding = "x".repeat(MAX_REQUEST_BYTES + 1);
    let line = format!(r#"{{"id":1,"cmd":"status","pad":"{padding}"}}"#);
    let response = client.call_raw(&line).unwrap();
    assert_eq!(error_code(&response), "request_too_large");
    // The same connection resynchronised on the newline...
    assert_eq!(client.call("status").unwrap(), status_fixture());
    // ...and a new one is served too.
    assert_eq!(fixture.client().call("stats").unwrap(), stats_fixture());
    // A line of exactly the limit is still read (and refused only for what it says).
    let exact = format!(
        r#"{{"id":1,"cmd":"{}"}}"#,
        "y".repeat(MAX_REQUEST_BYTES - 17)
    );
    assert_eq!(exact.len(), MAX_REQUEST_BYTES);
    let response = client.call_raw(&exact).unwrap();
    assert_eq!(error_code(&response), "unknown_command");
}

#[test]
fn handler_panic_is_an_internal_error_and_the_server_survives() {
    let fixture = Fixture::with_handler(FixedHandler {
        panic_on_status: true,
    });
    let mut client = fixture.client();
    let (code, message) = remote_code(client.call("status"));
    assert_eq!(code, "internal");
    assert!(message.contains("status handler exploded"), "{message}");
    // The connection and the server are both still there.
    assert_eq!(client.call("stats").unwrap(), stats_fixture());
    assert_eq!(remote_code(client.call("status")).0, "internal");
    assert_eq!(fixture.client().call("stats").unwrap(), stats_fixture());
}

#[test]
fn socket_mode_is_0600() {
    let fixture = Fixture::new();
    let mode = std::fs::metadata(&fixture.path)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
}

#[test]
fn second_server_on_the_same_path_is_refused() {
    let fixture = Fixture::new();
    let err = ControlServer::start(&fixture.path, handler()).unwrap_err();
    assert!(matches!(err, ControlError::InUse { .. }), "{err:?}");
    assert!(err.to_string().contains("in use"), "{err}");
    // The refusal left the first server alone.
    assert_eq!(fixture.client().call("stats").unwrap(), stats_fixture());
}

#[test]
fn stale_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.sock");
    drop(UnixListener::bind(&path).unwrap());
    assert!(
        path.exists(),
        "the stale socket file should remain after its listener closes"
    );
    let server = ControlServer::start(&path, handler()).unwrap();
    assert_eq!(
        ControlClient::connect(&path)
            .unwrap()
            .call("stats")
            .unwrap(),
        stats_fixture()
    );
    server.shutdown();
}

#[test]
fn a_path_that_is_not_a_socket_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.sock");
    std::fs::write(&path, b"precious").unwrap();
    let err = ControlServer::start(&path, handler()).unwrap_err();
    assert!(matches!(err, ControlError::NotASocket { .. }), "{err:?}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

#[test]
fn shutdown_removes_the_socket_and_closes_connections() {
    let mut fixture = Fixture::new();
    // An idle connection and one stuck mid-line must not hold shutdown up.
    let mut idle = fixture.client();
    assert_eq!(idle.call("version").unwrap()["api_version"], json!(1));
    let mut partial = UnixStream::connect(&fixture.path).unwrap();
    partial.write_all(br#"{"id":1,"cmd":"st"#).unwrap();

    let started = Instant::now();
    fixture.server.take().unwrap().shutdown();
    assert!(
        started.elapsed() < ASYNC_DEADLINE,
        "shutdown took {:?}",
        started.elapsed()
    );
    assert!(
        !fixture.path.exists(),
        "shutdown left the socket file behind"
    );
    assert!(idle.call("version").is_err());
    assert!(matches!(
        ControlClient::connect(&fixture.path),
        Err(ControlError::Connect { .. })
    ));
}

#[test]
fn drop_shuts_the_server_down() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.sock");
    drop(ControlServer::start(&path, handler()).unwrap());
    assert!(!path.exists());
    // The path is free again.
    ControlServer::start(&path, handler()).unwrap().shutdown();
}

#[test]
fn client_vanishing_mid_line_harms_nothing() {
    let fixture = Fixture::new();
    for _ in 0..4 {
        let mut stream = UnixStream::connect(&fixture.path).unwrap();
        stream.write_all(br#"{"id":1,"cmd":"sta"#).unwrap();
        drop(stream);
    }
    // One that sends a request and leaves before reading the answer.
    let mut stream = UnixStream::connect(&fixture.path).unwrap();
    stream
        .write_all(b"{\"id\":1,\"cmd\":\"status\"}\n")
        .unwrap();
    drop(stream);
    assert_eq!(fixture.client().call("status").unwrap(), status_fixture());
}

#[test]
fn clients_beyond_the_limit_are_refused_with_a_reason() {
    let fixture = Fixture::new();
    let mut clients: Vec<ControlClient> = (0..MAX_CONNECTIONS).map(|_| fixture.client()).collect();
    // Every one of them is admitted and served.
    for client in &mut clients {
        assert_eq!(client.call("version").unwrap()["api_version"], json!(1));
    }
    let mut extra = fixture.client();
    let (code, message) = remote_code(extra.call("version"));
    assert_eq!(code, "too_many_connections");
    assert!(message.contains(&MAX_CONNECTIONS.to_string()), "{message}");

    // A slot frees up once a client leaves; the server notices on its own schedule.
    drop(clients.pop());
    let deadline = Instant::now() + ASYNC_DEADLINE;
    loop {
        match fixture.client().call("version") {
            Ok(version) => {
                assert_eq!(version["api_version"], json!(1));
                break;
            }
            Err(ControlError::Remote { code, .. }) if code == "too_many_connections" => {
                assert!(Instant::now() < deadline, "the freed slot was never reused");
                thread::sleep(Duration::from_millis(5));
            }
            Err(err) => panic!("unexpected error: {err:?}"),
        }
    }
    // The clients that stayed are still served.
    assert_eq!(clients[0].call("stats").unwrap(), stats_fixture());
}

#[test]
fn concurrent_clients_are_served() {
    let fixture = Fixture::new();
    let path: &Path = &fixture.path;
    thread::scope(|scope| {
        for _ in 0..8 {
            scope.spawn(move || {
                let mut client = ControlClient::connect(path).unwrap();
                for _ in 0..50 {
                    assert_eq!(client.call("stats").unwrap(), stats_fixture());
                }
            });
        }
    });
}

#[test]
fn connect_to_a_missing_socket_fails_with_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.sock");
    let err = ControlClient::connect(&path).unwrap_err();
    assert!(matches!(err, ControlError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains("absent.sock"), "{err}");
}

/// Runs the `strait` binary with `args`.
fn strait(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_strait"))
        .args(args)
        .output()
        .unwrap()
}

fn ctl(path: &Path, args: &[&str]) -> Output {
    let mut all = vec!["ctl".as_ref(), "--control".as_ref(), path.as_os_str()];
    all.extend(args.iter().map(|arg| std::ffi::OsStr::new(*arg)));
    strait(&all)
}

#[test]
fn ctl_json_prints_the_raw_result() {
    let fixture = Fixture::new();
    for (command, expected) in [("status", status_fixture()), ("stats", stats_fixture())] {
        let output = ctl(&fixture.path, &["--json", command]);
        assert!(output.status.success(), "{output:?}");
        let printed: Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(printed, expected);
    }
}

#[test]
fn ctl_renders_for_people() {
    let fixture = Fixture::new();
    let output = ctl(&fixture.path, &["status"]);
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(
        text.starts_with("strait engine 0.1.0 (control API 1)"),
        "{text}"
    );
    assert!(text.contains("/x/disk.img"), "{text}");

    let output = ctl(&fixture.path, &["stats"]);
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(lines[1].contains("IOPS"), "{text}");
    assert!(lines[3].trim_start().starts_with("total"), "{text}");
}

#[test]
fn ctl_without_an_engine_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.sock");
    let output = ctl(&path, &["status"]);
    assert!(!output.status.success());
    assert!(output.stdout.is_empty());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("is `strait serve` running?"), "{stderr}");
    assert!(stderr.contains("absent.sock"), "{stderr}");
}

#[test]
fn ctl_reports_an_engine_error() {
    let fixture = Fixture::with_handler(FixedHandler {
        panic_on_status: true,
    });
    let output = ctl(&fixture.path, &["status"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("`status` on control socket"), "{stderr}");
}
