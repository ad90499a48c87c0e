//! Prompt text and its tokenization (interfaces.md §2, architecture notes §6.2-§6.3).
//!
//! The prompt string is split at `<image>` and `<region>`; each text chunk is encoded on its own
//! without special-token insertion (Phi-3's normalizer prepends "▁" to every chunk, so encoding
//! the whole string at once gives different ids), and BOS goes first.

use crate::{Error, Result};

pub const IMAGE_TAG: &str = "<image>";
pub const REGION_TAG: &str = "<region>";

/// One element of an encoded prompt before splicing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptToken {
    Id(u32),
    /// Expands to the vision tokens then the SAM tokens.
    Image,
    /// The k-th `<region>` (0-based), one region vector.
    Region(usize),
}

/// The single-turn Phi-3 chat prompt around a question (xtuner's `phi3_chat` template).
pub fn chat_prompt(question: &str) -> String {
    format!("<|user|>\n{IMAGE_TAG}\n{question}<|end|>\n<|assistant|>\n")
}

/// Splits at the image and region tags, keeping the tags as separators.
#[derive(Debug, PartialEq)]
enum Part<'a> {
    Text(&'a str),
    Tag(PromptToken),
}

fn split_tags(text: &str) -> Vec<Part<'_>> {
    let mut parts = vec![];
    let mut rest = text;
    let mut regions = 0;
    loop {
        let next = [IMAGE_TAG, REGION_TAG]
            .iter()
            .filter_map(|t| rest.find(t).map(|i| (i, *t)))
            .min_by_key(|&(i, _)| i);
        match next {
            None => {
                parts.push(Part::Text(rest));
                return parts;
            }
            Some((i, tag)) => {
                parts.push(Part::Text(&rest[..i]));
                if tag == IMAGE_TAG {
                    parts.push(Part::Tag(PromptToken::Image));
                } else {
                    parts.push(Part::Tag(PromptToken::Region(regions)));
                    regions += 1;
                }
                rest = &rest[i + tag.len()..];
            }
        }
    }
}

/// Encodes `text` chunk by chunk: BOS, then each text chunk's ids, with `Image` / `Region(k)`
/// where the tags were. Empty chunks contribute nothing.
pub fn encode_chunks(
    tok: &tokenizers::Tokenizer,
    text: &str,
    bos: u32,
) -> Result<Vec<PromptToken>> {
    let mut out = vec![PromptToken::Id(bos)];
    for part in split_tags(text) {
        match part {
            Part::Tag(tag) => out.push(tag),
            Part::Text("") => {}
            Part::Text(chunk) => {
                out.extend(encode_text(tok, chunk)?.into_iter().map(PromptToken::Id))
            }
        }
    }
    Ok(out)
}

/// Ids of one text chunk, no special tokens added.
pub fn encode_text(tok: &tokenizers::Tokenizer, chunk: &str) -> Result<Vec<u32>> {
    let enc = tok
        .encode(chunk, false)
        .map_err(|e| Error::Tokenizer(format!("cannot encode {chunk:?}: {e}")))?;
    Ok(enc.get_ids().to_vec())
}

/// Class names as they enter the prompt (interfaces.md §5.4): lowercased, `-merged`, `-other`,
/// `-stuff` removed, remaining `-` as spaces.
pub fn normalize_class_name(name: &str) -> String {
    name.trim()
        .to_lowercase()
        .replace("-merged", "")
        .replace("-other", "")
        .replace("-stuff", "")
        .replace('-', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_at_tags_in_order() {
        let p = split_tags("a<image>\nb<region>c<region>");
        assert_eq!(
            p,
            vec![
                Part::Text("a"),
                Part::Tag(PromptToken::Image),
                Part::Text("\nb"),
                Part::Tag(PromptToken::Region(0)),
                Part::Text("c"),
                Part::Tag(PromptToken::Region(1)),
                Part::Text("")
            ]
        );
    }

    #[test]
    fn class_names_follow_the_spec() {
        assert_eq!(normalize_class_name(" Wall-other-merged "), "wall");
        assert_eq!(normalize_class_name("traffic-light"), "traffic light");
        assert_eq!(normalize_class_name("Sky-stuff"), "sky");
    }
}
