//! Characters that change how text around them is shown without being visible themselves:
//! Unicode's format characters (general category Cf: bidirectional overrides and isolates,
//! zero-width spaces and joiners, the byte order mark, soft hyphen, tags, …) and the line
//! and paragraph separators (Zl, Zp).
//!
//! What must hold: [`is_invisible`] is true exactly for the code points of categories Cf,
//! Zl and Zp as of Unicode 15.1, except the zero-width non-joiner and joiner (U+200C,
//! U+200D): emoji sequences (👨‍👩‍👧) and scripts such as Persian and the Indic ones need them,
//! and they move nothing. So text refused for holding one can never display as
//! something other than what it is (a right-to-left override turning `gpj.exe` into
//! `exe.jpg`) or break lines where a log or terminal does not expect it.

/// Inclusive ranges of the code points in categories Cf, Zl and Zp (Unicode 15.1).
pub const RANGES: &[(u32, u32)] = &[
    (0x00AD, 0x00AD),
    (0x0600, 0x0605),
    (0x061C, 0x061C),
    (0x06DD, 0x06DD),
    (0x070F, 0x070F),
    (0x0890, 0x0891),
    (0x08E2, 0x08E2),
    (0x180E, 0x180E),
    (0x200B, 0x200B),
    (0x200E, 0x200F), // U+200C and U+200D (non-joiner, joiner) stay allowed
    (0x2028, 0x202E), // Zl, Zp, then the bidirectional embeddings and overrides
    (0x2060, 0x2064),
    (0x2066, 0x206F),
    (0xFEFF, 0xFEFF),
    (0xFFF9, 0xFFFB),
    (0x110BD, 0x110BD),
    (0x110CD, 0x110CD),
    (0x13430, 0x1343F),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0001, 0xE0001),
    (0xE0020, 0xE007F),
];

/// Whether `c` is a format character or a line or paragraph separator.
pub fn is_invisible(c: char) -> bool {
    let c = c as u32;
    RANGES.iter().any(|&(lo, hi)| (lo..=hi).contains(&c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_and_separator_characters_and_nothing_visible() {
        for c in
            ['\u{202E}', '\u{2028}', '\u{2029}', '\u{200B}', '\u{200E}', '\u{FEFF}', '\u{2066}', '\u{AD}', '\u{E0041}']
        {
            assert!(is_invisible(c), "U+{:04X}", c as u32);
        }
        for c in ['a', ' ', '–', 'ü', '✓', '\u{00A0}', '\u{2030}', '\u{2065}', '中', '\u{200C}', '\u{200D}'] {
            assert!(!is_invisible(c), "U+{:04X}", c as u32);
        }
    }
}
