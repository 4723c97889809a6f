//! A process's line of `/proc/PID/stat` (or a thread's, `/proc/PID/task/TID/stat`): its state,
//! CPU time and start time, for every crate of kd (the lab's and the tests' pidfiles and
//! waits, the benches' CPU counts), read one way.
use std::path::Path;

/// The fields of a `/proc/PID/stat` line that kd reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// One letter: `R`, `S`, `D`, `T`, `Z` (zombie), `X` (dead), ...
    pub state: char,
    /// CPU time in user mode, clock ticks.
    pub utime: u64,
    /// CPU time in kernel mode, clock ticks.
    pub stime: u64,
    /// When the process started, clock ticks since boot (with the pid, it names one process).
    pub start: u64,
}

impl ProcStat {
    /// Parses a stat line: `pid (comm) state ppid ...`; the command name may hold spaces and
    /// parentheses, so the fields are counted after the last `)`.
    pub fn parse(text: &str) -> Option<ProcStat> {
        let rest = &text[text.rfind(')')? + 1..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        // rest starts at field 3 (state): utime is field 14, stime 15, starttime 22.
        Some(ProcStat {
            state: f.first()?.chars().next()?,
            utime: f.get(11)?.parse().ok()?,
            stime: f.get(12)?.parse().ok()?,
            start: f.get(19)?.parse().ok()?,
        })
    }

    /// `/proc/PID/stat`; `None` if there is no such process.
    pub fn of(pid: u32) -> Option<ProcStat> {
        ProcStat::read(Path::new(&format!("/proc/{pid}/stat")))
    }

    /// A stat file (a thread's: `/proc/PID/task/TID/stat`); `None` if it cannot be read.
    pub fn read(path: &Path) -> Option<ProcStat> {
        ProcStat::parse(&std::fs::read_to_string(path).ok()?)
    }

    /// Neither a zombie nor dead.
    pub fn running(&self) -> bool {
        !matches!(self.state, 'Z' | 'X')
    }

    /// User + system time, clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        self.utime + self.stime
    }
}

/// Whether `pid` exists and is neither a zombie nor dead (a zombie child is not reaped here).
pub fn alive(pid: u32) -> bool {
    ProcStat::of(pid).is_some_and(|s| s.running())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_counted_after_the_command_name() {
        let s = "1234 (kd (co) ord) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 40 0 0 20 0 3 0 \
                 777 1000 10\n";
        assert_eq!(
            ProcStat::parse(s),
            Some(ProcStat {
                state: 'S',
                utime: 250,
                stime: 40,
                start: 777
            })
        );
        let z = s.replace(") S ", ") Z ");
        assert!(!ProcStat::parse(&z).unwrap().running());
        assert_eq!(ProcStat::parse(s).unwrap().cpu_ticks(), 290);
        assert_eq!(ProcStat::parse("garbage"), None);
        assert_eq!(ProcStat::parse("1 (x) S 1 2"), None);
    }

    #[test]
    fn this_process_is_alive() {
        assert!(ProcStat::of(std::process::id()).unwrap().running());
        assert!(alive(std::process::id()));
        assert!(!alive(u32::MAX));
    }
}
