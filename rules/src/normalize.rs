//! String normalisation shared by customer ids and every string compared in rules:
//! Unicode NFKC, then invisible format characters (category Cf) removed, then trimmed.

use std::borrow::Cow;
use unicode_normalization::UnicodeNormalization;

/// Normalises `s` as the contract requires. ASCII strings without surrounding white space
/// and without control characters are returned borrowed: that is the hot path for ids and
/// most property values.
pub fn normalize(s: &str) -> Cow<'_, str> {
    if is_plain_ascii(s) {
        return Cow::Borrowed(s);
    }
    let folded: String = s.nfkc().filter(|c| !is_format_char(*c)).collect();
    let trimmed = folded.trim();
    if trimmed.len() == folded.len() {
        Cow::Owned(folded)
    } else {
        Cow::Owned(trimmed.to_owned())
    }
}

fn is_plain_ascii(s: &str) -> bool {
    let bytes = s.as_bytes();
    bytes.iter().all(|b| (0x20..0x7f).contains(b))
        && bytes.first().is_none_or(|b| *b != b' ')
        && bytes.last().is_none_or(|b| *b != b' ')
}

/// True for characters of Unicode general category Cf (format), which are invisible.
/// The table covers every Cf code point of Unicode 15.1.
pub fn is_format_char(c: char) -> bool {
    matches!(c as u32,
        0x00AD
        | 0x0600..=0x0605
        | 0x061C
        | 0x06DD
        | 0x070F
        | 0x0890..=0x0891
        | 0x08E2
        | 0x180E
        | 0x200B..=0x200F
        | 0x202A..=0x202E
        | 0x2060..=0x2064
        | 0x2066..=0x206F
        | 0xFEFF
        | 0xFFF9..=0xFFFB
        | 0x110BD
        | 0x110CD
        | 0x13430..=0x1343F
        | 0x1BCA0..=0x1BCA3
        | 0x1D173..=0x1D17A
        | 0xE0001
        | 0xE0020..=0xE007F)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_width_digits_and_zero_width_space_fold_to_plain_id() {
        assert_eq!(normalize("１３８\u{200b}"), "138");
        assert_eq!(normalize("  138 "), "138");
        assert_eq!(normalize("\u{feff}ab\u{2060}c\u{200d}"), "abc");
    }

    #[test]
    fn plain_ascii_is_borrowed() {
        assert!(matches!(normalize("ent-00254"), Cow::Borrowed(_)));
        assert!(matches!(normalize(" x"), Cow::Owned(_)));
    }

    #[test]
    fn chinese_text_is_kept() {
        assert_eq!(normalize("杭州\u{200b}"), "杭州");
        assert_eq!(normalize("上海优选食品有限公司#289"), "上海优选食品有限公司#289");
    }
}
