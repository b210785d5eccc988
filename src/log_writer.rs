//! The background writer every log line goes through: callers append whole
//! lines to a shared buffer under an uncontended lock, and a thread writes
//! what has gathered to stderr in batches. A busy proxy thus makes a few
//! dozen write syscalls a second instead of one per request, and wakes the
//! thread once per batch instead of once per line (a futex wake and two
//! context switches each, which cost more than rendering the line). A
//! request never waits for stderr: when it falls behind by `MAX_QUEUED`
//! bytes, lines are dropped and counted, and a warning says how many.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the first line of a batch waits for others to join it.
const BATCH_WINDOW: Duration = Duration::from_millis(20);
/// A batch this large is written at once.
const WRITE_AT: usize = 256 * 1024;
/// Bytes queued beyond which lines are dropped.
const MAX_QUEUED: usize = 4 * 1024 * 1024;

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    queued: Vec<u8>,
    dropped: u64,
    closing: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Appending bytes cannot leave the state half-changed.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Queues lines for the writer thread; cheap to clone. As a `Write`, each
/// `write` call is queued whole, so a line written in one call stays whole.
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
}

/// Writes what is queued and stops the thread when dropped.
pub struct FlushGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the writer thread, writing to `out`.
pub fn spawn<W: Write + Send + 'static>(out: W) -> io::Result<(LogWriter, FlushGuard)> {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        wake: Condvar::new(),
    });
    let thread = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("credproxy-log".into())
            .spawn(move || run(&shared, out))?
    };
    Ok((
        LogWriter {
            shared: shared.clone(),
        },
        FlushGuard {
            shared,
            thread: Some(thread),
        },
    ))
}

impl LogWriter {
    /// Queues `bytes` (whole lines), or drops them if the queue is full.
    pub fn append(&self, bytes: &[u8]) {
        let mut state = self.shared.lock();
        if state.queued.len() + bytes.len() > MAX_QUEUED {
            state.dropped += 1;
            return;
        }
        // Only the first line of a batch, or one that fills it, wakes the thread.
        let wake = state.queued.is_empty() || state.queued.len() + bytes.len() >= WRITE_AT;
        state.queued.extend_from_slice(bytes);
        drop(state);
        if wake {
            self.shared.wake.notify_one();
        }
    }
}

impl Write for &LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = &'a LogWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(shared: &Shared, mut out: impl Write) {
    let mut batch = Vec::new();
    loop {
        let mut state = shared.lock();
        while state.queued.is_empty() && !state.closing {
            state = shared
                .wake
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if state.queued.is_empty() {
            return; // closing, and everything written
        }
        state = shared
            .wake
            .wait_timeout_while(state, BATCH_WINDOW, |s| {
                !s.closing && s.queued.len() < WRITE_AT
            })
            .unwrap_or_else(PoisonError::into_inner)
            .0;
        std::mem::swap(&mut batch, &mut state.queued);
        let dropped = std::mem::take(&mut state.dropped);
        drop(state);
        // Nowhere to report a failing stderr; the next batch tries again.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        // A burst's buffer is not kept for good.
        batch.shrink_to(WRITE_AT);
        if dropped > 0 {
            // Queued like any line, so it has the configured format.
            tracing::warn!(dropped, "log lines dropped: standard error did not keep up");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    /// An output that records every write, says when it wrote, and can be held shut.
    #[derive(Clone, Default)]
    struct Recorder {
        batches: Arc<Mutex<Vec<Vec<u8>>>>,
        wrote: Arc<Condvar>,
        gate: Arc<Mutex<()>>,
    }

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _open = self.gate.lock().unwrap();
            self.batches.lock().unwrap().push(buf.to_vec());
            self.wrote.notify_all();
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Recorder {
        fn text(&self) -> String {
            String::from_utf8(self.batches.lock().unwrap().concat()).unwrap()
        }
    }

    #[test]
    fn lines_from_many_threads_arrive_whole_and_in_order_per_thread() {
        let recorder = Recorder::default();
        let (writer, guard) = spawn(recorder.clone()).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let writer = writer.clone();
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        writer.append(format!("thread {t} line {i}\n").as_bytes());
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        drop(guard); // flushes
        let text = recorder.text();
        let mut next = [0; 4];
        for line in text.lines() {
            let parsed = line
                .strip_prefix("thread ")
                .and_then(|rest| rest.split_once(" line "));
            assert!(parsed.is_some(), "a torn line: {line:?}");
            let (t, i) = parsed.unwrap();
            let t: usize = t.parse().unwrap();
            assert_eq!(
                i.parse::<usize>().unwrap(),
                next[t],
                "thread {t} out of order"
            );
            next[t] += 1;
        }
        assert_eq!(next, [2000; 4]);
    }

    #[test]
    fn a_burst_of_lines_is_written_in_few_batches_and_soon() {
        let recorder = Recorder::default();
        let (writer, _guard) = spawn(recorder.clone()).unwrap();
        let line = "x".repeat(99) + "\n";
        for _ in 0..1000 {
            writer.append(line.as_bytes());
        }
        // Written without the guard being dropped.
        let (batches, timeout) = recorder
            .wrote
            .wait_timeout_while(
                recorder.batches.lock().unwrap(),
                Duration::from_secs(10),
                |batches| batches.iter().map(Vec::len).sum::<usize>() < 100_000,
            )
            .unwrap();
        assert!(!timeout.timed_out(), "the lines were not written");
        let batches = batches.len();
        // One write per line would be 1,000; a batch waits 20 ms for the rest.
        assert!(batches < 50, "{batches} writes for 1,000 lines");
    }

    #[test]
    fn a_stalled_output_drops_lines_beyond_the_bound_without_blocking() {
        let recorder = Recorder::default();
        let shut = recorder.gate.lock().unwrap();
        let (writer, guard) = spawn(recorder.clone()).unwrap();
        let line = "y".repeat(1023) + "\n";
        let (done, appended) = mpsc::channel();
        let appender = {
            let writer = writer.clone();
            std::thread::spawn(move || {
                for _ in 0..(3 * MAX_QUEUED / line.len()) {
                    writer.append(line.as_bytes());
                }
                done.send(()).unwrap();
            })
        };
        // Appending 12 MiB while the output is shut returns.
        appended.recv_timeout(Duration::from_secs(30)).unwrap();
        appender.join().unwrap();
        drop(shut);
        drop(guard);
        let text = recorder.text();
        assert!(text.lines().all(|l| l.len() == 1023), "a torn line");
        // At most what was queued plus one batch taken before the stall.
        assert!(text.len() <= 2 * MAX_QUEUED, "{} bytes written", text.len());
        assert!(text.len() >= MAX_QUEUED / 2, "{} bytes written", text.len());
    }
}
