//! The strait control API, version 1: newline-delimited JSON over a Unix stream socket.
//!
//! The message sequence on one connection (the schema is `docs/api.md`):
//!
//! 1. Client -> Engine: connects to the control socket. If [`MAX_CONNECTIONS`] clients are
//!    already connected, the engine sends one `too_many_connections` error line and closes.
//! 2. Client -> Engine: one request per line, `{"id": 7, "cmd": "status"}`, with an optional
//!    `"args": {}` object.
//! 3. Engine -> Client: exactly one response line per request line, in request order:
//!    `{"id": 7, "ok": true, "result": {..}}` or
//!    `{"id": 7, "ok": false, "error": {"code": "unknown_command", "message": ".."}}`.
//! 4. Steps 2 and 3 repeat; the connection stays open until the client closes it, it idles
//!    for [`CONNECTION_IDLE_TIMEOUT`], or the engine shuts down.
//!
//! This module holds the types and the two parsers (request lines, and line framing), kept
//! free of sockets so that they can be unit-tested and fuzzed on their own.
//!
//! [`MAX_CONNECTIONS`]: super::MAX_CONNECTIONS
//! [`CONNECTION_IDLE_TIMEOUT`]: super::CONNECTION_IDLE_TIMEOUT

use std::fmt;
use std::io::{self, BufRead};

use serde_json::{json, Map, Value};

/// The version of the control API described in `docs/api.md`. Bumped on any change that an
/// existing client could notice (a removed or renamed field, command or error code); adding a
/// field or a command does not bump it.
pub const API_VERSION: u32 = 1;

/// The longest request line the engine reads, without its newline. Every request of version
/// 1 is a few dozen bytes; 64 KiB leaves room for future arguments while bounding what one
/// client can make a connection thread buffer.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// How many bytes of an oversized request line the engine discards while looking for its
/// newline before it gives up on resynchronising and closes the connection. Sixteen times the
/// request limit: a client that overshoots by a frame or two gets its error and keeps its
/// connection; a stream that goes on this long without a newline is not a framing slip, and
/// reading it would tie up a connection thread for as long as the client cares to send.
pub const MAX_DISCARD_BYTES: usize = 16 * MAX_REQUEST_BYTES;

/// The error codes of version 1. The wire form is [`ErrorCode::as_str`]; clients must treat
/// a code they do not know as a failure of the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The request line is not JSON. The response's id is null: none could be read.
    ParseError,
    /// The line is JSON but not a request: not an object, `cmd` missing or not a string, `id`
    /// not a scalar, `args` not an object, or arguments to a command that takes none.
    InvalidRequest,
    /// `cmd` names no command of this engine; the message lists the known ones.
    UnknownCommand,
    /// The line is longer than [`MAX_REQUEST_BYTES`].
    RequestTooLarge,
    /// The engine already serves its maximum number of clients; sent once, then it closes.
    TooManyConnections,
    /// The engine failed to answer a valid request (a handler panicked).
    Internal,
    /// The command's arguments are missing, of the wrong type or out of range.
    InvalidArgs,
    /// The engine cannot do this now (for example it already replicates, or it was
    /// started without a way to authenticate a peer); the message says why.
    Refused,
    /// An operation of this kind is already running (a `verify`); wait for it to end.
    Busy,
}

impl ErrorCode {
    /// Every code, for documentation and tests.
    pub const ALL: [ErrorCode; 9] = [
        ErrorCode::ParseError,
        ErrorCode::InvalidRequest,
        ErrorCode::UnknownCommand,
        ErrorCode::RequestTooLarge,
        ErrorCode::TooManyConnections,
        ErrorCode::Internal,
        ErrorCode::InvalidArgs,
        ErrorCode::Refused,
        ErrorCode::Busy,
    ];

    /// The code as it appears in `error.code`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::ParseError => "parse_error",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::UnknownCommand => "unknown_command",
            ErrorCode::RequestTooLarge => "request_too_large",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::Internal => "internal",
            ErrorCode::InvalidArgs => "invalid_args",
            ErrorCode::Refused => "refused",
            ErrorCode::Busy => "busy",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The commands of version 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// The served disk, queues, negotiated features and VMM connection (from the handler).
    Status,
    /// Per-queue counters, rates and latency percentiles (from the handler).
    Stats,
    /// The API and engine versions.
    Version,
    /// The list of commands.
    Help,
    /// Starts replicating the served disk to a destination engine (`args.to`).
    Replicate,
    /// Starts comparing the replica with the served disk (`args.repair` optional).
    Verify,
    /// Makes a replica (a destination) a disk of its own (`args.force` optional).
    Promote,
    /// Fences a source's disk; replication tells the destination once it has every write.
    Demote,
    /// Live-migrates the VM (disk and memory) to the destination engine.
    Migrate,
    /// Rolls a migration back before its commit.
    MigrateCancel,
}

impl Command {
    /// Every command, in the order `help` lists them.
    pub const ALL: [Command; 10] = [
        Command::Status,
        Command::Stats,
        Command::Version,
        Command::Help,
        Command::Replicate,
        Command::Verify,
        Command::Promote,
        Command::Demote,
        Command::Migrate,
        Command::MigrateCancel,
    ];

    /// The command's name in `cmd`.
    pub fn name(self) -> &'static str {
        match self {
            Command::Status => "status",
            Command::Stats => "stats",
            Command::Version => "version",
            Command::Help => "help",
            Command::Replicate => "replicate",
            Command::Verify => "verify",
            Command::Promote => "promote",
            Command::Demote => "demote",
            Command::Migrate => "migrate",
            Command::MigrateCancel => "migrate-cancel",
        }
    }

    /// One line for `help`.
    pub fn description(self) -> &'static str {
        match self {
            Command::Status => {
                "the served disk, its queues, negotiated features and whether a VMM is connected"
            }
            Command::Stats => {
                "per-queue request counts, throughput, latency percentiles and error counters"
            }
            Command::Version => "the control API version and the engine version",
            Command::Help => "this list of commands",
            Command::Replicate => {
                "replicate the served disk to a destination engine: args {\"to\": \"ADDR:PORT\"}"
            }
            Command::Verify => {
                "start comparing the replica with the served disk by chunk digests (progress and result in status): args {\"repair\": bool} optional"
            }
            Command::Promote => {
                "make this replica a disk of its own (refused while inconsistent or while an undemoted source is connected, unless args {\"force\": true})"
            }
            Command::Demote => {
                "fence this source's disk (guest writes fail from now on); the destination is told once it holds every write"
            }
            Command::Migrate => {
                "live-migrate the VM to the destination engine (progress in status): args {\"vmm\": \"qemu:QMP_SOCKET\", \"to\": \"ADDR:PORT\" (unless replicating already), \"dst_vmm\": \"qemu:QMP_SOCKET\", \"downtime_ms\": N, \"converge_timeout_s\": N, \"throttle\": \"vmm\"|\"cgroup\"} (last four optional)"
            }
            Command::MigrateCancel => {
                "roll the running migration back (honoured until the commit is sent)"
            }
        }
    }

    /// Looks a command up by its wire name.
    pub fn from_name(name: &str) -> Option<Command> {
        Command::ALL
            .into_iter()
            .find(|command| command.name() == name)
    }
}

/// A parsed, valid request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Echoed in the response. A JSON scalar; null when the request had none.
    pub id: Value,
    pub command: Command,
    /// The `args` object; empty when absent. Only `replicate`, `verify`, `promote` and
    /// `migrate` take arguments.
    pub args: Map<String, Value>,
}

/// Why a request line was refused, with everything needed to answer it.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestError {
    /// The request's id when it could be read, else null.
    pub id: Value,
    pub code: ErrorCode,
    pub message: String,
}

impl RequestError {
    fn new(id: Value, code: ErrorCode, message: impl Into<String>) -> Self {
        RequestError {
            id,
            code,
            message: message.into(),
        }
    }

    /// The error response line for this refusal.
    pub fn to_response(&self) -> String {
        error_response(&self.id, self.code, &self.message)
    }
}

/// Parses one request line (without its newline).
pub fn parse_request(line: &[u8]) -> Result<Request, RequestError> {
    let value: Value = serde_json::from_slice(line).map_err(|err| {
        RequestError::new(
            Value::Null,
            ErrorCode::ParseError,
            format!("the request is not valid JSON: {err}"),
        )
    })?;
    let Value::Object(mut object) = value else {
        return Err(RequestError::new(
            Value::Null,
            ErrorCode::InvalidRequest,
            "the request must be a JSON object",
        ));
    };
    let id = match object.remove("id") {
        None => Value::Null,
        Some(id @ (Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_))) => id,
        Some(_) => {
            return Err(RequestError::new(
                Value::Null,
                ErrorCode::InvalidRequest,
                "`id` must be a JSON scalar (null, boolean, number or string)",
            ))
        }
    };
    let name = match object.remove("cmd") {
        Some(Value::String(name)) => name,
        Some(_) => {
            return Err(RequestError::new(
                id,
                ErrorCode::InvalidRequest,
                "`cmd` must be a string",
            ))
        }
        None => {
            return Err(RequestError::new(
                id,
                ErrorCode::InvalidRequest,
                "the request has no `cmd`",
            ))
        }
    };
    let args = match object.remove("args") {
        None => Map::new(),
        Some(Value::Object(args)) => args,
        Some(_) => {
            return Err(RequestError::new(
                id,
                ErrorCode::InvalidRequest,
                "`args` must be a JSON object",
            ))
        }
    };
    let Some(command) = Command::from_name(&name) else {
        let message = format!(
            "unknown command `{}`; known commands: {}",
            truncate_for_message(&name),
            known_commands()
        );
        return Err(RequestError::new(id, ErrorCode::UnknownCommand, message));
    };
    // Only `replicate`, `verify`, `promote` and `migrate` take arguments (their handlers
    // check them);
    // refusing them elsewhere tells a client written for a later version that this engine
    // would not honour them.
    let takes_args = matches!(
        command,
        Command::Replicate | Command::Verify | Command::Promote | Command::Migrate
    );
    if !args.is_empty() && !takes_args {
        let message = format!("`{}` takes no arguments", command.name());
        return Err(RequestError::new(id, ErrorCode::InvalidRequest, message));
    }
    Ok(Request { id, command, args })
}

/// The longest piece of client-supplied text echoed in an error message, in characters: enough
/// to recognise a typo, short enough that a junk command name does not bloat the response.
const MAX_ECHOED_CHARS: usize = 64;

fn truncate_for_message(text: &str) -> String {
    let mut chars = text.chars();
    let mut echoed: String = chars.by_ref().take(MAX_ECHOED_CHARS).collect();
    if chars.next().is_some() {
        echoed.push('…');
    }
    echoed
}

fn known_commands() -> String {
    Command::ALL.map(Command::name).join(", ")
}

/// A success response line (without the newline).
pub fn ok_response(id: &Value, result: Value) -> String {
    json!({ "id": id, "ok": true, "result": result }).to_string()
}

/// An error response line (without the newline).
pub fn error_response(id: &Value, code: ErrorCode, message: &str) -> String {
    json!({
        "id": id,
        "ok": false,
        "error": { "code": code.as_str(), "message": message },
    })
    .to_string()
}

/// What [`read_line_bounded`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framed {
    /// A line of at most `max_line_bytes` is in the buffer, without its newline. A last line
    /// that ends at end of input rather than at a newline counts too.
    Line,
    /// The line was longer than `max_line_bytes`; the buffer is empty. `resynced` says
    /// whether the rest of the line up to its newline was discarded, so that the next read
    /// starts on a fresh line; if not (end of input, or more than `max_discard_bytes` without
    /// a newline), the stream is no longer usable.
    TooLarge { resynced: bool },
    /// End of input at a line boundary.
    End,
}

/// Reads one newline-terminated line into `line` without ever holding more than
/// `max_line_bytes` of it.
pub fn read_line_bounded<R: BufRead>(
    reader: &mut R,
    line: &mut Vec<u8>,
    max_line_bytes: usize,
    max_discard_bytes: usize,
) -> io::Result<Framed> {
    line.clear();
    // Invariant: `discarded_bytes > 0` exactly when the line has overflowed, and then `line`
    // is empty.
    let mut discarded_bytes: usize = 0;
    loop {
        let available = match reader.fill_buf() {
            Ok(available) => available,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        };
        if available.is_empty() {
            return Ok(match (discarded_bytes > 0, line.is_empty()) {
                (true, _) => Framed::TooLarge { resynced: false },
                (false, true) => Framed::End,
                (false, false) => Framed::Line,
            });
        }
        let newline = available.iter().position(|&byte| byte == b'\n');
        let chunk = &available[..newline.unwrap_or(available.len())];
        if discarded_bytes == 0 && line.len() + chunk.len() <= max_line_bytes {
            line.extend_from_slice(chunk);
        } else {
            discarded_bytes = discarded_bytes
                .saturating_add(line.len())
                .saturating_add(chunk.len());
            line.clear();
        }
        let consumed = chunk.len() + usize::from(newline.is_some());
        reader.consume(consumed);
        debug_assert!(discarded_bytes == 0 || line.is_empty());
        match (newline.is_some(), discarded_bytes > 0) {
            (true, false) => return Ok(Framed::Line),
            (true, true) => return Ok(Framed::TooLarge { resynced: true }),
            (false, true) if discarded_bytes > max_discard_bytes => {
                return Ok(Framed::TooLarge { resynced: false })
            }
            (false, _) => {}
        }
    }
}

/// Whether a line holds only whitespace. Such lines are skipped, not answered, so that a
/// person typing into `socat` can press Enter without getting an error.
pub fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

/// The `result` of `version`.
pub fn version_result() -> Value {
    json!({
        "api_version": API_VERSION,
        "engine_version": env!("CARGO_PKG_VERSION"),
    })
}

/// The `result` of `help`.
pub fn help_result() -> Value {
    let commands: Vec<Value> = Command::ALL
        .into_iter()
        .map(|command| json!({ "name": command.name(), "description": command.description() }))
        .collect();
    json!({ "api_version": API_VERSION, "commands": commands })
}

#[cfg(test)]
// A failed unwrap is a failed test, which is what a test should do.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::{BufReader, Cursor};

    fn refused(line: &str) -> RequestError {
        match parse_request(line.as_bytes()) {
            Ok(request) => panic!("{line} parsed as {request:?}"),
            Err(err) => err,
        }
    }

    #[test]
    fn valid_requests_parse() {
        let request = parse_request(br#"{"id":7,"cmd":"status"}"#).unwrap();
        assert_eq!(request.id, json!(7));
        assert_eq!(request.command, Command::Status);
        assert!(request.args.is_empty());

        let request = parse_request(br#"{"cmd":"stats","id":"a","args":{}}"#).unwrap();
        assert_eq!(request.id, json!("a"));
        assert_eq!(request.command, Command::Stats);

        let request = parse_request(b" {\"cmd\":\"help\"}\r").unwrap();
        assert_eq!(request.id, Value::Null);
        assert_eq!(request.command, Command::Help);

        let request = parse_request(br#"{"cmd":"verify","args":{"repair":true}}"#).unwrap();
        assert_eq!(request.command, Command::Verify);
        assert_eq!(request.args.get("repair"), Some(&json!(true)));
    }

    #[test]
    fn bad_requests_get_their_codes() {
        let err = refused("{\"cmd\":");
        assert_eq!((err.code, err.id), (ErrorCode::ParseError, Value::Null));

        let err = refused("[1,2]");
        assert_eq!((err.code, err.id), (ErrorCode::InvalidRequest, Value::Null));

        let err = refused(r#"{"id":{"a":1},"cmd":"status"}"#);
        assert_eq!((err.code, err.id), (ErrorCode::InvalidRequest, Value::Null));

        let err = refused(r#"{"id":3}"#);
        assert_eq!((err.code, err.id), (ErrorCode::InvalidRequest, json!(3)));

        let err = refused(r#"{"id":3,"cmd":5}"#);
        assert_eq!((err.code, err.id), (ErrorCode::InvalidRequest, json!(3)));

        let err = refused(r#"{"id":3,"cmd":"status","args":[]}"#);
        assert_eq!((err.code, err.id), (ErrorCode::InvalidRequest, json!(3)));

        let err = refused(r#"{"id":3,"cmd":"status","args":{"verbose":true}}"#);
        assert_eq!(err.code, ErrorCode::InvalidRequest);
        assert!(
            err.message.contains("takes no arguments"),
            "{}",
            err.message
        );

        let err = refused(r#"{"id":"x","cmd":"reboot"}"#);
        assert_eq!((err.code, err.id), (ErrorCode::UnknownCommand, json!("x")));
        for command in Command::ALL {
            assert!(err.message.contains(command.name()), "{}", err.message);
        }
    }

    #[test]
    fn echoed_command_names_are_truncated() {
        let name = "x".repeat(10 * MAX_ECHOED_CHARS);
        let err = refused(&format!(r#"{{"cmd":"{name}"}}"#));
        assert!(err.message.len() < 4 * MAX_ECHOED_CHARS, "{}", err.message);
    }

    #[test]
    fn responses_have_the_documented_shape() {
        let ok: Value = serde_json::from_str(&ok_response(&json!(1), json!({"a": 2}))).unwrap();
        assert_eq!(ok, json!({"id": 1, "ok": true, "result": {"a": 2}}));
        let line = error_response(&Value::Null, ErrorCode::Internal, "boom");
        assert!(!line.contains('\n'));
        let err: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            err,
            json!({"id": null, "ok": false, "error": {"code": "internal", "message": "boom"}})
        );
    }

    #[test]
    fn error_codes_are_distinct_snake_case() {
        let codes: Vec<&str> = ErrorCode::ALL.map(ErrorCode::as_str).to_vec();
        for (index, code) in codes.iter().enumerate() {
            assert!(code.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
            assert!(!codes[index + 1..].contains(code));
        }
    }

    fn frames(input: &[u8], max_line: usize, max_discard: usize) -> Vec<(Framed, Vec<u8>)> {
        // A tiny buffer makes lines span several fill_buf calls.
        let mut reader = BufReader::with_capacity(3, Cursor::new(input.to_vec()));
        let mut line = Vec::new();
        let mut out = Vec::new();
        loop {
            let framed = read_line_bounded(&mut reader, &mut line, max_line, max_discard).unwrap();
            out.push((framed, line.clone()));
            if framed == Framed::End || framed == (Framed::TooLarge { resynced: false }) {
                return out;
            }
        }
    }

    #[test]
    fn lines_are_framed_and_bounded() {
        let out = frames(b"abc\n0123456789\nxy", 5, 100);
        assert_eq!(
            out,
            vec![
                (Framed::Line, b"abc".to_vec()),
                (Framed::TooLarge { resynced: true }, Vec::new()),
                (Framed::Line, b"xy".to_vec()),
                (Framed::End, Vec::new()),
            ]
        );
        // Exactly at the limit is fine.
        assert_eq!(
            frames(b"12345\n", 5, 100)[0],
            (Framed::Line, b"12345".to_vec())
        );
    }

    #[test]
    fn endless_lines_stop_resynchronising() {
        let input = vec![b'a'; 1000];
        let out = frames(&input, 5, 100);
        assert_eq!(
            out,
            vec![(Framed::TooLarge { resynced: false }, Vec::new())]
        );
        // An oversized last line without a newline cannot be resynchronised either.
        let out = frames(b"0123456789", 5, 100);
        assert_eq!(
            out,
            vec![(Framed::TooLarge { resynced: false }, Vec::new())]
        );
    }

    #[test]
    fn blank_lines_are_recognised() {
        assert!(is_blank(b""));
        assert!(is_blank(b" \t\r"));
        assert!(!is_blank(b" {}"));
    }

    #[test]
    fn help_lists_every_command() {
        let help = help_result();
        let names: Vec<&str> = help["commands"]
            .as_array()
            .unwrap()
            .iter()
            .map(|command| command["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, Command::ALL.map(Command::name).to_vec());
        assert_eq!(version_result()["api_version"], json!(API_VERSION));
    }
}
