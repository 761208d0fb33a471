//! The open-file limit (RLIMIT_NOFILE): every partition keeps a descriptor open per segment,
//! so the limit bounds how many partitions the broker can serve.

use std::io;

/// Soft and hard RLIMIT_NOFILE of this process (`u64::MAX` for unlimited).
pub fn nofile_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((rlim_to_u64(lim.rlim_cur), rlim_to_u64(lim.rlim_max)))
}

fn rlim_to_u64(v: libc::rlim_t) -> u64 {
    if v == libc::RLIM_INFINITY {
        u64::MAX
    } else {
        v
    }
}

/// Raise the soft RLIMIT_NOFILE to the hard limit. Returns the soft limit before and after.
/// (Linux keeps the hard limit at or below `fs.nr_open`, so it is always a valid soft limit.)
pub fn raise_nofile_to_hard() -> io::Result<(u64, u64)> {
    let (soft, hard) = nofile_limit()?;
    if soft >= hard {
        return Ok((soft, soft));
    }
    let lim = libc::rlimit {
        rlim_cur: hard as libc::rlim_t,
        rlim_max: hard as libc::rlim_t,
    };
    // SAFETY: setrlimit only reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((soft, hard))
}

/// Whether an I/O error means the process (EMFILE) or the system (ENFILE) ran out of file
/// descriptors.
pub fn is_out_of_fds(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// The soft limit as text for error messages.
pub fn describe_limit() -> String {
    match nofile_limit() {
        Ok((u64::MAX, _)) => "unlimited".to_string(),
        Ok((soft, _)) => soft.to_string(),
        Err(e) => format!("unknown ({e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emfile_and_enfile_are_out_of_fds() {
        assert!(is_out_of_fds(&io::Error::from_raw_os_error(libc::EMFILE)));
        assert!(is_out_of_fds(&io::Error::from_raw_os_error(libc::ENFILE)));
        assert!(!is_out_of_fds(&io::Error::from_raw_os_error(libc::ENOSPC)));
        assert!(!is_out_of_fds(&io::Error::other("x")));
    }
}
