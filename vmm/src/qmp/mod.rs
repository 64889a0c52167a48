//! The QMP client: the wire protocol ([`protocol`]), bounded line reading, the event queue
//! and the synchronous client with its reader thread.

mod client;
mod event_queue;
mod lines;
pub mod protocol;

pub use client::{
    QmpClient, QmpConfig, QmpError, ReadError, COMMAND_TIMEOUT, GREETING_TIMEOUT, WRITE_TIMEOUT,
};
pub use event_queue::EVENT_QUEUE_CAPACITY;
pub use lines::{LineError, MAX_LINE_BYTES};
pub use protocol::{Greeting, ParseError, QmpEvent, QmpMessage};
