use std::io::Read;
use std::io::Result as IoResult;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::channel;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The most of an unread body the destructor drains, so that its connection can carry the next
/// request (ferry: upstream drained any length, through a buffer of the whole remaining length).
const DRAIN_LIMIT: usize = 1 << 20;
/// How long the destructor drains at most (ferry: upstream waited for as long as the client kept
/// sending, however slowly, in the thread that dropped the request).
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);
/// The destructor's read buffer.
const DRAIN_BUFFER: usize = 64 * 1024;

/// A `Reader` that reads exactly the number of bytes from a sub-reader.
///
/// If the limit is reached, it returns EOF. If the limit is not reached
/// when the destructor is called, the remaining bytes are read and thrown
/// away: at most [`DRAIN_LIMIT`] of them within [`DRAIN_DEADLINE`]. A body
/// not read to its end sets the `unfinished` flag given with
/// [`EqualReader::marking`], by which the connection knows to close
/// rather than read the rest of the body as its next request (ferry).
pub struct EqualReader<R>
where
    R: Read,
{
    reader: R,
    size: usize,
    last_read_signal: Sender<IoResult<()>>,
    unfinished: Option<Arc<AtomicBool>>,
}

impl<R> EqualReader<R>
where
    R: Read,
{
    pub fn new(reader: R, size: usize) -> (EqualReader<R>, Receiver<IoResult<()>>) {
        let (tx, rx) = channel();

        let r = EqualReader {
            reader,
            size,
            last_read_signal: tx,
            unfinished: None,
        };

        (r, rx)
    }

    /// Sets `unfinished` when the body is dropped before its end and not drained to it.
    pub fn marking(mut self, unfinished: Arc<AtomicBool>) -> EqualReader<R> {
        self.unfinished = Some(unfinished);
        self
    }

    fn mark_unfinished(&self) {
        if let Some(flag) = &self.unfinished {
            flag.store(true, Ordering::SeqCst);
        }
    }
}

impl<R> Read for EqualReader<R>
where
    R: Read,
{
    fn read(&mut self, buf: &mut [u8]) -> IoResult<usize> {
        if self.size == 0 {
            return Ok(0);
        }

        let buf = if buf.len() < self.size {
            buf
        } else {
            &mut buf[..self.size]
        };

        match self.reader.read(buf) {
            Ok(len) => {
                self.size -= len;
                Ok(len)
            }
            err @ Err(_) => err,
        }
    }
}

impl<R> Drop for EqualReader<R>
where
    R: Read,
{
    fn drop(&mut self) {
        let mut remaining_to_read = self.size;
        if remaining_to_read == 0 {
            return;
        }
        if remaining_to_read > DRAIN_LIMIT {
            self.mark_unfinished();
            return;
        }
        let started = Instant::now();
        let mut buf = vec![0; remaining_to_read.min(DRAIN_BUFFER)];

        while remaining_to_read > 0 {
            if started.elapsed() > DRAIN_DEADLINE {
                self.mark_unfinished();
                break;
            }
            let want = remaining_to_read.min(buf.len());
            match self.reader.read(&mut buf[..want]) {
                Err(e) => {
                    self.mark_unfinished();
                    self.last_read_signal.send(Err(e)).ok();
                    break;
                }
                Ok(0) => {
                    self.mark_unfinished();
                    self.last_read_signal.send(Ok(())).ok();
                    break;
                }
                Ok(other) => {
                    remaining_to_read -= other;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::EqualReader;
    use std::io::Read;

    #[test]
    fn test_limit() {
        use std::io::Cursor;

        let mut org_reader = Cursor::new("hello world".to_string().into_bytes());

        {
            let (mut equal_reader, _) = EqualReader::new(org_reader.by_ref(), 5);

            let mut string = String::new();
            equal_reader.read_to_string(&mut string).unwrap();
            assert_eq!(string, "hello");
        }

        let mut string = String::new();
        org_reader.read_to_string(&mut string).unwrap();
        assert_eq!(string, " world");
    }

    #[test]
    fn test_not_enough() {
        use std::io::Cursor;

        let mut org_reader = Cursor::new("hello world".to_string().into_bytes());

        {
            let (mut equal_reader, _) = EqualReader::new(org_reader.by_ref(), 5);

            let mut vec = [0];
            equal_reader.read_exact(&mut vec).unwrap();
            assert_eq!(vec[0], b'h');
        }

        let mut string = String::new();
        org_reader.read_to_string(&mut string).unwrap();
        assert_eq!(string, " world");
    }
}
