//! Standard output that ends quietly when the reader goes away.
//!
//! `swift report --json | head -c 10` closes the pipe after ten bytes; Rust's
//! `println!` then panics (exit 101) and a `?` on a write turns EPIPE into an
//! error. Every command prints through [`Stdout`] instead (the [`outln!`]
//! and [`out!`] macros): the first failed write marks stdout closed, and that
//! write and all later ones succeed without output, so a command runs to its
//! normal end — a `swift run` keeps training — and exits with its own status.
//! Errors still go to stderr.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once a write to stdout failed: nothing more is printed.
static CLOSED: AtomicBool = AtomicBool::new(false);

/// The process's stdout, whose writes never fail (see the module doc).
pub struct Stdout;

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !CLOSED.load(Ordering::Relaxed) && std::io::stdout().lock().write_all(buf).is_err() {
            CLOSED.store(true, Ordering::Relaxed);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !CLOSED.load(Ordering::Relaxed) && std::io::stdout().lock().flush().is_err() {
            CLOSED.store(true, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// `println!` through [`Stdout`].
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!($crate::output::Stdout, $($arg)*);
    }};
}

/// `print!` through [`Stdout`].
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!($crate::output::Stdout, $($arg)*);
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_report_success_whatever_happens_to_stdout() {
        let mut out = Stdout;
        assert_eq!(out.write(b"").unwrap(), 0);
        assert!(out.flush().is_ok());
    }
}
