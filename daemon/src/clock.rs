//! Stamps that survive the clock being set. A handheld without a battery-backed clock
//! starts with the time of its image or of its last shutdown, and NTP, the modem or
//! the back office sets it later, by months at times. Each stamp of the wall clock
//! that something is counted from (a work order's arrival, from which it expires)
//! also keeps the time since boot, which setting the clock does not move, so that
//! within the same boot the stamp can be read as the corrected clock sees it.

use std::sync::OnceLock;

use nix::time::{clock_gettime, ClockId};

use crate::store::now_ms;

/// A wall clock before this instant (2024-01-01T00:00:00Z) has not been set: no
/// fieldsyncd ran then. A stamp of another boot from before it tells nothing.
pub const SET_SINCE_MS: i64 = 1_704_067_200_000;

/// Differences smaller than this are the two clocks' reading apart, not a step.
const STEP_MS: i64 = 2_000;

/// When something happened, by both clocks.
#[derive(Clone, Debug, PartialEq)]
pub struct Stamp {
    pub wall_ms: i64,
    /// The boot the stamp was made in, and the time since that boot; `None` where the
    /// kernel does not say (then the wall clock is all there is).
    pub boot: Option<String>,
    pub since_boot_ms: Option<i64>,
}

impl Stamp {
    pub fn now() -> Stamp {
        Stamp {
            wall_ms: now_ms(),
            boot: boot_id().map(str::to_owned),
            since_boot_ms: since_boot_ms(),
        }
    }

    /// The stamp's wall time as the clock reads now: in this boot, now less the time
    /// that has passed since; in another, as it was written, unless it was written by a
    /// clock not yet set, in which case `None`.
    pub fn wall_now(&self) -> Option<i64> {
        if let (Some(boot), Some(then), Some(current), Some(since)) = (
            self.boot.as_deref(),
            self.since_boot_ms,
            boot_id(),
            since_boot_ms(),
        ) {
            if boot == current && since >= then {
                let corrected = now_ms() - (since - then);
                // The same reading within the clocks' jitter keeps the figure steady.
                return Some(if (corrected - self.wall_ms).abs() < STEP_MS {
                    self.wall_ms
                } else {
                    corrected
                });
            }
        }
        (self.wall_ms >= SET_SINCE_MS).then_some(self.wall_ms)
    }
}

/// Whether the wall clock has been set at all.
pub fn is_set() -> bool {
    now_ms() >= SET_SINCE_MS
}

/// The kernel's id of this boot.
pub fn boot_id() -> Option<&'static str> {
    static BOOT: OnceLock<Option<String>> = OnceLock::new();
    BOOT.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    })
    .as_deref()
}

/// Milliseconds since boot, suspended time included (an inspector's handheld sleeps
/// in a pocket, and a work order ages meanwhile).
pub fn since_boot_ms() -> Option<i64> {
    clock_gettime(ClockId::CLOCK_BOOTTIME)
        .ok()
        .map(|t| t.tv_sec() * 1000 + t.tv_nsec() / 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_of_this_boot_follows_a_step_of_the_clock() {
        let now = Stamp::now();
        assert_eq!(now.wall_now(), Some(now.wall_ms), "no step: as written");
        // Written a year behind, an hour ago by the clock since boot: the clock was
        // set since, and the stamp is read as an hour ago.
        let hour = 3_600_000;
        let stale = Stamp {
            wall_ms: now.wall_ms - 365 * 24 * hour,
            boot: now.boot.clone(),
            since_boot_ms: now.since_boot_ms.map(|s| s - hour),
        };
        let read = stale.wall_now().unwrap();
        assert!((read - (now_ms() - hour)).abs() < 1000, "{read}");
    }

    #[test]
    fn a_stamp_of_another_boot_is_as_written_unless_the_clock_was_unset() {
        let other = |wall_ms| Stamp {
            wall_ms,
            boot: Some("another boot".into()),
            since_boot_ms: Some(5),
        };
        assert_eq!(other(SET_SINCE_MS + 7).wall_now(), Some(SET_SINCE_MS + 7));
        assert_eq!(other(86_400_000).wall_now(), None, "1970: never set");
        let unknown = Stamp {
            wall_ms: 86_400_000,
            boot: None,
            since_boot_ms: None,
        };
        assert_eq!(unknown.wall_now(), None);
    }
}
