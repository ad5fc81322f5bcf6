//! The console's line editor: bytes from a serial line in, echo bytes and finished lines out. Pure,
//! so that every case (line noise, a 1 MiB line, Ctrl-C mid-line) is unit-tested.
//!
//! CR, LF and CRLF all end a line (a CR followed by LF counts once). Backspace (0x08) and DEL (0x7f)
//! erase one character, Ctrl-U the whole line, Ctrl-C abandons it. Escape sequences (arrow keys and
//! the like) are swallowed. A line is bounded by [`MAX_LINE`] bytes: what comes beyond is dropped
//! without echo and the line is rejected when it ends. A line holding other control bytes, C1
//! control characters or bytes that are not UTF-8 is rejected as garbage. Echo is plain ASCII (`BS SP BS` to erase), never ANSI.

/// Longest line kept, in bytes.
pub const MAX_LINE: usize = 1024;
/// An escape sequence longer than this is over; what follows is read as text again.
const MAX_ESCAPE: usize = 16;

/// What a byte completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A finished line, without its line end.
    Line(String),
    /// Ctrl-C: the line so far is abandoned.
    Interrupt,
    /// The line ran past [`MAX_LINE`]; it is dropped.
    TooLong,
    /// The line held control bytes or bytes that are not UTF-8; it is dropped.
    Garbage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Text,
    /// After ESC.
    Escape,
    /// Inside `ESC [` or `ESC O`, bytes seen so far.
    Sequence(usize),
}

/// Echo of one erased character.
const ERASE: &[u8] = b"\x08 \x08";

#[derive(Debug, Clone)]
pub struct Editor {
    buf: Vec<u8>,
    state: State,
    /// The last byte ended a line with CR: a LF right after it belongs to the same line end.
    after_cr: bool,
    overflow: bool,
    garbage: bool,
    /// Echo typed characters (`false` when the other end echoes, e.g. a pipe); `Some(b'*')` style
    /// masking for a PIN.
    echo: Echo,
}

/// How typed characters are echoed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Echo {
    Off,
    On,
    /// Each character shows as `*` (a PIN).
    Masked,
}

impl Editor {
    pub fn new(echo: Echo) -> Editor {
        Editor {
            buf: Vec::new(),
            state: State::Text,
            after_cr: false,
            overflow: false,
            garbage: false,
            echo,
        }
    }

    pub fn set_echo(&mut self, echo: Echo) {
        self.echo = echo;
    }

    pub fn echo(&self) -> Echo {
        self.echo
    }

    /// Feeds one byte; echo goes to `out`. Returns the event the byte completed, if any.
    pub fn feed(&mut self, byte: u8, out: &mut Vec<u8>) -> Option<Event> {
        let after_cr = std::mem::take(&mut self.after_cr);
        // A control byte inside an escape sequence ends it and counts (a terminal executes it too),
        // so that Ctrl-C or Enter always work, whatever noise came before.
        if byte < 0x20 && self.state != State::Text {
            self.state = State::Text;
        }
        match self.state {
            State::Escape => {
                self.state = if byte == b'[' || byte == b'O' {
                    State::Sequence(0)
                } else {
                    State::Text
                };
                return None;
            }
            State::Sequence(n) => {
                // Parameters and intermediates go on; a final byte (0x40..=0x7e) ends the sequence.
                self.state = if (0x40..=0x7e).contains(&byte) || n + 1 >= MAX_ESCAPE {
                    State::Text
                } else {
                    State::Sequence(n + 1)
                };
                return None;
            }
            State::Text => {}
        }
        match byte {
            b'\n' if after_cr => None,
            b'\r' | b'\n' => {
                self.after_cr = byte == b'\r';
                if self.echo != Echo::Off {
                    out.extend_from_slice(b"\r\n");
                }
                Some(self.finish())
            }
            0x1b => {
                self.state = State::Escape;
                None
            }
            0x08 | 0x7f => {
                if !self.overflow && self.pop_char() && self.echo != Echo::Off {
                    out.extend_from_slice(ERASE);
                }
                None
            }
            0x15 => {
                // Ctrl-U: erase what was typed, one echoed character at a time.
                while !self.overflow && self.pop_char() {
                    if self.echo != Echo::Off {
                        out.extend_from_slice(ERASE);
                    }
                }
                self.reset();
                None
            }
            0x03 => {
                if self.echo != Echo::Off {
                    out.extend_from_slice(b"^C\r\n");
                }
                self.reset();
                Some(Event::Interrupt)
            }
            b'\t' => self.insert(b' ', out),
            0x00..=0x1f => {
                self.garbage = true;
                None
            }
            _ => self.insert(byte, out),
        }
    }

    fn insert(&mut self, byte: u8, out: &mut Vec<u8>) -> Option<Event> {
        if self.overflow || self.buf.len() >= MAX_LINE {
            self.overflow = true;
            return None;
        }
        self.buf.push(byte);
        match self.echo {
            Echo::Off => {}
            // Bytes of a multi-byte character are echoed as they come; the terminal assembles them.
            Echo::On => out.push(byte),
            Echo::Masked if byte & 0xc0 != 0x80 => out.push(b'*'),
            Echo::Masked => {}
        }
        None
    }

    /// Removes the last character (all bytes of a UTF-8 sequence); false if the line was empty.
    fn pop_char(&mut self) -> bool {
        while let Some(b) = self.buf.pop() {
            if b & 0xc0 != 0x80 {
                return true;
            }
        }
        false
    }

    fn finish(&mut self) -> Event {
        let event = if self.overflow {
            Event::TooLong
        } else if self.garbage {
            Event::Garbage
        } else {
            // C1 controls (U+0080..U+009F, UTF-8 encoded) are line noise too.
            match String::from_utf8(std::mem::take(&mut self.buf)) {
                Ok(line) if !line.chars().any(char::is_control) => Event::Line(line),
                _ => Event::Garbage,
            }
        };
        self.reset();
        event
    }

    fn reset(&mut self) {
        self.buf.clear();
        self.overflow = false;
        self.garbage = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(ed: &mut Editor, bytes: &[u8]) -> (Vec<Event>, Vec<u8>) {
        let mut out = Vec::new();
        let events = bytes.iter().filter_map(|b| ed.feed(*b, &mut out)).collect();
        (events, out)
    }

    fn lines(bytes: &[u8]) -> Vec<Event> {
        feed_all(&mut Editor::new(Echo::On), bytes).0
    }

    fn line(s: &str) -> Event {
        Event::Line(s.to_owned())
    }

    #[test]
    fn cr_lf_and_crlf_each_end_one_line() {
        assert_eq!(
            lines(b"a\rb\nc\r\nd\n\re"),
            [line("a"), line("b"), line("c"), line("d"), line("")]
        );
    }

    #[test]
    fn typed_characters_are_echoed_and_lines_end_with_crlf() {
        let (events, out) = feed_all(&mut Editor::new(Echo::On), b"help\r");
        assert_eq!(events, [line("help")]);
        assert_eq!(out, b"help\r\n");
    }

    #[test]
    fn backspace_and_delete_erase_one_character_each() {
        let (events, out) = feed_all(&mut Editor::new(Echo::On), b"hex\x7fl\x08lp\r");
        assert_eq!(events, [line("help")]);
        assert_eq!(out, b"hex\x08 \x08l\x08 \x08lp\r\n");
        // Erasing an empty line echoes nothing.
        assert_eq!(feed_all(&mut Editor::new(Echo::On), b"\x7f").1, b"");
    }

    #[test]
    fn backspace_erases_a_whole_utf8_character() {
        assert_eq!(lines("aé\x7f\r".as_bytes()), [line("a")]);
    }

    #[test]
    fn ctrl_u_erases_the_line() {
        let (events, out) = feed_all(&mut Editor::new(Echo::On), b"ab\x15ok\r");
        assert_eq!(events, [line("ok")]);
        assert_eq!(out, b"ab\x08 \x08\x08 \x08ok\r\n");
    }

    #[test]
    fn ctrl_c_abandons_the_line() {
        let (events, out) = feed_all(&mut Editor::new(Echo::On), b"set uplink\x03status\r");
        assert_eq!(events, [Event::Interrupt, line("status")]);
        assert!(out.windows(4).any(|w| w == b"^C\r\n"));
    }

    #[test]
    fn arrow_keys_and_other_escape_sequences_are_swallowed() {
        assert_eq!(lines(b"\x1b[Ash\x1b[1;5Dow\x1bOB\r"), [line("show")]);
        // A lone ESC swallows the next byte only.
        assert_eq!(lines(b"\x1bxok\r"), [line("ok")]);
    }

    #[test]
    fn ctrl_c_and_enter_end_an_escape_sequence() {
        assert_eq!(lines(b"\x1b[12\x03ok\r"), [Event::Interrupt, line("ok")]);
        assert_eq!(lines(b"\x1b\rok\r"), [line(""), line("ok")]);
    }

    #[test]
    fn an_overlong_escape_sequence_ends() {
        let mut bytes = b"\x1b[".to_vec();
        bytes.extend([b'1'; 40]);
        bytes.extend(b"\r");
        // The sequence gives up after MAX_ESCAPE bytes; the rest is text.
        assert_eq!(lines(&bytes), [line(&"1".repeat(40 - MAX_ESCAPE))]);
    }

    #[test]
    fn a_line_over_the_limit_is_rejected_without_holding_it() {
        let mut ed = Editor::new(Echo::On);
        let mut out = Vec::new();
        for _ in 0..(1 << 20) {
            assert_eq!(ed.feed(b'x', &mut out), None);
        }
        assert!(ed.buf.len() <= MAX_LINE);
        assert_eq!(out.len(), MAX_LINE, "nothing echoed past the limit");
        assert_eq!(ed.feed(b'\r', &mut out), Some(Event::TooLong));
        assert_eq!(feed_all(&mut ed, b"ok\r").0, [line("ok")]);
    }

    #[test]
    fn a_line_of_exactly_the_limit_is_kept() {
        let mut bytes = vec![b'y'; MAX_LINE];
        bytes.push(b'\n');
        assert_eq!(lines(&bytes), [line(&"y".repeat(MAX_LINE))]);
    }

    #[test]
    fn control_bytes_and_invalid_utf8_make_garbage() {
        assert_eq!(lines(b"a\x00b\r"), [Event::Garbage]);
        assert_eq!(lines(b"\xff\xfe\r"), [Event::Garbage]);
        assert_eq!(lines(b"\x02\x04\x1a\rok\r"), [Event::Garbage, line("ok")]);
        // U+0080 and U+009B (a C1 CSI), valid UTF-8 but control characters.
        assert_eq!(
            lines(b"\xc2\x80\r\xc2\x9bA\r"),
            [Event::Garbage, Event::Garbage]
        );
        assert_eq!(lines("caf\u{e9}\r".as_bytes()), [line("caf\u{e9}")]);
    }

    #[test]
    fn random_noise_never_panics_and_stays_bounded() {
        let mut ed = Editor::new(Echo::On);
        let mut out = Vec::new();
        let mut rng = crate::rng::Rng::new(1);
        for _ in 0..200_000 {
            let _ = ed.feed(rng.next_u64() as u8, &mut out);
            assert!(ed.buf.len() <= MAX_LINE);
            out.clear();
        }
        let _ = ed.feed(0x03, &mut out);
        assert_eq!(feed_all(&mut ed, b"\rhelp\r").0.last(), Some(&line("help")));
    }

    #[test]
    fn a_pin_echoes_stars_and_a_pipe_gets_no_echo() {
        let (events, out) = feed_all(&mut Editor::new(Echo::Masked), b"1234\r");
        assert_eq!(events, [line("1234")]);
        assert_eq!(out, b"****\r\n");
        assert_eq!(feed_all(&mut Editor::new(Echo::Off), b"ab\x7f\r").1, b"");
    }

    #[test]
    fn tabs_are_spaces() {
        assert_eq!(lines(b"set\ta 1\r"), [line("set a 1")]);
    }
}
