//! The proxy's log output: lines are appended to an in-memory batch on the request path
//! and a background thread writes the whole batch with one `write(2)` per interval.
//!
//! Why not a line queue (tracing-appender): profiles showed a per-line queue costing about
//! a quarter of a hop's CPU at 1,000 req/s: one `write` per line, one futex wake-up per
//! line and the channel's `sched_yield` spins. Appending to a buffer under an uncontended
//! mutex costs a `memcpy`; the writer wakes a fixed number of times per second whatever the
//! request rate. Lines are dropped (and counted) rather than blocking a request when the
//! batch is full because stdout cannot keep up.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the writer thread flushes the batch.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(50);
/// The most bytes held between flushes (about 2,000 access-log lines); more is dropped.
pub const BATCH_LIMIT: usize = 1 << 20;

#[derive(Debug, Default)]
struct State {
    buf: Vec<u8>,
    closed: bool,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    dropped: AtomicU64,
    limit: usize,
}

/// A cloneable writer that appends whole log lines to the current batch.
#[derive(Debug, Clone)]
pub struct BatchWriter {
    shared: Arc<Shared>,
}

/// Owns the writer thread; dropping it flushes what is left and joins the thread.
#[derive(Debug)]
pub struct FlushGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the writer thread writing to `out` every `interval`, holding at most `limit`
/// bytes in between.
pub fn batch_writer<W: Write + Send + 'static>(
    out: W,
    interval: Duration,
    limit: usize,
) -> io::Result<(BatchWriter, FlushGuard)> {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        wake: Condvar::new(),
        dropped: AtomicU64::new(0),
        limit,
    });
    let thread_shared = shared.clone();
    let thread = std::thread::Builder::new()
        .name("trellis-log".into())
        .spawn(move || flush_loop(&thread_shared, out, interval))?;
    Ok((
        BatchWriter {
            shared: shared.clone(),
        },
        FlushGuard {
            shared,
            thread: Some(thread),
        },
    ))
}

fn flush_loop<W: Write>(shared: &Shared, mut out: W, interval: Duration) {
    // Two buffers swapped under the lock, so the lock is never held across a write.
    let mut spare = Vec::new();
    loop {
        let closed = {
            let state = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
            let (mut state, _) = shared
                .wake
                .wait_timeout_while(state, interval, |s| !s.closed)
                .unwrap_or_else(PoisonError::into_inner);
            std::mem::swap(&mut state.buf, &mut spare);
            state.closed
        };
        let dropped = shared.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let _ = writeln!(
                spare,
                "trellis-proxy: {dropped} log lines dropped: output could not keep up"
            );
        }
        if !spare.is_empty() {
            // A closed or full stdout must not stop the proxy: the batch is discarded.
            let _ = out.write_all(&spare).and_then(|()| out.flush());
            // Keep room for a batch as large as this one: under steady load the next
            // batch then fills without reallocating (growing a 256 KiB batch by doubling
            // copied it again every 50 ms, 1.5% of a hop's CPU at max load). After a
            // burst, the next smaller batch gives the memory back.
            let used = spare.len();
            spare.clear();
            spare.shrink_to(used.max(64 * 1024));
        }
        if closed {
            return;
        }
    }
}

impl BatchWriter {
    /// Appends one whole line to the batch, or drops and counts it when the batch is full.
    pub fn append(&self, line: &[u8]) {
        let mut state = self
            .shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if state.buf.len() + line.len() > self.shared.limit {
            drop(state);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        } else {
            state.buf.extend_from_slice(line);
        }
    }

    /// Lines dropped since the last flush because the batch was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

impl Write for BatchWriter {
    /// tracing-subscriber formats a whole event and then writes it with one call, so a
    /// line is either kept whole or dropped whole.
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        self.append(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchWriter {
    type Writer = BatchWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .closed = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The batch the binary's log output goes to, for lines written without tracing's
/// formatter (the per-request access log). Unset in library users and tests of other
/// crates, where the access log goes through `tracing` as before.
static DIRECT: std::sync::OnceLock<BatchWriter> = std::sync::OnceLock::new();

/// Makes `writer` the target of [`write_access`] (the binary calls this once).
pub fn install_direct(writer: BatchWriter) {
    let _ = DIRECT.set(writer);
}

/// Writes one access-log line straight into the batch, in the same text format the
/// `tracing` formatter produces (`<rfc3339 µs>  INFO access: <message> <fields>`), and
/// returns true; returns false when no batch is installed, so the caller falls back to
/// a `tracing` event. Why: tracing's per-field formatting was most of what the access log
/// still cost per request (BENCHMARKS.md); the fields here are fixed.
pub fn write_access(fields: impl FnOnce(&mut Vec<u8>) -> io::Result<()>) -> bool {
    write_line(|line| {
        push_access_time(line);
        line.extend_from_slice(b"  INFO access: ");
        fields(line)
            .and_then(|()| line.write_all(b"\n"))
            .and_then(|()| line.write_all(b"\n"))
    })
}

/// Builds one line in a per-thread buffer (no allocation per line once warm) and appends
/// it to the batch if `build` succeeded. False when there is no direct writer.
fn write_line(build: impl FnOnce(&mut Vec<u8>) -> io::Result<()>) -> bool {
    let Some(writer) = DIRECT.get() else {
        return false;
    };
    thread_local! {
        static LINE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    LINE.with(|line| {
        let mut line = line.borrow_mut();
        line.clear();
        if build(&mut line).is_ok() {
            writer.append(&line);
        }
    });
    true
}

/// How access lines are written: set by the control plane through discovery
/// (trellis-config's `proxy.accessLog` / `proxy.accessLogFormat`), read on every request.
static ACCESS_FORMAT: AtomicU8 = AtomicU8::new(AccessFormat::Text as u8);

/// The access log format in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AccessFormat {
    /// `key=value` text after the usual log prefix (the default).
    Text = 0,
    /// One JSON object per line, nothing else on the line.
    Json = 1,
    /// No access lines.
    Off = 2,
}

/// Applies the access log setting from a discovery view; `Unset` (a control plane that
/// does not say) means text.
pub fn set_access_log(log: trellis_api::AccessLog) {
    let format = match log {
        trellis_api::AccessLog::Unset | trellis_api::AccessLog::Text => AccessFormat::Text,
        trellis_api::AccessLog::Json => AccessFormat::Json,
        trellis_api::AccessLog::Off => AccessFormat::Off,
    };
    ACCESS_FORMAT.store(format as u8, Ordering::Relaxed);
}

/// The access log format in force.
pub fn access_format() -> AccessFormat {
    match ACCESS_FORMAT.load(Ordering::Relaxed) {
        1 => AccessFormat::Json,
        2 => AccessFormat::Off,
        _ => AccessFormat::Text,
    }
}

/// Writes `record` as one JSON line through the direct writer (see [`install_direct`]).
/// False when there is no direct writer (tests, or a proxy logging elsewhere): the caller
/// logs the text line instead.
pub fn write_access_json(record: &impl serde::Serialize) -> bool {
    write_line(|line| {
        serde_json::to_writer(&mut *line, record)?;
        line.push(b'\n');
        Ok(())
    })
}

/// The current time as access lines show it (RFC 3339, microseconds, UTC).
pub fn access_time() -> impl std::fmt::Display {
    humantime::format_rfc3339_micros(std::time::SystemTime::now())
}

/// Appends the current time as [`access_time`] writes it. The date and time of day are
/// formatted once per second per thread; only the microseconds are written per line
/// (formatting the whole timestamp was a third of what an access line still cost).
pub fn push_access_time(line: &mut Vec<u8>) {
    use std::cell::Cell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        /// The second last formatted, and `YYYY-MM-DDTHH:MM:SS.` for it.
        static SECOND: Cell<Option<(u64, [u8; 20])>> = const { Cell::new(None) };
    }
    let now = SystemTime::now();
    let Ok(since) = now.duration_since(UNIX_EPOCH) else {
        let _ = write!(line, "{}", humantime::format_rfc3339_micros(now));
        return;
    };
    let secs = since.as_secs();
    let prefix = SECOND.with(|cached| match cached.get() {
        Some((s, prefix)) if s == secs => Some(prefix),
        _ => {
            let whole = UNIX_EPOCH + Duration::from_secs(secs);
            let text = humantime::format_rfc3339_seconds(whole).to_string();
            // `YYYY-MM-DDTHH:MM:SSZ`; any other shape (years past 9999) is not cached.
            let mut prefix = [0u8; 20];
            let head = text.as_bytes().get(..19)?;
            (text.len() == 20).then_some(())?;
            prefix[..19].copy_from_slice(head);
            prefix[19] = b'.';
            cached.set(Some((secs, prefix)));
            Some(prefix)
        }
    });
    let Some(prefix) = prefix else {
        let _ = write!(line, "{}", humantime::format_rfc3339_micros(now));
        return;
    };
    line.extend_from_slice(&prefix);
    let micros = since.subsec_micros();
    let mut digits = [b'0'; 6];
    let mut rest = micros;
    for d in digits.iter_mut().rev() {
        // `rest % 10` is below 10: the cast cannot truncate.
        *d = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    line.extend_from_slice(&digits);
    line.push(b'Z');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_time_is_rfc3339_micros_of_now() {
        use std::time::{SystemTime, UNIX_EPOCH};
        for _ in 0..3 {
            let before = SystemTime::now();
            let mut line = b"x".to_vec();
            push_access_time(&mut line);
            let after = SystemTime::now();
            let text = std::str::from_utf8(&line[1..]).unwrap();
            assert_eq!(text.len(), 27, "{text}");
            assert_eq!(
                text,
                humantime::format_rfc3339_micros(humantime::parse_rfc3339(text).unwrap())
                    .to_string()
            );
            let at = humantime::parse_rfc3339(text).unwrap();
            let floor = |t: SystemTime| {
                let d = t.duration_since(UNIX_EPOCH).unwrap();
                UNIX_EPOCH + Duration::from_micros(d.as_micros() as u64)
            };
            assert!(floor(before) <= at && at <= after, "{text}");
            // The cached second is reused within it, and replaced after it.
            #[allow(clippy::disallowed_methods, reason = "a plain #[test], no runtime")]
            std::thread::sleep(Duration::from_millis(400));
        }
    }

    /// A `Write` that records each `write` call, to count syscalls-to-be.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_are_written_in_batches_and_flushed_on_drop() {
        let sink = Sink::default();
        let (writer, guard) =
            batch_writer(sink.clone(), Duration::from_secs(3600), BATCH_LIMIT).unwrap();
        for i in 0..1000 {
            let mut w = writer.clone();
            w.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        // Nothing is written before the interval or the guard's drop.
        assert!(sink.0.lock().unwrap().is_empty());
        drop(guard);
        let writes = sink.0.lock().unwrap();
        assert_eq!(writes.len(), 1, "one write for the whole batch");
        let text = String::from_utf8(writes[0].clone()).unwrap();
        assert_eq!(text.lines().count(), 1000);
        assert!(text.starts_with("line 0\n") && text.ends_with("line 999\n"));
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // a plain thread test, no runtime to block
    fn interval_flushes_without_drop() {
        let sink = Sink::default();
        let (mut writer, _guard) =
            batch_writer(sink.clone(), Duration::from_millis(10), BATCH_LIMIT).unwrap();
        writer.write_all(b"hello\n").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while sink.0.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "never flushed");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(sink.0.lock().unwrap().concat(), b"hello\n");
    }

    #[test]
    fn a_full_batch_drops_whole_lines_and_reports_the_count() {
        let sink = Sink::default();
        let (mut writer, guard) =
            batch_writer(sink.clone(), Duration::from_secs(3600), 20).unwrap();
        writer.write_all(b"0123456789\n").unwrap(); // 11 bytes: kept
        writer.write_all(b"0123456789\n").unwrap(); // would be 22: dropped whole
        writer.write_all(b"abc\n").unwrap(); // 15: kept
        assert_eq!(writer.dropped(), 1);
        drop(guard);
        let text = String::from_utf8(sink.0.lock().unwrap().concat()).unwrap();
        assert_eq!(
            text,
            "0123456789\nabc\ntrellis-proxy: 1 log lines dropped: output could not keep up\n"
        );
    }
}
