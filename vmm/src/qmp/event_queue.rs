//! The bounded queue between the QMP reader thread and whoever consumes events.

use std::collections::VecDeque;

use super::protocol::QmpEvent;

/// Events held for consumers. A migration emits a handful of `MIGRATION` status changes plus
/// one `MIGRATION_PASS` per dirty-memory pass, and `STOP`/`RESUME` around the switchover: a
/// long WAN migration with throttling might reach a few hundred. 1024 keeps every event of a
/// migration even when nobody reads them until the end, in at most a few hundred KiB.
pub const EVENT_QUEUE_CAPACITY: usize = 1024;

/// A FIFO of events that, when full, drops its oldest event and counts it.
///
/// Dropping the oldest (rather than refusing the newest) is deliberate: an orchestrator that
/// fell behind cares most about the latest state, and the state itself can always be read
/// with a query; the drop count tells it that it missed something.
#[derive(Debug)]
pub(crate) struct EventQueue {
    // Invariant: events.len() <= capacity.
    events: VecDeque<QmpEvent>,
    capacity: usize,
    dropped_count: u64,
    received_count: u64,
}

impl EventQueue {
    pub(crate) fn new(capacity: usize) -> Self {
        assert!(capacity > 0, "an event queue must hold at least one event");
        EventQueue {
            events: VecDeque::with_capacity(capacity.min(64)),
            capacity,
            dropped_count: 0,
            received_count: 0,
        }
    }

    /// Appends `event`, dropping the oldest one if the queue is full.
    pub(crate) fn push(&mut self, event: QmpEvent) {
        if self.events.len() == self.capacity {
            self.events.pop_front();
            self.dropped_count += 1;
        }
        self.events.push_back(event);
        self.received_count += 1;
        debug_assert!(self.events.len() <= self.capacity);
    }

    pub(crate) fn pop(&mut self) -> Option<QmpEvent> {
        self.events.pop_front()
    }

    pub(crate) fn drain(&mut self) -> Vec<QmpEvent> {
        self.events.drain(..).collect()
    }

    /// Events dropped because the queue was full, since the connection opened.
    pub(crate) fn dropped_count(&self) -> u64 {
        self.dropped_count
    }

    /// Events received since the connection opened, dropped or not; it only grows, so a
    /// waiter can tell that something arrived without consuming it.
    pub(crate) fn received_count(&self) -> u64 {
        self.received_count
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn event(n: u64) -> QmpEvent {
        QmpEvent {
            name: format!("E{n}"),
            data: Value::Null,
            timestamp_us: Some(n),
        }
    }

    #[test]
    fn full_queue_drops_the_oldest_and_counts() {
        let mut queue = EventQueue::new(3);
        for n in 0..5 {
            queue.push(event(n));
        }
        assert_eq!(queue.dropped_count(), 2);
        assert_eq!(queue.received_count(), 5);
        let names: Vec<String> = queue.drain().into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["E2", "E3", "E4"]);
        assert!(queue.pop().is_none());
    }
}
