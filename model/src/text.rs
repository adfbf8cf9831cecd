//! Prompt encoding as `WanPipeline` does it (wan21.md §2.1): clean the prompt, tokenize it
//! (T5TokenizerFast through `tokenizer.json`), encode the real tokens with UMT5, then zero-pad
//! the embeddings to the fixed text length.

mod html_entities;

use std::path::{Path, PathBuf};

use crate::backend::text_ops::TextOps;
use crate::error::{Error, Result};
use crate::umt5::Umt5Encoder;

/// The pipeline's `max_sequence_length`: prompts are truncated and padded to this many tokens.
pub const MAX_SEQUENCE_LENGTH: usize = 512;

/// Python's `str.isspace` (Unicode White_Space plus the separators U+001C..U+001F), which both
/// `str.strip` and the `\s` of `re` use.
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// The pipeline's prompt cleaning without ftfy: `html.unescape` twice, strip, collapse every
/// whitespace run to one space, strip.
pub fn clean_prompt(prompt: &str) -> String {
    let text = html_unescape(&html_unescape(prompt));
    let mut out = String::with_capacity(text.len());
    let mut pending_space = false;
    for c in text.chars() {
        if py_space(c) {
            pending_space = true;
        } else {
            if pending_space && !out.is_empty() {
                out.push(' ');
            }
            pending_space = false;
            out.push(c);
        }
    }
    out
}

/// The value of a named reference `name` (without `&` and `;`).
fn named_entity(name: &str) -> Option<&'static str> {
    html_entities::NAMED
        .binary_search_by(|(n, _)| n.as_bytes().cmp(name.as_bytes()))
        .ok()
        .map(|i| html_entities::NAMED[i].1)
}

/// Whether `name` is also recognised without the closing `;`.
fn is_legacy(name: &str) -> bool {
    html_entities::LEGACY
        .binary_search_by(|n| n.as_bytes().cmp(name.as_bytes()))
        .is_ok()
}

/// Python's `html._invalid_charrefs`: code points that numeric references map elsewhere
/// (Windows-1252 for 0x80..0x9F).
fn invalid_charref(num: u32) -> Option<char> {
    const C1: [char; 32] = [
        '\u{20ac}', '\u{81}', '\u{201a}', '\u{192}', '\u{201e}', '\u{2026}', '\u{2020}',
        '\u{2021}', '\u{2c6}', '\u{2030}', '\u{160}', '\u{2039}', '\u{152}', '\u{8d}', '\u{17d}',
        '\u{8f}', '\u{90}', '\u{2018}', '\u{2019}', '\u{201c}', '\u{201d}', '\u{2022}', '\u{2013}',
        '\u{2014}', '\u{2dc}', '\u{2122}', '\u{161}', '\u{203a}', '\u{153}', '\u{9d}', '\u{17e}',
        '\u{178}',
    ];
    match num {
        0 => Some('\u{fffd}'),
        0x0d => Some('\r'),
        0x80..=0x9f => Some(C1[(num - 0x80) as usize]),
        _ => None,
    }
}

/// Python's `html._invalid_codepoints`: numeric references to these decode to nothing.
fn invalid_codepoint(num: u32) -> bool {
    matches!(num, 0x1..=0x8 | 0xb | 0xe..=0x1f | 0x7f..=0x9f | 0xfdd0..=0xfdef)
        || (num & 0xfffe == 0xfffe && num <= 0x10ffff)
}

/// The decoded text of a numeric reference's digits (Python's `_replace_charref`).
fn numeric_charref(digits: &str, radix: u32, out: &mut String) {
    // Overflow means a value above 0x10FFFF.
    let num = u32::from_str_radix(digits, radix).unwrap_or(u32::MAX);
    if let Some(c) = invalid_charref(num) {
        out.push(c);
    } else if (0xd800..=0xdfff).contains(&num) || num > 0x10ffff {
        out.push('\u{fffd}');
    } else if !invalid_codepoint(num) {
        out.push(char::from_u32(num).expect("valid scalar value"));
    }
}

/// Python's `html.unescape`: every reference matching
/// `&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)` is replaced as `_replace_charref`
/// does (numeric ones with the HTML5 fix-ups, named ones by exact name or else by the longest
/// prefix that is a legacy name; unknown names are kept).
pub fn html_unescape(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('&') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        let consumed = replace_reference(after, &mut out);
        match consumed {
            Some(len) => rest = &after[len..],
            None => {
                out.push('&');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Decode the reference at the start of `s` (just after `&`) into `out`, returning the bytes
/// it spans, or `None` when no reference starts there.
fn replace_reference(s: &str, out: &mut String) -> Option<usize> {
    let bytes = s.as_bytes();
    let semi = |end: usize| end + usize::from(bytes.get(end) == Some(&b';'));
    if let Some(num) = s.strip_prefix('#') {
        let (digits_start, radix, valid): (usize, u32, fn(&u8) -> bool) =
            if num.starts_with(['x', 'X']) {
                (2, 16, u8::is_ascii_hexdigit)
            } else {
                (1, 10, u8::is_ascii_digit)
            };
        let len = bytes[digits_start..]
            .iter()
            .take_while(|b| valid(b))
            .count();
        if len == 0 {
            return None;
        }
        let end = digits_start + len;
        numeric_charref(&s[digits_start..end], radix, out);
        return Some(semi(end));
    }
    // A name: 1 to 32 characters other than tab, newline, form feed, space, `<`, `&`, `#`, `;`.
    let name_end = s
        .char_indices()
        .take(32)
        .find(|(_, c)| matches!(c, '\t' | '\n' | '\u{c}' | ' ' | '<' | '&' | '#' | ';'))
        .map(|(i, _)| i)
        .unwrap_or_else(|| s.char_indices().nth(32).map_or(s.len(), |(i, _)| i));
    if name_end == 0 {
        return None;
    }
    let name = &s[..name_end];
    let end = semi(name_end);
    let with_semi = end > name_end;
    // Exact match: `name;` is in the table for every entity, `name` alone only for legacy ones.
    if let Some(v) = named_entity(name).filter(|_| with_semi || is_legacy(name)) {
        out.push_str(v);
        return Some(end);
    }
    // Otherwise the longest legacy prefix of at least two characters, the rest kept as text.
    let full = &s[..end];
    let cuts: Vec<usize> = full.char_indices().map(|(i, _)| i).skip(2).collect();
    for &cut in cuts.iter().rev() {
        let prefix = &full[..cut];
        if let Some(v) = is_legacy(prefix).then(|| named_entity(prefix)).flatten() {
            out.push_str(v);
            out.push_str(&full[cut..]);
            return Some(end);
        }
    }
    out.push('&');
    out.push_str(full);
    Some(end)
}

/// Token ids of one prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    /// The ids kept (special tokens included), at most the maximum length.
    pub ids: Vec<u32>,
    /// How many ids the whole prompt has (special tokens included), before truncation.
    pub full_len: usize,
    /// Whether pieces were dropped to fit the maximum length.
    pub truncated: bool,
}

/// A `tokenizer.json` tokenizer (the `tokenizers` crate), with truncation done as
/// transformers does it: the pieces are cut so that they and the special tokens fit.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl Tokenizer {
    /// Load `tokenizer.json`. Padding and truncation stored in the file are turned off; this
    /// wrapper does both.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut inner: tokenizers::Tokenizer = text.parse().map_err(|e| Error::Json {
            path: path.to_path_buf(),
            reason: format!("not a tokenizers tokenizer.json: {e}"),
        })?;
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(Tokenizer {
            inner,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tokenize `text` with the special tokens (for T5: `</s>` appended), keeping at most
    /// `max_len` ids: pieces beyond `max_len` minus the special tokens are dropped.
    pub fn encode(&self, text: &str, max_len: usize) -> Result<Tokens> {
        let err = |e: tokenizers::Error| {
            Error::input(
                "prompt",
                format!("tokenizing with {}: {e}", self.path.display()),
            )
        };
        let mut enc = self.inner.encode_fast(text, false).map_err(err)?;
        let added = self
            .inner
            .get_post_processor()
            .map_or(0, |p| tokenizers::PostProcessor::added_tokens(p, false));
        if max_len <= added {
            return Err(Error::input(
                "max_sequence_length",
                format!("{max_len} leaves no room beside the {added} special token(s)"),
            ));
        }
        let full_len = enc.len() + added;
        let truncated = full_len > max_len;
        if truncated {
            enc.truncate(max_len - added, 0, tokenizers::TruncationDirection::Right);
            enc.take_overflowing();
        }
        let enc = self.inner.post_process(enc, None, true).map_err(err)?;
        Ok(Tokens {
            ids: enc.get_ids().to_vec(),
            full_len,
            truncated,
        })
    }
}

/// A prompt's embeddings as the transformer receives them.
#[derive(Debug, Clone)]
pub struct PromptEmbeds {
    /// `[1, max_len, d_model]`: the real tokens' hidden states, then exact zeros.
    pub data: Vec<f32>,
    pub shape: [usize; 3],
    /// Real tokens (`</s>` included), the rows before the zero padding.
    pub seq_len: usize,
    /// Tokens the whole prompt has before truncation (special tokens included).
    pub full_len: usize,
    /// Whether the prompt was cut to fit `max_len`.
    pub truncated: bool,
}

/// Tokenizer plus UMT5 encoder: a prompt in, padded embeddings out.
pub struct PromptEncoder<B: TextOps> {
    tokenizer: Tokenizer,
    encoder: Umt5Encoder<B>,
    backend: B,
    max_len: usize,
}

impl<B: TextOps> PromptEncoder<B> {
    pub fn new(tokenizer: Tokenizer, encoder: Umt5Encoder<B>, backend: &B) -> Self {
        PromptEncoder {
            tokenizer,
            encoder,
            backend: backend.clone(),
            max_len: MAX_SEQUENCE_LENGTH,
        }
    }

    /// Load `tokenizer/tokenizer.json` and `text_encoder/` of a diffusers model directory,
    /// naming a missing sub-folder.
    pub fn load(model_dir: &Path, backend: &B) -> Result<Self> {
        let sub = |name: &str| -> Result<PathBuf> {
            let p = model_dir.join(name);
            if p.is_dir() {
                return Ok(p);
            }
            Err(Error::input(
                model_dir.display().to_string(),
                format!(
                    "{} is missing; a diffusers Wan model directory holds text_encoder/ and \
                     tokenizer/",
                    p.display()
                ),
            ))
        };
        let tok_dir = sub("tokenizer")?;
        let enc_dir = sub("text_encoder")?;
        let tokenizer = Tokenizer::from_file(&tok_dir.join("tokenizer.json"))?;
        let encoder = Umt5Encoder::load(&enc_dir, backend)?;
        Ok(Self::new(tokenizer, encoder, backend))
    }

    /// Change the padded length (the pipeline's `max_sequence_length`, 512 by default).
    pub fn with_max_len(mut self, max_len: usize) -> Self {
        self.max_len = max_len;
        self
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn encoder(&self) -> &Umt5Encoder<B> {
        &self.encoder
    }

    /// Clean, tokenize and encode a prompt: `[1, max_len, d_model]` with the real rows first and
    /// exact zeros after them.
    pub fn encode_prompt(&self, prompt: &str) -> Result<PromptEmbeds> {
        self.encode_prompt_until(prompt, &|| false)
    }

    /// [`Self::encode_prompt`], cancellable between encoder layers by `stop`.
    pub fn encode_prompt_until(
        &self,
        prompt: &str,
        stop: &dyn Fn() -> bool,
    ) -> Result<PromptEmbeds> {
        let tokens = self.tokenizer.encode(&clean_prompt(prompt), self.max_len)?;
        let hidden = self.encoder.encode_until(&tokens.ids, stop)?;
        let d = self.encoder.config().d_model;
        let mut data = self.backend.download(&hidden)?;
        data.resize(self.max_len * d, 0.0);
        Ok(PromptEmbeds {
            data,
            shape: [1, self.max_len, d],
            seq_len: tokens.ids.len(),
            full_len: tokens.full_len,
            truncated: tokens.truncated,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescape_follows_python() {
        let cases = [
            ("a &amp; b", "a & b"),
            ("&amp;amp;", "&amp;"),
            ("&lt;tag&gt;", "<tag>"),
            ("&amp", "&"),
            ("&ampx", "&x"),
            ("&notit;", "¬it;"),
            ("&notin;", "∉"),
            ("&unknown;", "&unknown;"),
            ("&#39;&#x27;&#X27", "'''"),
            ("&#128;", "€"),
            ("&#0;", "\u{fffd}"),
            ("&#xD800;", "\u{fffd}"),
            ("&#1;x", "x"),
            ("&#99999999999;", "\u{fffd}"),
            ("&;&#;&#x;& x", "&;&#;&#x;& x"),
            ("&nbsp;", "\u{a0}"),
            ("&Eacute;t&eacute", "Été"),
            ("&fjlig;&acE;", "fj\u{223e}\u{333}"),
        ];
        for (s, want) in cases {
            assert_eq!(html_unescape(s), want, "{s}");
        }
    }

    #[test]
    fn clean_collapses_whitespace_and_unescapes_twice() {
        assert_eq!(clean_prompt("  a\t\n b\u{3000}c  "), "a b c");
        assert_eq!(clean_prompt("&amp;lt;b&amp;gt;"), "<b>");
        assert_eq!(clean_prompt("x&nbsp;y"), "x y");
        assert_eq!(clean_prompt("a\u{1f}b"), "a b");
        assert_eq!(clean_prompt(""), "");
        assert_eq!(clean_prompt(" \n "), "");
    }
}
