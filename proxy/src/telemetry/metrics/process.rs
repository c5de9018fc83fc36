//! The standard `process_*` series (as every Prometheus client library exports them): CPU
//! seconds, resident and virtual memory, open and allowed file descriptors, start time. Read
//! from `/proc/self` at each scrape, never on the request path; on a system without `/proc`
//! they stay 0.

use prometheus::{Counter, Gauge, Registry};

#[derive(Debug, Clone)]
pub(super) struct Process {
    /// Scrapes may run at once: the CPU counter's read-then-add is done by one at a time.
    scraping: std::sync::Arc<std::sync::Mutex<()>>,
    cpu: Counter,
    resident: Gauge,
    virtual_memory: Gauge,
    open_fds: Gauge,
    max_fds: Gauge,
    start_time: Gauge,
}

impl Process {
    pub(super) fn new() -> Self {
        let gauge = |name: &str, help: &str| Gauge::new(name, help).expect("valid metric");
        Process {
            scraping: std::sync::Arc::default(),
            cpu: Counter::new("process_cpu_seconds_total", "User and system CPU time spent")
                .expect("valid metric"),
            resident: gauge("process_resident_memory_bytes", "Resident memory size"),
            virtual_memory: gauge("process_virtual_memory_bytes", "Virtual memory size"),
            open_fds: gauge("process_open_fds", "Open file descriptors"),
            max_fds: gauge("process_max_fds", "The most file descriptors the process may open"),
            start_time: gauge(
                "process_start_time_seconds",
                "When the process started, in seconds since the Unix epoch",
            ),
        }
    }

    pub(super) fn register(&self, registry: &Registry) {
        let all: [Box<dyn prometheus::core::Collector>; 6] = [
            Box::new(self.cpu.clone()),
            Box::new(self.resident.clone()),
            Box::new(self.virtual_memory.clone()),
            Box::new(self.open_fds.clone()),
            Box::new(self.max_fds.clone()),
            Box::new(self.start_time.clone()),
        ];
        for collector in all {
            registry.register(collector).expect("registered once");
        }
    }

    /// Reads `/proc/self` into the series.
    pub(super) fn observe(&self) {
        let _one_at_a_time = self.scraping.lock().unwrap_or_else(|e| e.into_inner());
        let ticks = outrigger_sys::clock_ticks_per_second() as f64;
        if let Some(stat) =
            std::fs::read_to_string("/proc/self/stat").ok().and_then(|s| Stat::parse(&s))
        {
            let cpu = (stat.utime + stat.stime) as f64 / ticks;
            // a counter only goes up: add what was spent since the last scrape
            let spent = cpu - self.cpu.get();
            if spent > 0.0 {
                self.cpu.inc_by(spent);
            }
            self.virtual_memory.set(stat.vsize as f64);
            self.resident.set((stat.rss_pages * outrigger_sys::page_size()) as f64);
            if let Some(boot) = boot_time() {
                self.start_time.set(boot as f64 + stat.start_ticks as f64 / ticks);
            }
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(fds.count() as f64);
        }
        if let Some(max) =
            std::fs::read_to_string("/proc/self/limits").ok().and_then(|l| max_open_files(&l))
        {
            self.max_fds.set(max as f64);
        }
    }
}

/// The fields of `/proc/self/stat` the series need.
#[derive(Debug, PartialEq, Eq)]
struct Stat {
    utime: u64,
    stime: u64,
    start_ticks: u64,
    vsize: u64,
    rss_pages: u64,
}

impl Stat {
    /// Fields 14, 15, 22, 23 and 24 of proc(5); the command name (field 2) may hold spaces
    /// and parentheses, so counting starts after its last `)`.
    fn parse(text: &str) -> Option<Stat> {
        let after = &text[text.rfind(')')? + 1..];
        let fields: Vec<&str> = after.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3)?.parse().ok();
        Some(Stat {
            utime: field(14)?,
            stime: field(15)?,
            start_ticks: field(22)?,
            vsize: field(23)?,
            rss_pages: field(24)?,
        })
    }
}

/// The machine's boot time, seconds since the epoch (`btime` of `/proc/stat`).
fn boot_time() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines().find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())
}

/// The soft limit of "Max open files" in `/proc/self/limits`.
fn max_open_files(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stat_line_is_read_after_the_command_name_whatever_it_holds() {
        let line = "4242 (out (rigger) x) S 1 4242 4242 0 -1 4194560 1000 0 0 0 \
                    250 75 0 0 20 0 9 0 123456 987654321 2048 18446744073709551615";
        let stat = Stat::parse(line).expect("parsed");
        assert_eq!(
            stat,
            Stat { utime: 250, stime: 75, start_ticks: 123456, vsize: 987654321, rss_pages: 2048 }
        );
        assert_eq!(Stat::parse("garbage"), None);
    }

    #[test]
    fn the_open_files_limit_is_its_soft_value() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(max_open_files(limits), Some(1024));
    }

    #[test]
    fn a_scrape_reads_this_process() {
        let process = Process::new();
        process.observe();
        assert!(process.resident.get() > 1_000_000.0, "some resident memory");
        assert!(process.open_fds.get() >= 3.0, "stdin, stdout, stderr at least");
        assert!(process.start_time.get() > 1.7e9, "started after 2023");
    }
}
