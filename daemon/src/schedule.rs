//! When to sync: the triggers that ask for one (a link appearing, a capture, a push from
//! the dispatcher, "sync now", a completed visit, the timer) and the inspector's
//! switches that decide which of them start one. The decision is a pure function with a
//! table of tests; [`Triggers`] carries the requests from the socket to the uplink.

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Trigger {
    /// A connection to the broker came up (a link appeared, or the broker came back).
    LinkUp = 1,
    /// Something was captured, edited, deleted, resent or discarded.
    Capture = 2,
    /// The dispatcher pushed work orders.
    Push = 4,
    /// "Sync now" from the app or `fieldctl`.
    SyncNow = 8,
    /// A work order reached the last stage of its workflow.
    VisitCompleted = 16,
    /// The periodic sync.
    Timer = 32,
}

impl Trigger {
    const ALL: [Trigger; 6] = [
        Trigger::SyncNow,
        Trigger::VisitCompleted,
        Trigger::LinkUp,
        Trigger::Capture,
        Trigger::Push,
        Trigger::Timer,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::LinkUp => "link up",
            Trigger::Capture => "a change",
            Trigger::Push => "a dispatcher push",
            Trigger::SyncNow => "sync now",
            Trigger::VisitCompleted => "a completed visit",
            Trigger::Timer => "the timer",
        }
    }
}

/// A set of triggers, as a bit mask.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TriggerSet(u8);

impl TriggerSet {
    pub fn insert(&mut self, t: Trigger) {
        self.0 |= t as u8;
    }

    pub fn contains(self, t: Trigger) -> bool {
        self.0 & t as u8 != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn union(self, other: TriggerSet) -> TriggerSet {
        TriggerSet(self.0 | other.0)
    }

    pub fn iter(self) -> impl Iterator<Item = Trigger> {
        Trigger::ALL.into_iter().filter(move |t| self.contains(*t))
    }
}

/// The inspector's sync switches (defaults from `[sync]` in the config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Switches {
    /// Sync by itself: on a link, a change, a push and the timer.
    pub auto_sync: bool,
    /// "Send when a visit is completed", even with auto-sync off.
    pub on_visit_completed: bool,
    /// Keep photos and attachments off cellular and metered links.
    pub files_on_wifi_only: bool,
    /// The periodic sync; `None` turns it off.
    pub interval: Option<Duration>,
}

impl Default for Switches {
    fn default() -> Switches {
        Switches {
            auto_sync: true,
            on_visit_completed: true,
            files_on_wifi_only: false,
            interval: Some(Duration::from_secs(120)),
        }
    }
}

impl Switches {
    /// Whether `trigger` starts a sync under these switches.
    pub fn starts_sync(&self, trigger: Trigger) -> bool {
        match trigger {
            Trigger::SyncNow => true,
            Trigger::VisitCompleted => self.on_visit_completed || self.auto_sync,
            Trigger::Timer => self.auto_sync && self.interval.is_some(),
            Trigger::LinkUp | Trigger::Capture | Trigger::Push => self.auto_sync,
        }
    }

    /// The first trigger of `set` that starts a sync, the most deliberate first.
    pub fn first_start(&self, set: TriggerSet) -> Option<Trigger> {
        set.iter().find(|t| self.starts_sync(*t))
    }
}

/// Sync requests from anywhere in the daemon to the uplink. Cheap to fire; the uplink
/// takes all pending ones at once.
#[derive(Default)]
pub struct Triggers {
    pending: AtomicU8,
    wake: Notify,
}

impl Triggers {
    pub fn fire(&self, t: Trigger) {
        self.pending.fetch_or(t as u8, Ordering::AcqRel);
        self.wake.notify_one();
    }

    /// The triggers fired since the last take.
    pub fn take(&self) -> TriggerSet {
        TriggerSet(self.pending.swap(0, Ordering::AcqRel))
    }

    /// Resolves once a trigger was fired since the last wait.
    pub async fn fired(&self) {
        self.wake.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Trigger::*;

    #[test]
    fn which_triggers_start_a_sync() {
        let on = Switches::default();
        let off = Switches {
            auto_sync: false,
            ..Switches::default()
        };
        let off_no_visit = Switches {
            auto_sync: false,
            on_visit_completed: false,
            ..Switches::default()
        };
        let no_timer = Switches {
            interval: None,
            ..Switches::default()
        };
        // (trigger, auto-sync on, auto-sync off, off and no visit trigger, no timer)
        let table = [
            (LinkUp, true, false, false, true),
            (Capture, true, false, false, true),
            (Push, true, false, false, true),
            (SyncNow, true, true, true, true),
            (VisitCompleted, true, true, false, true),
            (Timer, true, false, false, false),
        ];
        for (t, a, b, c, d) in table {
            assert_eq!(on.starts_sync(t), a, "{t:?} auto-sync on");
            assert_eq!(off.starts_sync(t), b, "{t:?} auto-sync off");
            assert_eq!(off_no_visit.starts_sync(t), c, "{t:?} no visit trigger");
            assert_eq!(no_timer.starts_sync(t), d, "{t:?} no timer");
        }
    }

    #[test]
    fn the_most_deliberate_trigger_is_named() {
        let mut set = TriggerSet::default();
        set.insert(Capture);
        set.insert(SyncNow);
        let off = Switches {
            auto_sync: false,
            ..Switches::default()
        };
        assert_eq!(off.first_start(set), Some(SyncNow));
        let mut only_capture = TriggerSet::default();
        only_capture.insert(Capture);
        assert_eq!(off.first_start(only_capture), None);
        assert_eq!(Switches::default().first_start(only_capture), Some(Capture));
    }

    #[tokio::test]
    async fn fired_triggers_are_taken_once() {
        let t = Triggers::default();
        t.fire(Capture);
        t.fire(Push);
        t.fired().await;
        let set = t.take();
        assert!(set.contains(Capture) && set.contains(Push) && !set.contains(Timer));
        assert!(t.take().is_empty());
    }
}
