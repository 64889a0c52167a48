//! The QMP client against peers that are not (well-behaved) QEMU: every case ends in a
//! clear error within its timeout, never a panic or a hang. No QEMU needed.

mod common;

use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use common::{test_dir, FakeConn, FakeServer, GREETING};
use serde_json::{json, Value};
use strait_vmm::qmp::{LineError, QmpClient, QmpConfig, QmpError, ReadError, MAX_LINE_BYTES};

/// Short timeouts so the timeout cases run fast.
fn quick() -> QmpConfig {
    QmpConfig {
        greeting_timeout: Duration::from_millis(300),
        command_timeout: Duration::from_millis(300),
        ..QmpConfig::default()
    }
}

/// Connects to a fake server running `script`, expecting the connection to fail; joins
/// the server and returns the error.
fn connect_error(script: impl FnOnce(FakeConn) + Send + 'static) -> QmpError {
    let dir = test_dir("qmp");
    let server = FakeServer::start(dir.path(), script);
    let result = QmpClient::connect_with(&server.path, quick());
    // Dropping a client closes the connection, so a script waiting for that ends.
    let connected = result.as_ref().is_ok();
    let error = result.err();
    server.join();
    assert!(
        !connected,
        "connected to a fake server that should have failed"
    );
    error.expect("an error")
}

/// Runs `test` against a client connected to a server that does the handshake and then
/// runs `script`; joins the server at the end.
fn with_session(
    script: impl FnOnce(&mut FakeConn) + Send + 'static,
    test: impl FnOnce(&QmpClient),
) {
    let dir = test_dir("qmp");
    let server = FakeServer::start(dir.path(), move |mut conn| {
        conn.handshake();
        script(&mut conn);
        conn.wait_client_close();
    });
    let client = QmpClient::connect_with(&server.path, quick()).expect("handshake");
    test(&client);
    drop(client);
    server.join();
}

fn disconnect_cause(error: QmpError) -> std::sync::Arc<ReadError> {
    match error {
        QmpError::Disconnected { source, .. } => source,
        other => panic!("expected Disconnected, got {other:?}"),
    }
}

#[test]
fn missing_socket_is_named() {
    let dir = test_dir("qmp");
    let path = dir.path().join("nothing.qmp");
    let error = QmpClient::connect(&path).expect_err("no socket");
    assert!(matches!(error, QmpError::SocketMissing { .. }), "{error:?}");
    assert!(error.to_string().contains("nothing.qmp"), "{error}");
}

#[test]
fn socket_without_listener_is_a_connect_error() {
    let dir = test_dir("qmp");
    let path = dir.path().join("stale.qmp");
    drop(UnixListener::bind(&path).expect("bind"));
    let error = QmpClient::connect(&path).expect_err("nobody listens");
    assert!(matches!(error, QmpError::Connect { .. }), "{error:?}");
}

#[test]
fn silent_server_times_out_on_the_greeting() {
    let started = Instant::now();
    let error = connect_error(|mut conn| conn.wait_client_close());
    assert!(
        matches!(error, QmpError::GreetingTimeout { .. }),
        "{error:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn non_qmp_greetings_are_refused() {
    let greetings: [&[u8]; 5] = [
        b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n",
        b"{\"return\": {}}\r\n",
        b"{\"QMP\": {\"version\": 7}}\r\n",
        b"\xff\xfe\x00garbage\n",
        b"{\"QMP\": {\"version\"",
    ];
    for greeting in greetings {
        let error = connect_error(move |mut conn| conn.send_raw(greeting));
        assert!(
            matches!(error, QmpError::NotQmp { .. }),
            "{:?}: {error:?}",
            String::from_utf8_lossy(greeting)
        );
    }
}

#[test]
fn server_closing_at_once_is_not_qmp() {
    let error = connect_error(drop);
    let QmpError::NotQmp { source, .. } = error else {
        panic!("expected NotQmp, got {error:?}");
    };
    assert!(
        matches!(source, ReadError::Line(LineError::Closed)),
        "{source:?}"
    );
}

#[test]
fn refused_capabilities_negotiation_carries_qemu_error() {
    let error = connect_error(|mut conn| {
        conn.send(GREETING);
        let command = conn.read_command().expect("qmp_capabilities");
        conn.send(
            &json!({"id": command["id"], "error": {"class": "GenericError", "desc": "no thanks"}})
                .to_string(),
        );
        conn.wait_client_close();
    });
    let QmpError::Command {
        command,
        class,
        desc,
        ..
    } = error
    else {
        panic!("expected Command, got {error:?}");
    };
    assert_eq!(
        (command.as_str(), class.as_str(), desc.as_str()),
        ("qmp_capabilities", "GenericError", "no thanks")
    );
}

#[test]
fn error_replies_are_carried_and_the_session_goes_on() {
    with_session(
        |conn| {
            let command = conn.read_command().expect("command");
            conn.send(&json!({"id": command["id"], "error": {"class": "DeviceNotFound", "desc": "no such thing"}}).to_string());
            let command = conn.read_command().expect("command");
            // An event between a command and its reply.
            conn.send(r#"{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}"#);
            conn.send(&json!({"id": command["id"], "return": {"ok": true}}).to_string());
        },
        |client| {
            let error = client
                .execute::<Value>("device_del", Some(json!({"id": "x"})))
                .expect_err("refused");
            assert!(
                matches!(&error, QmpError::Command { class, desc, .. } if class == "DeviceNotFound" && desc == "no such thing"),
                "{error:?}"
            );
            assert!(error.to_string().contains("no such thing"), "{error}");
            let value: Value = client.execute("query-ok", None).expect("second command");
            assert_eq!(value, json!({"ok": true}));
            let event = client
                .next_event(Duration::from_secs(1))
                .expect("connected")
                .expect("the STOP event was queued");
            assert_eq!(event.name, "STOP");
            assert_eq!(event.timestamp_us, Some(1_000_002));
        },
    );
}

#[test]
fn reply_without_id_goes_to_the_waiting_command() {
    with_session(
        |conn| {
            conn.read_command().expect("command");
            conn.send(r#"{"error": {"class": "GenericError", "desc": "JSON parse error"}}"#);
        },
        |client| {
            let error = client.execute::<Value>("x", None).expect_err("refused");
            assert!(matches!(error, QmpError::Command { .. }), "{error:?}");
        },
    );
}

#[test]
fn garbage_after_the_handshake_ends_the_connection() {
    let lines: [&[u8]; 6] = [
        b"this is not json\r\n",
        b"{\"return\": \r\n",
        b"[1, 2, 3]\r\n",
        b"{\"neither\": 1}\r\n",
        b"{\"return\": {}, \"id\": 999}\r\n",
        b"{\"return\": {}, \"id\": \"mine\"}\r\n",
    ];
    for line in lines {
        with_session(
            move |conn| {
                conn.read_command().expect("command");
                conn.send_raw(line);
            },
            |client| {
                let error = client.execute::<Value>("x", None).expect_err("garbage");
                let cause = disconnect_cause(error);
                assert!(
                    matches!(
                        *cause,
                        ReadError::Malformed { .. } | ReadError::UnknownId { .. }
                    ),
                    "{:?}: {cause:?}",
                    String::from_utf8_lossy(line)
                );
                // Every later call fails the same way, at once.
                let started = Instant::now();
                let again = client.execute::<Value>("y", None).expect_err("still gone");
                assert!(matches!(again, QmpError::Disconnected { .. }));
                let event = client.next_event(Duration::from_secs(5));
                assert!(matches!(event, Err(QmpError::Disconnected { .. })));
                assert!(started.elapsed() < Duration::from_secs(1));
                assert!(!client.is_connected());
            },
        );
    }
}

#[test]
fn deeply_nested_json_is_an_error_not_a_stack_overflow() {
    with_session(
        |conn| {
            conn.read_command().expect("command");
            let mut line = "[".repeat(200_000).into_bytes();
            line.extend_from_slice(b"\r\n");
            conn.send_raw(&line);
        },
        |client| {
            let cause = disconnect_cause(client.execute::<Value>("x", None).expect_err("deep"));
            assert!(matches!(*cause, ReadError::Malformed { .. }), "{cause:?}");
        },
    );
}

#[test]
fn truncated_message_then_close() {
    with_session(
        |conn| {
            conn.read_command().expect("command");
            conn.send_raw(b"{\"return\": {\"status\": \"runn");
            conn.writer_shutdown();
        },
        |client| {
            let cause = disconnect_cause(client.execute::<Value>("x", None).expect_err("cut"));
            assert!(
                matches!(*cause, ReadError::Line(LineError::ClosedMidMessage { .. })),
                "{cause:?}"
            );
        },
    );
}

#[test]
fn endless_line_is_bounded() {
    with_session(
        |conn| {
            conn.read_command().expect("command");
            let chunk = vec![b'x'; 64 * 1024];
            let mut sent = 0;
            while sent <= MAX_LINE_BYTES + chunk.len() {
                conn.send_raw(&chunk);
                sent += chunk.len();
            }
        },
        |client| {
            let cause = disconnect_cause(client.execute::<Value>("x", None).expect_err("long"));
            assert!(
                matches!(*cause, ReadError::Line(LineError::TooLong { .. })),
                "{cause:?}"
            );
        },
    );
}

#[test]
fn unanswered_command_times_out_and_its_late_reply_is_discarded() {
    with_session(
        |conn| {
            let late = conn.read_command().expect("first command");
            // Answer only when the second command arrives: the first has timed out by then.
            let second = conn.read_command().expect("second command");
            conn.send(&json!({"id": late["id"], "return": "late"}).to_string());
            conn.send(&json!({"id": second["id"], "return": "second"}).to_string());
        },
        |client| {
            let started = Instant::now();
            let error = client.execute::<Value>("slow", None).expect_err("no reply");
            assert!(
                matches!(error, QmpError::CommandTimeout { .. }),
                "{error:?}"
            );
            assert!(started.elapsed() < Duration::from_secs(5));
            let value: Value = client.execute("fast", None).expect("second command");
            assert_eq!(value, json!("second"));
            assert_eq!(client.stale_replies(), 1);
        },
    );
}

#[test]
fn undecodable_reply_is_a_decode_error() {
    with_session(
        |conn| {
            let command = conn.read_command().expect("command");
            conn.send(&json!({"id": command["id"], "return": {"status": 42}}).to_string());
        },
        |client| {
            #[derive(serde::Deserialize, Debug)]
            #[allow(dead_code)]
            struct Status {
                status: String,
            }
            let error = client
                .execute::<Status>("query-status", None)
                .expect_err("wrong type");
            assert!(matches!(error, QmpError::Decode { .. }), "{error:?}");
        },
    );
}

#[test]
fn event_flood_drops_the_oldest_and_counts() {
    const FLOOD: u64 = 1100;
    with_session(
        |conn| {
            let command = conn.read_command().expect("command");
            for pass in 0..FLOOD {
                conn.send(&json!({"event": "MIGRATION_PASS", "data": {"pass": pass}}).to_string());
            }
            conn.send(&json!({"id": command["id"], "return": {}}).to_string());
        },
        |client| {
            // The reply comes after every event, so all were queued by then.
            client.execute::<Value>("x", None).expect("reply");
            let capacity = strait_vmm::qmp::EVENT_QUEUE_CAPACITY as u64;
            assert_eq!(client.events_dropped(), FLOOD - capacity);
            assert_eq!(client.event_count(), FLOOD);
            let first = client
                .wait_event("pass 1050", Duration::from_secs(1), |e| {
                    e.data["pass"] == json!(1050)
                })
                .expect("found");
            assert_eq!(first.name, "MIGRATION_PASS");
            // wait_event consumed everything up to the match.
            let next = client
                .next_event(Duration::ZERO)
                .expect("connected")
                .expect("more events");
            assert_eq!(next.data["pass"], json!(1051));
            assert_eq!(client.drain_events().len(), (FLOOD - 1052) as usize);
            let error = client
                .wait_event("anything", Duration::from_millis(50), |_| true)
                .expect_err("no more events");
            assert!(matches!(error, QmpError::EventTimeout { .. }), "{error:?}");
        },
    );
}

#[test]
fn connect_timeout_waits_for_a_socket_that_appears() {
    let dir = test_dir("qmp");
    let path = dir.path().join("fake.qmp");
    let config = QmpConfig {
        connect_timeout: Duration::from_millis(200),
        ..quick()
    };
    let started = Instant::now();
    let error = QmpClient::connect_with(&path, config.clone()).expect_err("nothing there");
    assert!(matches!(error, QmpError::SocketMissing { .. }), "{error:?}");
    assert!(started.elapsed() >= Duration::from_millis(200));

    let server_dir = dir.path().to_owned();
    let server = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        FakeServer::start(&server_dir, |mut conn| {
            conn.handshake();
            conn.wait_client_close();
        })
    });
    let client = QmpClient::connect_with(
        &path,
        QmpConfig {
            connect_timeout: Duration::from_secs(10),
            ..config
        },
    )
    .expect("connects once the server listens");
    drop(client);
    server.join().expect("server thread").join();
}

#[test]
fn peer_closing_between_commands_is_disconnected() {
    for pause in [Duration::ZERO, Duration::from_millis(50)] {
        let dir = test_dir("qmp");
        let server = FakeServer::start(dir.path(), |mut conn| {
            conn.handshake();
            // The server hangs up.
        });
        let client = QmpClient::connect_with(&server.path, quick()).expect("handshake");
        server.join();
        std::thread::sleep(pause);
        // Whether the send fails (EPIPE) or the reader saw the end first, the error says
        // the connection is gone.
        let error = client.execute::<Value>("x", None).expect_err("closed");
        let cause = disconnect_cause(error);
        assert!(
            matches!(*cause, ReadError::Line(LineError::Closed)),
            "{cause:?}"
        );
    }
}
