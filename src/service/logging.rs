//! Logging: where log records go, at which priority, and which are filtered out.
//!
//! Under systemd (`JOURNAL_STREAM` names stderr's device and inode, as
//! `sd_journal_stream_fd` and systemd.exec(5) document) records go to the journal as native
//! entries (crate `systemd-journal-logger`): each with its `PRIORITY`, so
//! `journalctl -p err -u cspine-triage` shows the errors, and with the record's key-values
//! as fields (`RESULT_ID`, `STUDY_INSTANCE_UID`, `SERIES_INSTANCE_UID`, `CALLING_AE` on the
//! key records), so `journalctl -u cspine-triage SERIES_INSTANCE_UID=1.2.3` follows a series.
//! When the journal socket cannot be reached (a container that forwards stderr only),
//! each stderr line carries an sd-daemon `<N>` priority prefix instead, which journald
//! and `systemd-cat` turn into the same priority. Anywhere else: human-readable stderr
//! lines with a timestamp, as env_logger writes them.
//!
//! Priorities (the same in both journal forms): error 3, warn 4, info 5, debug 6, trace 7.
//!
//! Filter: `RUST_LOG` (env_logger syntax) replaces [`DEFAULT_FILTER`] as a whole.

use std::io::Write;
use std::sync::OnceLock;

use log::Level;
use systemd_journal_logger::JournalLog;

/// Info and above, except: the embedded broker (rumqttd), which logs routine traffic at
/// ERROR level (our MQTT client reports every real connection problem), and the JPEG 2000
/// decoder (openjp2 through jpeg2k), which logs three INFO lines per slice.
pub const DEFAULT_FILTER: &str = "info,rumqttd=off,jpeg2k=warn,openjp2=warn";

/// Where log records go, chosen once by [`init`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Native journal entries with priority and fields.
    Journal,
    /// stderr lines with `<N>` sd-daemon priority prefixes (stderr is the journal's
    /// stream, but its native socket cannot be reached).
    PrefixedStderr,
    /// Human-readable stderr lines (a terminal, another supervisor).
    Stderr,
}

static OUTPUT: OnceLock<Output> = OnceLock::new();

/// The syslog priority of a level: the mapping `systemd-journal-logger` uses for
/// `PRIORITY`, so both journal forms agree.
pub fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 5,
        Level::Debug => 6,
        Level::Trace => 7,
    }
}

/// The filter in force: `RUST_LOG` when set, [`DEFAULT_FILTER`] otherwise.
pub fn filter_spec(rust_log: Option<&str>) -> &str {
    rust_log
        .filter(|spec| !spec.trim().is_empty())
        .unwrap_or(DEFAULT_FILTER)
}

/// Installs the process's logger (see the module doc) and returns where it writes. A
/// second call keeps the first logger.
pub fn init() -> Output {
    if let Some(output) = OUTPUT.get() {
        return *output;
    }
    let rust_log = std::env::var("RUST_LOG").ok();
    let spec = filter_spec(rust_log.as_deref());
    let output = if systemd_journal_logger::connected_to_journal() {
        match JournalLog::new() {
            Ok(journal) => {
                let filter = env_filter::Builder::new().parse(spec).build();
                let max_level = filter.filter();
                let logger = env_filter::FilteredLog::new(journal, filter);
                if log::set_boxed_logger(Box::new(logger)).is_ok() {
                    log::set_max_level(max_level);
                }
                Output::Journal
            }
            Err(_) => {
                stderr_logger(spec, true);
                Output::PrefixedStderr
            }
        }
    } else {
        stderr_logger(spec, false);
        Output::Stderr
    };
    *OUTPUT.get_or_init(|| output)
}

/// env_logger on stderr; with `prefixed`, `<N>` sd-daemon lines without a timestamp (the
/// journal adds its own) and with the record's key-values appended.
fn stderr_logger(spec: &str, prefixed: bool) {
    let mut builder = env_logger::Builder::new();
    builder.parse_filters(spec);
    if prefixed {
        builder
            .write_style(env_logger::WriteStyle::Never)
            .format(|buf, record| {
                write!(buf, "<{}>{}: ", priority(record.level()), record.target())?;
                // One journal entry per line: a line break would start an entry at the
                // default priority.
                let message = record.args().to_string();
                write!(buf, "{}", message.replace('\n', " "))?;
                record
                    .key_values()
                    .visit(&mut KeyValues(buf))
                    .map_err(|err| std::io::Error::other(err.to_string()))?;
                writeln!(buf)
            });
    }
    let _ = builder.try_init();
}

/// Writes ` key=value` per key-value of a record.
struct KeyValues<'a, W: Write>(&'a mut W);

impl<'kvs, W: Write> log::kv::VisitSource<'kvs> for KeyValues<'_, W> {
    fn visit_pair(
        &mut self,
        key: log::kv::Key<'kvs>,
        value: log::kv::Value<'kvs>,
    ) -> Result<(), log::kv::Error> {
        write!(self.0, " {key}={value}").map_err(log::kv::Error::boxed)
    }
}

/// Reports the error that ends the process: in the journal as an error record, on a
/// terminal as `error: …` (the whole context chain on one line either way).
pub fn report_fatal(err: &anyhow::Error) {
    match OUTPUT.get() {
        Some(Output::Journal | Output::PrefixedStderr) => {
            log::error!("{err:#}");
            log::logger().flush();
        }
        Some(Output::Stderr) | None => eprintln!("error: {err:#}"),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;
    use std::process::Command;

    use super::*;

    const CHILD: &str = "CSPINE_LOGGING_CHILD";

    #[test]
    fn priorities_follow_syslog() {
        let all = [
            Level::Error,
            Level::Warn,
            Level::Info,
            Level::Debug,
            Level::Trace,
        ];
        assert_eq!(all.map(priority), [3, 4, 5, 6, 7]);
    }

    #[test]
    fn decoder_chatter_is_filtered_unless_rust_log_says_otherwise() {
        let enabled = |spec: &str, level: Level, target: &str| {
            let filter = env_filter::Builder::new().parse(spec).build();
            let metadata = log::Metadata::builder().level(level).target(target).build();
            filter.enabled(&metadata)
        };
        let default = filter_spec(None);
        assert_eq!(filter_spec(Some("")), default);
        for target in ["jpeg2k::codec", "openjp2::event"] {
            assert!(!enabled(default, Level::Info, target), "{target}");
            assert!(enabled(default, Level::Warn, target), "{target}");
            assert!(enabled(filter_spec(Some("info")), Level::Info, target));
        }
        assert!(!enabled(default, Level::Error, "rumqttd::router"));
        assert!(enabled(default, Level::Info, "cspine_triage::alert"));
        assert!(!enabled(default, Level::Debug, "cspine_triage::alert"));
    }

    /// Runs [`child_logs_at_each_level`] in a child process whose stderr is a file, with
    /// `JOURNAL_STREAM` naming that file (as systemd names the stream it connects) or not;
    /// returns the output the child chose and its stderr.
    fn run_child(journal_stream: bool) -> (String, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stderr");
        let stderr = std::fs::File::create(&path).unwrap();
        let meta = stderr.metadata().unwrap();
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            "service::logging::tests::child_logs_at_each_level",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .env_remove("RUST_LOG")
        .stderr(stderr);
        if journal_stream {
            cmd.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
        } else {
            cmd.env("JOURNAL_STREAM", "0:0");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "child failed: {out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let output = stdout
            .lines()
            // libtest may print the test's name on the same line first.
            .find_map(|l| l.split_once("logging output: ").map(|(_, output)| output))
            .expect("the child says which output it chose")
            .to_owned();
        (output, std::fs::read_to_string(&path).unwrap())
    }

    #[test]
    fn under_systemd_an_error_carries_priority_3() {
        let (output, stderr) = run_child(true);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.is_empty()).collect();
        match output.as_str() {
            // No journal socket here (containers, CI): the sd-daemon prefix form.
            "PrefixedStderr" => {
                let prefixes: Vec<&str> = lines.iter().map(|l| l.get(..3).unwrap_or(l)).collect();
                assert_eq!(prefixes, ["<3>", "<4>", "<5>"], "{stderr}");
            }
            // A journal socket: native entries, nothing on stderr.
            "Journal" => assert!(lines.is_empty(), "{stderr}"),
            other => panic!("JOURNAL_STREAM matches stderr, yet output {other}"),
        }
        // Not under systemd: human-readable lines, no priority prefix.
        let (output, stderr) = run_child(false);
        assert_eq!(output, "Stderr");
        assert_eq!(stderr.lines().filter(|l| !l.is_empty()).count(), 3);
        assert!(stderr.lines().all(|l| !l.starts_with('<')), "{stderr}");
    }

    /// Not a test: the body of the child process of the test above.
    #[test]
    #[ignore = "helper process for under_systemd_an_error_carries_priority_3"]
    fn child_logs_at_each_level() {
        if std::env::var_os(CHILD).is_none() {
            return;
        }
        let output = init();
        println!("logging output: {output:?}");
        log::error!(result_id = "r1"; "child error");
        log::warn!("child warning");
        log::info!("child info");
        log::debug!("child debug, filtered out by default");
        log::logger().flush();
    }
}
