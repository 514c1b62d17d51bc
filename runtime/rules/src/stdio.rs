//! The plugin's stdout and stderr: never an error to write, never unbounded. Complete lines
//! go to the log at debug level; the last bytes are kept so that a trap's error can show what
//! the plugin said last (a panic message, typically).

use bytes::Bytes;
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Bytes kept of what a plugin writes (the tail).
const TAIL: usize = 1024;
/// Longest line logged; longer ones are cut.
const MAX_LINE: usize = 1024;

#[derive(Clone)]
pub(crate) struct GuestOutput {
    shared: Arc<Mutex<Shared>>,
}

struct Shared {
    plugin: Arc<str>,
    pipeline: Arc<str>,
    stream: &'static str,
    /// The last bytes written, for error messages.
    tail: VecDeque<u8>,
    /// The current, unfinished line.
    line: Vec<u8>,
}

impl GuestOutput {
    pub(crate) fn new(plugin: Arc<str>, pipeline: Arc<str>, stream: &'static str) -> Self {
        Self {
            shared: Arc::new(Mutex::new(Shared {
                plugin,
                pipeline,
                stream,
                tail: VecDeque::new(),
                line: Vec::new(),
            })),
        }
    }

    /// The last [`TAIL`] bytes written (and forgets them), as one line of text: lines joined
    /// with spaces, without Rust's hint about `RUST_BACKTRACE`.
    pub(crate) fn take_tail(&self) -> String {
        let mut shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        shared.line.clear();
        let tail: Vec<u8> = shared.tail.drain(..).collect();
        String::from_utf8_lossy(&tail)
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with("note: run with `RUST_BACKTRACE"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn write(&self, bytes: &[u8]) {
        let mut shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        let Shared {
            plugin,
            pipeline,
            stream,
            tail,
            line,
        } = &mut *shared;
        tail.extend(bytes);
        let excess = tail.len().saturating_sub(TAIL);
        tail.drain(..excess);
        for &b in bytes {
            if b == b'\n' {
                tracing::debug!(
                    plugin = &**plugin,
                    pipeline = &**pipeline,
                    stream = *stream,
                    text = %String::from_utf8_lossy(line),
                    "Plugin output."
                );
                line.clear();
            } else if line.len() < MAX_LINE {
                line.push(b);
            }
        }
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        GuestOutput::write(self, &bytes);
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for GuestOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        GuestOutput::write(&self, buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
