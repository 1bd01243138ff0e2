//! Who may use the UI socket: decided from the peer's credentials (SO_PEERCRED and
//! SO_PEERGROUPS), never from anything the client says.

use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::unistd::{Gid, Uid, User};

use crate::config::Settings;

/// Allowed when the peer's uid is listed, or its primary or any supplementary group is.
/// `groups` are the supplementary groups the peer process holds.
pub fn is_allowed(uid: u32, gid: u32, groups: &[u32], settings: &Settings) -> bool {
    settings.allowed_uids.contains(&uid)
        || settings.allowed_gids.contains(&gid)
        || groups.iter().any(|g| settings.allowed_gids.contains(g))
}

/// The supplementary groups of the process at the other end of `socket`, as the kernel
/// saw them when it connected: those systemd's `SupplementaryGroups=` gives an app count,
/// whatever /etc/group says. Kernels older than 4.13 cannot say; then the user
/// database's groups for the peer's user are taken instead.
pub fn peer_groups(socket: BorrowedFd<'_>, uid: u32, gid: u32, settings: &Settings) -> Vec<u32> {
    if settings.allowed_gids.is_empty() {
        return Vec::new();
    }
    match so_peergroups(socket) {
        Ok(groups) => groups,
        Err(e) => {
            tracing::debug!(error = %e, "SO_PEERGROUPS unavailable; using the user database");
            user_database_groups(uid, gid)
        }
    }
}

/// Linux's SO_PEERGROUPS (since 4.13): 59 on every architecture a handheld runs (x86,
/// Arm, RISC-V); the libc crate exports it for none of them yet. `None` where the number
/// differs, so nothing is asked under a wrong name.
const SO_PEERGROUPS: Option<libc::c_int> = if cfg!(any(
    target_arch = "x86_64",
    target_arch = "x86",
    target_arch = "aarch64",
    target_arch = "arm",
    target_arch = "riscv64"
)) {
    Some(59)
} else {
    None
};

fn so_peergroups(socket: BorrowedFd<'_>) -> std::io::Result<Vec<u32>> {
    let Some(option) = SO_PEERGROUPS else {
        return Err(std::io::ErrorKind::Unsupported.into());
    };
    let size = std::mem::size_of::<libc::gid_t>();
    let mut groups: Vec<libc::gid_t> = vec![0; 32];
    loop {
        let mut len = (groups.len() * size) as libc::socklen_t;
        // SAFETY: the buffer is `len` bytes of gid_t, which the kernel fills and for
        // which it reports the length it used, or needs.
        let r = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let needed = len as usize / size;
        if r == 0 {
            groups.truncate(needed);
            return Ok(groups);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ERANGE) && needed > groups.len() {
            groups.resize(needed, 0);
            continue;
        }
        return Err(e);
    }
}

/// The groups of the user behind `uid` as the system's user database lists them.
fn user_database_groups(uid: u32, gid: u32) -> Vec<u32> {
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
        assert!(is_allowed(1000, 5, &[], &s));
        assert!(is_allowed(4242, 2000, &[], &s));
        assert!(is_allowed(4242, 4242, &[7, 2000], &s));
        assert!(!is_allowed(4242, 4242, &[7], &s));
    }

    #[test]
    fn the_peer_groups_are_the_processs_own() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        use std::os::fd::AsFd;
        let mut mine = nix::unistd::getgroups()
            .unwrap()
            .into_iter()
            .map(Gid::as_raw)
            .collect::<Vec<_>>();
        mine.sort_unstable();
        let mut seen = so_peergroups(a.as_fd()).unwrap();
        seen.sort_unstable();
        assert_eq!(seen, mine);
    }
}
