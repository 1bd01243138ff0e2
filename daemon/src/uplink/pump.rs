//! Drives a connected rumqttc event loop on a task of its own and hands the session the
//! events it acts on.
//!
//! Why: rumqttc writes what was published, and reads what arrives, only while its event
//! loop is polled. Polled from the session's own loop, the connection stood still each
//! time the session waited for the store (reading the next batch, recording it as sent),
//! so batches went out and acknowledgements came in by turns. On its own task the event
//! loop keeps the socket busy both ways while the session works. The queue between them
//! is short: it needs room only for the answers to a window of batches, and a session
//! that falls behind then stops the task reading, so TCP slows the broker down and at
//! most [`QUEUE`] messages (each within `uplink.max_downlink_bytes`) wait in memory.

use std::sync::{Arc, Mutex};

use rumqttc::{Event, EventLoop, Incoming, Outgoing};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Events the session has not taken yet.
const QUEUE: usize = 4;

pub struct Pump {
    events: mpsc::Receiver<Result<Event, String>>,
    task: JoinHandle<()>,
    /// Why the connection failed, kept apart from the queue: the session may first
    /// notice the failure as a publish that cannot go, which says nothing of the cause.
    failure: Arc<Mutex<Option<String>>>,
}

impl Pump {
    /// Takes over an event loop whose connection is up (its ConnAck was read).
    pub fn start(mut eventloop: EventLoop) -> Pump {
        let (tx, events) = mpsc::channel(QUEUE);
        let failure = Arc::new(Mutex::new(None));
        let failed = failure.clone();
        let task = tokio::spawn(async move {
            loop {
                let event = eventloop.poll().await.map_err(|e| e.to_string());
                // The next poll after an error would reconnect on its own; the session
                // decides that, with its backoff and a fresh client.
                let ends = event.is_err();
                if let Err(e) = &event {
                    if let Ok(mut f) = failed.lock() {
                        *f = Some(e.clone());
                    }
                }
                if wanted(&event) && tx.send(event).await.is_err() {
                    return;
                }
                if ends {
                    return;
                }
            }
        });
        Pump {
            events,
            task,
            failure,
        }
    }

    /// Why the connection failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }

    /// The next event the session acts on. An error ends the connection.
    pub async fn next(&mut self) -> Result<Event, String> {
        match self.events.recv().await {
            Some(event) => event,
            None => Err("the MQTT connection task ended".into()),
        }
    }
}

impl Drop for Pump {
    /// Dropping the pump closes the connection: the event loop goes with its task.
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the session acts on: messages, a refused subscription, the end of a clean
/// disconnect, and failures. PUBACKs, pings and the like only keep the loop going.
fn wanted(event: &Result<Event, String>) -> bool {
    match event {
        Ok(Event::Incoming(Incoming::Publish(_) | Incoming::SubAck(_))) => true,
        Ok(Event::Outgoing(Outgoing::Disconnect)) => true,
        Ok(_) => false,
        Err(_) => true,
    }
}
