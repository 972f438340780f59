//! [`Text`], a string with a fixed capacity, so rules can build metric
//! names, topics and JSON documents without an allocator.

use core::fmt;
use core::ops::Deref;

use crate::Error;

/// UTF-8 text of at most `N` bytes, stored inline.
///
/// It dereferences to `&str`. Build one with [`text!`](crate::text!),
/// [`push_str`](Text::push_str) or `TryFrom<&str>`; each reports
/// [`Error::Capacity`] instead of cutting the text short. Through
/// [`core::fmt::Write`] it keeps what fits (whole characters) and then
/// reports `fmt::Error`, which suits log lines.
#[derive(Clone)]
pub struct Text<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> Text<N> {
    /// Empty text.
    pub const fn new() -> Self {
        Text {
            buf: [0; N],
            len: 0,
        }
    }

    /// The capacity in bytes.
    pub const fn capacity(&self) -> usize {
        N
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // Only whole `&str`s (or their char-aligned prefixes) are copied in.
        unsafe { core::str::from_utf8_unchecked(&self.buf[..self.len]) }
    }

    /// Appends `s` whole, or leaves the text unchanged and reports
    /// [`Error::Capacity`].
    pub fn push_str(&mut self, s: &str) -> Result<&mut Self, Error> {
        let end = self.len + s.len();
        if end > N {
            return Err(Error::Capacity);
        }
        self.buf[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(self)
    }

    /// Appends one character, or reports [`Error::Capacity`].
    pub fn push(&mut self, c: char) -> Result<&mut Self, Error> {
        let mut utf8 = [0u8; 4];
        self.push_str(c.encode_utf8(&mut utf8))
    }

    /// Empties the text, keeping the capacity.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Shortens the text to `len` bytes; does nothing if it is not that long.
    /// `len` must fall on a character boundary, else the text is unchanged.
    pub fn truncate(&mut self, len: usize) {
        if len < self.len && self.as_str().is_char_boundary(len) {
            self.len = len;
        }
    }
}

impl<const N: usize> Default for Text<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Deref for Text<N> {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl<const N: usize> AsRef<str> for Text<N> {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl<const N: usize> AsRef<[u8]> for Text<N> {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl<'a, const N: usize> TryFrom<&'a str> for Text<N> {
    type Error = Error;
    fn try_from(s: &'a str) -> Result<Self, Error> {
        let mut t = Text::new();
        t.push_str(s)?;
        Ok(t)
    }
}

impl<const N: usize> PartialEq for Text<N> {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl<const N: usize> Eq for Text<N> {}

impl<const N: usize> PartialEq<str> for Text<N> {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl<'a, const N: usize> PartialEq<&'a str> for Text<N> {
    fn eq(&self, other: &&'a str) -> bool {
        self.as_str() == *other
    }
}

impl<const N: usize> fmt::Write for Text<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.push_str(s).is_ok() {
            return Ok(());
        }
        // Keep the longest whole-character prefix that fits.
        let mut fit = N - self.len;
        while !s.is_char_boundary(fit) {
            fit -= 1;
        }
        let _ = self.push_str(&s[..fit]);
        Err(fmt::Error)
    }
}

impl<const N: usize> fmt::Display for Text<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<const N: usize> fmt::Debug for Text<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// Formats into a [`Text`] like `format!`, giving `Result<Text<N>, Error>`;
/// `N` comes from the type the result is used as.
///
/// ```
/// # use sluice_rule::{text, Text, Error};
/// # fn f() -> Result<(), Error> {
/// let topic: Text<64> = text!("alerts/{}", "d1")?;
/// assert_eq!(topic, "alerts/d1");
/// # Ok(()) }
/// # f().unwrap();
/// ```
#[macro_export]
macro_rules! text {
    ($($arg:tt)*) => {{
        let mut text = $crate::Text::new();
        match ::core::fmt::Write::write_fmt(&mut text, ::core::format_args!($($arg)*)) {
            ::core::result::Result::Ok(()) => ::core::result::Result::Ok(text),
            ::core::result::Result::Err(_) => ::core::result::Result::Err($crate::Error::Capacity),
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::fmt::Write;

    #[test]
    fn push_is_all_or_nothing() {
        let mut t = Text::<5>::new();
        t.push_str("abc").unwrap();
        assert_eq!(t.push_str("def").err(), Some(Error::Capacity));
        assert_eq!(t, "abc");
        t.push('é').unwrap();
        assert_eq!(t.len(), 5);
    }

    #[test]
    fn fmt_write_keeps_whole_characters() {
        let mut t = Text::<4>::new();
        assert!(write!(t, "aé€").is_err());
        assert_eq!(t, "aé");
    }

    #[test]
    fn text_macro_reports_overflow() {
        let ok: Result<Text<16>, Error> = crate::text!("{}_{}", "temp", 3);
        assert_eq!(ok.unwrap(), "temp_3");
        let too_long: Result<Text<4>, Error> = crate::text!("{}_{}", "temp", 3);
        assert_eq!(too_long.err(), Some(Error::Capacity));
    }
}
