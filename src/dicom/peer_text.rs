//! Peer-supplied text made safe for log lines.
//!
//! Calling AE titles, UIDs, comments and error texts that quote them come from the
//! network. Logged raw, a newline or escape sequence in them forges log lines or
//! terminal output. [`peer_str`] quotes one such string and escapes what is not
//! printable; [`escaped`] escapes control characters in a whole message (an error text
//! from another module that may quote peer data) without adding quotes.

use std::fmt::{self, Display, Write};

/// A peer-supplied string for a log line: in double quotes, with control characters,
/// quotes and backslashes escaped (`"A\nB"` is logged as `"A\nB"`, one line).
pub fn peer_str(s: &str) -> PeerStr<'_> {
    PeerStr(s)
}

/// See [`peer_str`].
pub struct PeerStr<'a>(&'a str);

impl Display for PeerStr<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // str's Debug form is exactly this: quoted, `\n`, `\"`, `\\`, `\u{..}` escapes.
        write!(f, "{:?}", self.0)
    }
}

/// A whole message (e.g. an error's text) with its control characters escaped and no
/// quotes added: for texts built elsewhere that may embed peer data.
pub fn escaped<T: Display>(message: T) -> Escaped<T> {
    Escaped(message)
}

/// See [`escaped`].
pub struct Escaped<T>(T);

impl<T: Display> Display for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = EscapeControls(f);
        write!(out, "{}", self.0)
    }
}

struct EscapeControls<'a, 'b>(&'a mut fmt::Formatter<'b>);

impl Write for EscapeControls<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            if c.is_control() || c == '\u{2028}' || c == '\u{2029}' {
                for e in c.escape_default() {
                    self.0.write_char(e)?;
                }
            } else {
                self.0.write_char(c)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_strings_stay_on_one_line_and_are_quoted() {
        assert_eq!(peer_str("CT").to_string(), "\"CT\"");
        let forged = peer_str("A\nFORGED\r\x1b[2J\"q\"\\").to_string();
        assert!(!forged.contains(['\n', '\r', '\x1b']), "{forged}");
        assert_eq!(forged, r#""A\nFORGED\r\u{1b}[2J\"q\"\\""#);
        assert_eq!(peer_str("a\u{2028}b").to_string(), r#""a\u{2028}b""#);
    }

    #[test]
    fn whole_messages_keep_their_text_but_lose_control_characters() {
        let e = anyhow::anyhow!("UID \"1.2\nFORGED\" does not match");
        let s = escaped(&e).to_string();
        assert_eq!(s, r#"UID "1.2\nFORGED" does not match"#);
        assert_eq!(escaped("x\u{0}y\u{2029}").to_string(), r"x\u{0}y\u{2029}");
        assert_eq!(escaped("plain ÄÖ text").to_string(), "plain ÄÖ text");
    }
}
