//! # QMP, the QEMU Machine Protocol, as this client speaks it
//!
//! QMP is line-oriented JSON over a stream socket (here a Unix socket that QEMU serves with
//! `-qmp unix:PATH,server=on,wait=off`). QEMU ends every message with `\r\n`; one message
//! per line.
//!
//! 1. Client connects. QEMU -> client: the greeting,
//!    `{"QMP": {"version": {...}, "capabilities": ["oob"]}}`. QEMU serves one client at a
//!    time: a second client is accepted by the kernel but greeted only when the first leaves.
//! 2. Client -> QEMU: `{"execute": "qmp_capabilities", "id": 0}`, leaving capabilities
//!    negotiation mode (no out-of-band execution is asked for).
//!    QEMU -> client: `{"return": {}, "id": 0}`.
//! 3. Client -> QEMU: `{"execute": NAME, "arguments": {...}, "id": N}`, one command at a
//!    time. QEMU runs commands in order and answers each with either
//!    `{"return": VALUE, "id": N}` or `{"error": {"class": C, "desc": D}, "id": N}`.
//!    A request QEMU cannot parse is answered with an error that carries no `id`.
//! 4. At any moment, QEMU -> client: events,
//!    `{"event": NAME, "data": {...}, "timestamp": {"seconds": S, "microseconds": U}}`,
//!    interleaved with replies (an event can arrive between a command and its reply).
//! 5. Either side closes the socket; QEMU then waits for the next client.
//!
//! The types below are the messages QEMU sends; [`QmpMessage::parse`] turns one line into
//! one of them, and is the only parser of QEMU's bytes in this crate.

use serde::Deserialize;
use serde_json::Value;

/// QMP's `qmp_capabilities` command: leaves capabilities negotiation mode.
pub(crate) const CAPABILITIES_COMMAND: &str = "qmp_capabilities";

/// The greeting QEMU sends when a client connects.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Greeting {
    /// QEMU's version, as it reports it.
    pub version: QemuVersion,
    /// Capabilities QEMU offers in negotiation (7.2 offers `oob`); none is accepted.
    #[serde(default)]
    pub capabilities: Vec<String>,
}

/// `version` in the greeting.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct QemuVersion {
    /// Major, minor and micro numbers.
    pub qemu: VersionTriple,
    /// Distribution build, e.g. `Debian 1:7.2+dfsg-7+deb12u18+b3`.
    #[serde(default)]
    pub package: String,
}

/// A version number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub struct VersionTriple {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version.
    pub micro: u32,
}

/// An asynchronous event from QEMU.
#[derive(Clone, Debug, PartialEq)]
pub struct QmpEvent {
    /// The event's name, e.g. `MIGRATION`, `STOP`, `RESUME`.
    pub name: String,
    /// The event's `data` member (`Value::Null` when absent).
    pub data: Value,
    /// When QEMU emitted it, in microseconds since the Unix epoch (`None` if QEMU sent no
    /// usable timestamp; QEMU sends `-1` when its clock failed).
    pub timestamp_us: Option<u64>,
}

/// One message from QEMU after the greeting.
#[derive(Clone, Debug, PartialEq)]
pub enum QmpMessage {
    /// A successful reply.
    Return {
        /// The `id` of the command it answers; `None` if QEMU echoed none.
        id: Option<Value>,
        /// The command's return value.
        value: Value,
    },
    /// A failed command.
    Error {
        /// The `id` of the command it answers; `None` if QEMU could not parse the request.
        id: Option<Value>,
        /// QEMU's error class, e.g. `GenericError`, `CommandNotFound`.
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },
    /// An asynchronous event.
    Event(QmpEvent),
}

/// Why one line from QEMU is not a QMP message.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The bytes are not JSON (or not UTF-8, or nested deeper than serde_json allows).
    #[error("not JSON")]
    Json(#[source] serde_json::Error),
    /// JSON, but not any message QMP defines.
    #[error("JSON but not a QMP message: {reason}")]
    Shape {
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// The greeting's wire shape: `{"QMP": {...}}`.
#[derive(Deserialize)]
struct GreetingWire {
    #[serde(rename = "QMP")]
    qmp: Greeting,
}

#[derive(Deserialize)]
struct ErrorBody {
    class: String,
    desc: String,
}

#[derive(Deserialize)]
struct Timestamp {
    seconds: i64,
    microseconds: i64,
}

impl Greeting {
    /// Parses the first line QEMU sends.
    pub fn parse(line: &[u8]) -> Result<Greeting, ParseError> {
        let value: Value = serde_json::from_slice(line).map_err(ParseError::Json)?;
        if value.get("QMP").is_none() {
            return Err(ParseError::Shape {
                reason: "no \"QMP\" member, so not a QMP greeting",
            });
        }
        let wire: GreetingWire = serde_json::from_value(value).map_err(ParseError::Json)?;
        Ok(wire.qmp)
    }
}

impl QmpMessage {
    /// Parses one line (without or with its line end) from QEMU.
    ///
    /// Never panics: anything that is not a reply or an event is a [`ParseError`].
    pub fn parse(line: &[u8]) -> Result<QmpMessage, ParseError> {
        let value: Value = serde_json::from_slice(line).map_err(ParseError::Json)?;
        let Value::Object(mut object) = value else {
            return Err(ParseError::Shape {
                reason: "not a JSON object",
            });
        };
        let id = object.remove("id");
        if let Some(value) = object.remove("return") {
            return Ok(QmpMessage::Return { id, value });
        }
        if let Some(error) = object.remove("error") {
            let body: ErrorBody = serde_json::from_value(error).map_err(|_| ParseError::Shape {
                reason: "\"error\" without a string \"class\" and \"desc\"",
            })?;
            return Ok(QmpMessage::Error {
                id,
                class: body.class,
                desc: body.desc,
            });
        }
        if let Some(name) = object.remove("event") {
            let Value::String(name) = name else {
                return Err(ParseError::Shape {
                    reason: "\"event\" is not a string",
                });
            };
            let data = object.remove("data").unwrap_or(Value::Null);
            let timestamp_us = object
                .remove("timestamp")
                .and_then(|t| serde_json::from_value::<Timestamp>(t).ok())
                .and_then(timestamp_us);
            return Ok(QmpMessage::Event(QmpEvent {
                name,
                data,
                timestamp_us,
            }));
        }
        Err(ParseError::Shape {
            reason: "neither \"return\", \"error\" nor \"event\"",
        })
    }
}

fn timestamp_us(t: Timestamp) -> Option<u64> {
    let seconds = u64::try_from(t.seconds).ok()?;
    let micros = u64::try_from(t.microseconds).ok()?;
    seconds.checked_mul(1_000_000)?.checked_add(micros)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn greeting_of_qemu_7_2() {
        let line = br#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}"#;
        let greeting = Greeting::parse(line).expect("a real greeting parses");
        assert_eq!(
            greeting.version.qemu,
            VersionTriple {
                major: 7,
                minor: 2,
                micro: 22
            }
        );
        assert_eq!(greeting.capabilities, vec!["oob".to_owned()]);
    }

    #[test]
    fn a_reply_is_not_a_greeting() {
        assert!(matches!(
            Greeting::parse(br#"{"return": {}}"#),
            Err(ParseError::Shape { .. })
        ));
        assert!(matches!(
            Greeting::parse(br#"{"QMP": 5}"#),
            Err(ParseError::Json(_))
        ));
        assert!(matches!(
            Greeting::parse(b"SSH-2.0-OpenSSH_9.2"),
            Err(ParseError::Json(_))
        ));
    }

    #[test]
    fn replies_errors_and_events() {
        assert_eq!(
            QmpMessage::parse(b"{\"return\": {\"status\": \"running\"}, \"id\": 3}\r\n")
                .expect("reply"),
            QmpMessage::Return {
                id: Some(json!(3)),
                value: json!({"status": "running"})
            }
        );
        assert_eq!(
            QmpMessage::parse(
                br#"{"id": 4, "error": {"class": "CommandNotFound", "desc": "The command bogus has not been found"}}"#
            )
            .expect("error"),
            QmpMessage::Error {
                id: Some(json!(4)),
                class: "CommandNotFound".into(),
                desc: "The command bogus has not been found".into()
            }
        );
        let event = QmpMessage::parse(
            br#"{"timestamp": {"seconds": 1795745794, "microseconds": 789414}, "event": "MIGRATION", "data": {"status": "pre-switchover"}}"#,
        )
        .expect("event");
        assert_eq!(
            event,
            QmpMessage::Event(QmpEvent {
                name: "MIGRATION".into(),
                data: json!({"status": "pre-switchover"}),
                timestamp_us: Some(1_795_745_794_789_414),
            })
        );
    }

    #[test]
    fn an_event_with_a_failed_clock_has_no_timestamp() {
        let event = QmpMessage::parse(
            br#"{"timestamp": {"seconds": -1, "microseconds": -1}, "event": "STOP"}"#,
        )
        .expect("event");
        let QmpMessage::Event(event) = event else {
            panic!("not an event: {event:?}");
        };
        assert_eq!(event.timestamp_us, None);
        assert_eq!(event.data, Value::Null);
    }

    #[test]
    fn hostile_lines_are_errors_not_panics() {
        let deep = "[".repeat(100_000);
        let cases: [&[u8]; 10] = [
            b"",
            b"garbage",
            b"{\"return\": ",
            b"[1, 2, 3]",
            b"\"QMP\"",
            b"{}",
            b"{\"error\": \"nope\"}",
            b"{\"event\": 42}",
            b"\xff\xfe{\"return\": {}}",
            deep.as_bytes(),
        ];
        for case in cases {
            assert!(
                QmpMessage::parse(case).is_err(),
                "{:?} parsed",
                String::from_utf8_lossy(&case[..case.len().min(40)])
            );
        }
    }
}
