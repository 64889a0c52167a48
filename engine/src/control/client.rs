//! A blocking control API client: one connection, one request at a time.

use std::io::{self, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::protocol::{read_line_bounded, Framed};
use super::ControlError;

/// How long the client waits for a response (and for a request write to drain). Status and
/// stats are answered from in-memory counters in microseconds; after ten seconds the engine
/// is wedged, and `strait ctl` should say so rather than hang.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest response line the client accepts. A `stats` result is about 600 bytes per
/// queue, so 16 MiB covers tens of thousands of queues while keeping a confused peer from
/// making the client buffer without end.
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// A connection to a control socket.
#[derive(Debug)]
pub struct ControlClient {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// The id of the next request; ids count up from 1 on each connection.
    next_id: u64,
}

impl ControlClient {
    /// Connects to the control socket at `path`. Reads and writes time out after
    /// [`CLIENT_TIMEOUT`].
    pub fn connect(path: &Path) -> Result<ControlClient, ControlError> {
        let connect_error = |source| ControlError::Connect {
            path: path.to_path_buf(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(connect_error)?;
        ControlClient::from_stream(path, stream).map_err(connect_error)
    }

    fn from_stream(path: &Path, stream: UnixStream) -> io::Result<ControlClient> {
        stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
        let writer = stream.try_clone()?;
        Ok(ControlClient {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
            next_id: 1,
        })
    }

    /// The path this client is connected to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends {"id":N,"cmd":cmd} (plus args if any), returns the `result` on ok, or
    /// ControlError::Remote{code,message} on an error response.
    pub fn call(&mut self, cmd: &str) -> Result<Value, ControlError> {
        self.call_with_args(cmd, Map::new())
    }

    /// Like [`ControlClient::call`], with an `args` object (sent only when not empty).
    pub fn call_with_args(
        &mut self,
        cmd: &str,
        args: Map<String, Value>,
    ) -> Result<Value, ControlError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({ "id": id, "cmd": cmd });
        if !args.is_empty() {
            request["args"] = Value::Object(args);
        }
        let response = self.call_raw(&request.to_string())?;
        self.unpack(response, id)
    }

    /// Sends one raw line and returns the raw parsed response (for tests of malformed
    /// input). A newline is appended.
    pub fn call_raw(&mut self, line: &str) -> Result<Value, ControlError> {
        let mut framed = String::with_capacity(line.len() + 1);
        framed.push_str(line);
        framed.push('\n');
        if let Err(source) = self.writer.write_all(framed.as_bytes()) {
            // The engine may have refused this connection (too many clients) and closed it
            // before our request arrived; its reason is then waiting to be read.
            if let Ok(response) = self.receive() {
                if response.get("ok") == Some(&Value::Bool(false)) {
                    return Ok(response);
                }
            }
            return Err(ControlError::Send {
                path: self.path.clone(),
                source,
            });
        }
        self.receive()
    }

    /// Reads one response line, without sending anything.
    pub fn receive(&mut self) -> Result<Value, ControlError> {
        let mut line = Vec::new();
        let framed = read_line_bounded(
            &mut self.reader,
            &mut line,
            MAX_RESPONSE_BYTES,
            // Nothing to resynchronise to: an oversized response ends the conversation.
            0,
        )
        .map_err(|source| ControlError::Receive {
            path: self.path.clone(),
            source: timeout_as_timed_out(source),
        })?;
        match framed {
            Framed::Line => {}
            Framed::End => {
                return Err(ControlError::Closed {
                    path: self.path.clone(),
                })
            }
            Framed::TooLarge { .. } => {
                return Err(ControlError::ResponseTooLarge {
                    path: self.path.clone(),
                    limit_bytes: MAX_RESPONSE_BYTES,
                })
            }
        }
        serde_json::from_slice(&line).map_err(|source| ControlError::BadResponse {
            path: self.path.clone(),
            source,
        })
    }

    /// Checks a response to request `id` and extracts its result or error.
    fn unpack(&self, mut response: Value, id: u64) -> Result<Value, ControlError> {
        let protocol = |reason: &str| ControlError::Protocol {
            path: self.path.clone(),
            reason: reason.to_string(),
        };
        let Some(object) = response.as_object_mut() else {
            return Err(protocol("the response is not a JSON object"));
        };
        let ok = object.get("ok").and_then(Value::as_bool);
        let echoed = object.get("id").cloned().unwrap_or(Value::Null);
        // An error with a null id answers no particular request (a refused connection, an
        // unreadable line); it is still the engine's answer to ours.
        let for_us = echoed == json!(id) || (ok == Some(false) && echoed.is_null());
        if !for_us {
            return Err(protocol(&format!(
                "the response carries id {echoed}, the request had {id}"
            )));
        }
        match ok {
            Some(true) => object
                .remove("result")
                .ok_or_else(|| protocol("a successful response has no `result`")),
            Some(false) => {
                let error = object.get("error");
                let field = |name: &str| {
                    error
                        .and_then(|error| error.get(name))
                        .and_then(Value::as_str)
                        .map(str::to_string)
                };
                match (field("code"), field("message")) {
                    (Some(code), message) => Err(ControlError::Remote {
                        code,
                        message: message.unwrap_or_default(),
                    }),
                    (None, _) => Err(protocol("an error response has no `error.code`")),
                }
            }
            None => Err(protocol("the response has no boolean `ok`")),
        }
    }
}

/// A read timeout shows up as `WouldBlock` on Unix sockets, whose message ("Resource
/// temporarily unavailable") would puzzle whoever reads it.
fn timeout_as_timed_out(err: io::Error) -> io::Error {
    if err.kind() == io::ErrorKind::WouldBlock {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no response within {} s", CLIENT_TIMEOUT.as_secs_f64()),
        )
    } else {
        err
    }
}

#[cfg(test)]
// A failed unwrap is a failed test, which is what a test should do.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::{BufRead, Write};
    use std::thread;

    /// Runs `call("status")` against a fake engine that answers every request line with
    /// `reply(request)`, and returns what the call made of it.
    fn call_against(reply: fn(&Value) -> String) -> Result<Value, ControlError> {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let engine = thread::spawn(move || {
            let mut reader = BufReader::new(&theirs);
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let request: Value = serde_json::from_str(&line).unwrap();
            (&theirs).write_all(reply(&request).as_bytes()).unwrap();
            request
        });
        let mut client = ControlClient::from_stream(Path::new("/fake.sock"), ours).unwrap();
        let result = client.call("status");
        let request = engine.join().unwrap();
        assert_eq!(request, json!({"id": 1, "cmd": "status"}));
        result
    }

    #[test]
    fn results_and_errors_are_unpacked() {
        let result = call_against(|request| {
            format!(
                "{}\n",
                json!({"id": request["id"], "ok": true, "result": {"a": 1}})
            )
        });
        assert_eq!(result.unwrap(), json!({"a": 1}));

        let result = call_against(|request| {
            let error = json!({"code": "internal", "message": "boom"});
            format!(
                "{}\n",
                json!({"id": request["id"], "ok": false, "error": error})
            )
        });
        match result {
            Err(ControlError::Remote { code, message }) => {
                assert_eq!((code.as_str(), message.as_str()), ("internal", "boom"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn broken_responses_are_protocol_errors() {
        let replies: [fn(&Value) -> String; 5] = [
            |_| "{\"id\":99,\"ok\":true,\"result\":{}}\n".to_string(),
            |_| "{\"id\":1,\"result\":{}}\n".to_string(),
            |_| "{\"id\":1,\"ok\":true}\n".to_string(),
            |_| "{\"id\":1,\"ok\":false,\"error\":{}}\n".to_string(),
            |_| "[1]\n".to_string(),
        ];
        for reply in replies {
            let result = call_against(reply);
            assert!(
                matches!(result, Err(ControlError::Protocol { .. })),
                "{result:?}"
            );
        }
        let result = call_against(|_| "not json\n".to_string());
        assert!(
            matches!(result, Err(ControlError::BadResponse { .. })),
            "{result:?}"
        );
        let result = call_against(|_| String::new());
        assert!(
            matches!(result, Err(ControlError::Closed { .. })),
            "{result:?}"
        );
    }
}
