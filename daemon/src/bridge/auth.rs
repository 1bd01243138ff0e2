//! Who may use the UI socket: decided from the peer's credentials (SO_PEERCRED), never
//! from anything the client says.

use std::ffi::CString;

use nix::unistd::{Gid, Uid, User};

use crate::config::Settings;

/// Allowed when the peer's uid is listed, or its primary or any supplementary group is.
pub fn is_allowed(uid: u32, gid: u32, settings: &Settings) -> bool {
    if settings.allowed_uids.contains(&uid) || settings.allowed_gids.contains(&gid) {
        return true;
    }
    if settings.allowed_gids.is_empty() {
        return false;
    }
    supplementary_groups(uid, gid)
        .iter()
        .any(|g| settings.allowed_gids.contains(g))
}

/// The groups of the user behind `uid` as the system's user database lists them (the
/// kernel's peer credentials carry only the primary group).
fn supplementary_groups(uid: u32, gid: u32) -> Vec<u32> {
    let Ok(Some(user)) = User::from_uid(Uid::from_raw(uid)) else {
        return Vec::new();
    };
    let Ok(name) = CString::new(user.name) else {
        return Vec::new();
    };
    nix::unistd::getgrouplist(&name, Gid::from_raw(gid))
        .map(|gs| gs.into_iter().map(Gid::as_raw).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_uids_and_gids_pass_others_do_not() {
        let mut s = crate::config::load(None).unwrap();
        s.allowed_uids = [1000].into();
        s.allowed_gids = [2000].into();
        assert!(is_allowed(1000, 5, &s));
        assert!(is_allowed(4242, 2000, &s));
        assert!(!is_allowed(4242, 4242, &s));
    }
}
