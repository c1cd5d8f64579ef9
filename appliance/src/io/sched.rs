//! Scheduler hints for threads on a request's critical path.

use std::io;
use std::time::Duration;

/// `struct sched_attr` of `sched_setattr(2)` (the fields up to `sched_period`, size 48, which
/// every kernel since 3.14 accepts).
#[repr(C)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
}

/// Asks for a short time slice for the calling thread, staying in the normal policy
/// (`SCHED_OTHER`, nice 0; no privilege needed). Under EEVDF (Linux 6.12 and later) a task with
/// a shorter slice gets an earlier virtual deadline, so when it wakes it runs before, and is
/// not preempted by, tasks with the default slice: fit for a thread that wakes often and runs
/// briefly, such as a connection's receive thread, which otherwise waits behind the very tasks
/// it woke. The kernel clamps the slice to 0.1–100 ms; older kernels ignore it. Returns the
/// kernel's error if it refuses.
pub fn request_short_slice(slice: Duration) -> io::Result<()> {
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        sched_policy: libc::SCHED_OTHER as u32,
        sched_flags: 0,
        sched_nice: 0,
        sched_priority: 0,
        sched_runtime: u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX),
        sched_deadline: 0,
        sched_period: 0,
    };
    // SAFETY: `sched_setattr(0, attr, 0)` on the calling thread; `attr` is a valid, initialised
    // `struct sched_attr` of the size it declares, which the kernel only reads.
    let result = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The slice the kernel reports for this thread (`se.slice` of `/proc/thread-self/sched`),
    /// where it reports one.
    fn reported_slice_ns() -> Option<u64> {
        let text = std::fs::read_to_string("/proc/thread-self/sched").ok()?;
        text.lines()
            .find_map(|line| line.strip_prefix("se.slice"))
            .and_then(|rest| rest.trim().trim_start_matches(':').trim().parse().ok())
    }

    #[test]
    fn a_thread_gets_the_slice_it_asks_for() {
        std::thread::spawn(|| {
            let before = reported_slice_ns();
            request_short_slice(Duration::from_micros(100)).expect("sched_setattr");
            let after = reported_slice_ns();
            println!("se.slice {before:?} -> {after:?}");
            // Kernels before 6.12 accept the call and keep their slice; from 6.12 on the thread
            // has 0.1 ms.
            let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
            let mut numbers = release
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|part| part.parse::<u32>().ok());
            let version = (numbers.next().unwrap(), numbers.next().unwrap());
            if version >= (6, 12) {
                assert_eq!(after, Some(100_000), "kernel {}", release.trim());
            } else {
                assert_eq!(after, before, "kernel {}", release.trim());
            }
        })
        .join()
        .unwrap();
    }
}
