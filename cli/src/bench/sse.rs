//! Server-sent events, incrementally: bytes in whatever pieces the network
//! delivers them, complete events out.
//!
//! Follows the WHATWG event-stream rules that OpenAI-compatible servers rely
//! on: lines end in `\n`, `\r\n` or `\r`; `data:` lines of one event are
//! joined with `\n`; one space after the colon is dropped; lines starting
//! with `:` are comments; a blank line dispatches the event; an event with
//! no `data` line is dropped. Invariant: the events produced never depend on
//! where the input was split (a `\r` at the end of a piece waits for the next
//! piece to see whether a `\n` follows). Unlike a browser, [`SseParser::finish`]
//! dispatches an event left open when the stream ends, so a server that
//! omits the last blank line after `data: [DONE]` is still understood.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The `event:` field, when the server named the event type.
    pub event: Option<String>,
    /// The `data:` lines, joined with `\n`.
    pub data: String,
}

/// Incremental parser; feed it with [`SseParser::push`].
#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes of a line not yet terminated.
    line: Vec<u8>,
    /// The previous piece ended in `\r`: a leading `\n` belongs to it.
    after_cr: bool,
    data: Option<String>,
    event: Option<String>,
}

impl SseParser {
    /// Consumes one piece of the body; appends the events it completes.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<Event>) {
        let mut rest = bytes;
        if self.after_cr {
            self.after_cr = false;
            if let Some(stripped) = rest.strip_prefix(b"\n") {
                rest = stripped;
            }
        }
        while let Some(end) = rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            self.line.extend_from_slice(&rest[..end]);
            let is_cr = rest[end] == b'\r';
            rest = &rest[end + 1..];
            if is_cr {
                match rest.first() {
                    Some(b'\n') => rest = &rest[1..],
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            let line = std::mem::take(&mut self.line);
            self.line_done(&line, out);
        }
        self.line.extend_from_slice(rest);
    }

    /// The body ended: dispatches an unterminated last line and event.
    pub fn finish(mut self) -> Option<Event> {
        let mut out = Vec::new();
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.line_done(&line, &mut out);
        }
        self.line_done(b"", &mut out);
        out.pop()
    }

    fn line_done(&mut self, line: &[u8], out: &mut Vec<Event>) {
        if line.is_empty() {
            let event = self.event.take();
            if let Some(data) = self.data.take() {
                out.push(Event { event, data });
            }
            return;
        }
        if line[0] == b':' {
            return;
        }
        let line = String::from_utf8_lossy(line);
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_ref(), ""),
        };
        match field {
            "data" => match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            },
            "event" => self.event = Some(value.to_owned()),
            _ => {} // id, retry and unknown fields do not matter here
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_pieces(pieces: &[&[u8]]) -> Vec<Event> {
        let mut parser = SseParser::default();
        let mut out = Vec::new();
        for piece in pieces {
            parser.push(piece, &mut out);
        }
        out.extend(parser.finish());
        out
    }

    fn data(s: &str) -> Event {
        Event {
            event: None,
            data: s.to_owned(),
        }
    }

    const STREAM: &str = "data: {\"a\":1}\n\n: keep-alive\n\ndata: {\"b\":\"é ü\"}\r\n\r\nevent: error\ndata: line1\ndata:line2\n\ndata: [DONE]\n\n";

    fn expected() -> Vec<Event> {
        vec![
            data("{\"a\":1}"),
            data("{\"b\":\"é ü\"}"),
            Event {
                event: Some("error".into()),
                data: "line1\nline2".into(),
            },
            data("[DONE]"),
        ]
    }

    #[test]
    fn whole_stream() {
        assert_eq!(parse_pieces(&[STREAM.as_bytes()]), expected());
    }

    #[test]
    fn every_split_point_gives_the_same_events() {
        let bytes = STREAM.as_bytes();
        for i in 0..=bytes.len() {
            for j in i..=bytes.len() {
                let got = parse_pieces(&[&bytes[..i], &bytes[i..j], &bytes[j..]]);
                assert_eq!(got, expected(), "split at {i} and {j}");
            }
        }
    }

    #[test]
    fn byte_at_a_time() {
        let pieces: Vec<&[u8]> = STREAM.as_bytes().chunks(1).collect();
        assert_eq!(parse_pieces(&pieces), expected());
    }

    #[test]
    fn bare_cr_line_endings() {
        let got = parse_pieces(&[b"data: x\r\rdata: y\r", b"\r"]);
        assert_eq!(got, vec![data("x"), data("y")]);
    }

    #[test]
    fn unterminated_last_event_is_dispatched_at_the_end() {
        assert_eq!(parse_pieces(&[b"data: [DONE]"]), vec![data("[DONE]")]);
        assert_eq!(parse_pieces(&[b"data: [DONE]\n"]), vec![data("[DONE]")]);
    }

    #[test]
    fn events_without_data_are_dropped() {
        assert_eq!(parse_pieces(&[b"event: ping\n\nid: 3\n\n"]), vec![]);
        assert_eq!(parse_pieces(&[b"data\n\n"]), vec![data("")]);
    }
}
