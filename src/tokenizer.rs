//! Tokenizer: loading `tokenizer.json` (always through the `tokenizers` crate), and synthesising a
//! Phi-3-layout tokenizer for random test models.
//!
//! The synthesised tokenizer has the layout of Phi-3-mini's (a Llama-style SentencePiece BPE
//! exported to `tokenizers`), so token ids that the runtime hard-codes mean the same thing:
//!
//! | ids | content |
//! |---|---|
//! | 0, 1, 2 | `<unk>`, `<s>`, `</s>` |
//! | 3..=258 | byte pieces `<0x00>`..`<0xFF>` (byte fallback) |
//! | 259..=31999 | BPE pieces: `▁` and printable ASCII, then systematically generated merges |
//! | 32000..=32010 | Phi-3's added tokens (`<\|endoftext\|>`, `<\|assistant\|>`, placeholders, `<\|system\|>`, `<\|end\|>`, `<\|user\|>`) |
//! | 32011, 32012, 32013 | X-SAM's `<SEG>`, `<p>`, `</p>` |
//!
//! Pipeline as Phi-3's: normalizer `Prepend("▁")` + `Replace(" ", "▁")`, no pre-tokenizer, BPE
//! with byte fallback, decoder `Replace("▁", " ")`, `ByteFallback`, `Fuse`, `Strip(" ", 1, 0)`.
//! No post-processor: the runtime adds BOS itself (interfaces.md §2). As with Phi-3's real
//! `tokenizer.json` ("legacy" Llama normalisation), the text between added tokens is normalised
//! piece by piece, so every piece gets a leading "▁": `"<SEG>."` encodes as `<SEG>`, `▁`, `.`
//! and decodes as `"<SEG> ."`. This is why prompts are encoded in chunks (architecture notes §6.3).
//!
//! Added tokens: all special, not normalized, with no lstrip/rstrip. (Some revisions of Phi-3's
//! tokenizer set `rstrip` on the `<|...|>` chat tokens, which swallows the newline after
//! `<|user|>`; we choose the later revisions' behaviour, where the newline is tokenized as text.
//! Real models ship their own `tokenizer.json` and this choice does not apply to them.)
//!
//! The BPE pieces carry no meaning beyond being valid: every merge joins two pieces already in
//! the vocabulary and yields a piece of the vocabulary. A few English words used by the prompt
//! templates become single tokens so that test prompts stay short.

use crate::error::{Error, Result};
use std::collections::HashSet;
use std::path::Path;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{NormalizerWrapper, Prepend, Replace, Sequence as NormSequence};
use tokenizers::{AddedToken, Tokenizer};

pub use tokenizers::Tokenizer as HfTokenizer;

/// Number of base (model) pieces, as in Phi-3's SentencePiece model.
pub const BASE_VOCAB: usize = 32000;

/// Phi-3's added tokens, ids 32000..=32010, in order.
pub const PHI3_ADDED: [&str; 11] = [
    "<|endoftext|>",
    "<|assistant|>",
    "<|placeholder1|>",
    "<|placeholder2|>",
    "<|placeholder3|>",
    "<|placeholder4|>",
    "<|system|>",
    "<|end|>",
    "<|placeholder5|>",
    "<|placeholder6|>",
    "<|user|>",
];

/// X-SAM's added tokens, ids 32011..=32013.
pub const XSAM_ADDED: [&str; 3] = ["<SEG>", "<p>", "</p>"];

/// Total vocabulary of the synthesised tokenizer (= the released `llm.vocab_size`).
pub const VOCAB_SIZE: usize = BASE_VOCAB + PHI3_ADDED.len() + XSAM_ADDED.len();

const SPACE: &str = "\u{2581}"; // "▁"

/// Words that become single tokens (each through a chain of prefix merges).
const WORDS: &[&str] = &[
    "the",
    "a",
    "an",
    "and",
    "of",
    "in",
    "is",
    "it",
    "this",
    "that",
    "to",
    "for",
    "with",
    "on",
    "what",
    "where",
    "can",
    "could",
    "you",
    "please",
    "sure",
    "image",
    "picture",
    "photo",
    "segment",
    "segmentation",
    "mask",
    "masks",
    "output",
    "generate",
    "provide",
    "create",
    "highlight",
    "identify",
    "based",
    "following",
    "categories",
    "category",
    "specified",
    "these",
    "according",
    "respond",
    "corresponding",
    "result",
    "region",
    "regions",
    "describe",
    "description",
    "brief",
    "briefly",
    "explanation",
    "analysis",
    "parts",
    "answer",
    "phrases",
    "interleaved",
    "contents",
    "found",
    "within",
    "give",
    "me",
    "cat",
    "dog",
    "person",
    "car",
    "tree",
    "sky",
    "grass",
    "road",
    "building",
    "table",
    "chair",
    "man",
    "woman",
    "left",
    "right",
    "red",
    "blue",
    "green",
    "white",
    "black",
    "small",
    "large",
    "there",
    "are",
    "two",
    "one",
    "Sure",
    "Please",
    "Can",
    "Could",
    "What",
    "Where",
    "It",
    "The",
    "And",
    "There",
    "A",
];

/// Letters in a fixed order (rough English frequency), for the systematic merges.
const LETTERS: &str = "etaoinshrdlcumwfgypbvkjxqz";

/// Accumulates BPE pieces and merges; every merge joins two known pieces into a new one.
struct PieceSet {
    pieces: Vec<String>,
    seen: HashSet<String>,
    merges: Vec<(String, String)>,
    budget: usize,
}

impl PieceSet {
    fn full(&self) -> bool {
        self.pieces.len() >= self.budget
    }

    fn add(&mut self, p: String) -> bool {
        if self.full() || self.seen.contains(&p) {
            return false;
        }
        self.seen.insert(p.clone());
        self.pieces.push(p);
        true
    }

    /// Adds `l + r` when both halves exist and the result is new.
    fn merge(&mut self, l: &str, r: &str) -> bool {
        if self.full() || !self.seen.contains(l) || !self.seen.contains(r) {
            return false;
        }
        if self.add(format!("{l}{r}")) {
            self.merges.push((l.to_string(), r.to_string()));
            true
        } else {
            false
        }
    }
}

/// Builds the base pieces (ids 259..32000) and the merges, deterministically.
fn base_pieces() -> (Vec<String>, Vec<(String, String)>) {
    let mut s = PieceSet {
        pieces: Vec::with_capacity(BASE_VOCAB),
        seen: HashSet::new(),
        merges: Vec::new(),
        budget: BASE_VOCAB - 3 - 256,
    };
    // Single characters: "▁" and printable ASCII (a space is always normalised to "▁").
    s.add(SPACE.to_string());
    for b in b'!'..=b'~' {
        s.add((b as char).to_string());
    }
    // Whole words, as "▁word", via prefix chains ("▁" + "w", "▁w" + "o", ...). These come first
    // so they have the lowest ranks and win over the generic pairs below.
    for w in WORDS {
        let mut prefix = SPACE.to_string();
        for ch in w.chars() {
            s.merge(&prefix, &ch.to_string());
            prefix.push(ch);
        }
    }
    // "▁" + every letter and digit.
    let letters: Vec<char> = LETTERS.chars().collect();
    let upper: Vec<char> = letters.iter().map(|c| c.to_ascii_uppercase()).collect();
    for c in letters.iter().chain(&upper).copied().chain('0'..='9') {
        s.merge(SPACE, &c.to_string());
    }
    // Runs of spaces (indentation).
    s.merge(SPACE, SPACE);
    let two = format!("{SPACE}{SPACE}");
    s.merge(&two, &two);
    // Then generations of lowercase n-grams: n-gram = (n-1)-gram + letter, each followed by
    // "▁" + n-gram, until the vocabulary is full.
    let mut prev: Vec<String> = letters.iter().map(|c| c.to_string()).collect();
    while !s.full() && !prev.is_empty() {
        let mut next = Vec::new();
        for p in &prev {
            for &c in &letters {
                let c = c.to_string();
                s.merge(p, &c);
                let joined = format!("{p}{c}");
                if s.seen.contains(&joined) {
                    next.push(joined);
                }
            }
        }
        for p in &next {
            s.merge(SPACE, p);
        }
        prev = next;
    }
    (s.pieces, s.merges)
}

/// Builds the Phi-3-layout tokenizer described in the module docs.
pub fn synthesize_tokenizer() -> Result<Tokenizer> {
    let mut tok = synthesize_base_tokenizer()?;
    add_xsam_tokens(&mut tok)?;
    Ok(tok)
}

/// The synthesised tokenizer without X-SAM's three tokens: the layout of Phi-3's own
/// `tokenizer.json` (32011 tokens, ids 0..=32010), as `xsam convert` receives it.
pub fn synthesize_base_tokenizer() -> Result<Tokenizer> {
    let terr = |e: tokenizers::Error| Error::Tokenizer(format!("building the tokenizer: {e}"));
    let (pieces, merges) = base_pieces();
    let mut vocab_list: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    vocab_list.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    vocab_list.extend(pieces);
    if vocab_list.len() != BASE_VOCAB {
        return Err(Error::Tokenizer(format!(
            "internal: synthesised {} base pieces, expected {BASE_VOCAB}",
            vocab_list.len()
        )));
    }
    let vocab: Vocab = vocab_list
        .iter()
        .enumerate()
        .map(|(i, p)| (p.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token("<unk>".into())
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(terr)?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_normalizer(Some(NormalizerWrapper::Sequence(NormSequence::new(vec![
        NormalizerWrapper::Prepend(Prepend::new(SPACE.into())),
        NormalizerWrapper::Replace(Replace::new(" ", SPACE).map_err(terr)?),
    ]))));
    tok.with_decoder(Some(DecoderWrapper::Sequence(DecoderSequence::new(vec![
        DecoderWrapper::Replace(Replace::new(SPACE, " ").map_err(terr)?),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
        DecoderWrapper::Strip(Strip::new(' ', 1, 0)),
    ]))));
    let special = |s: &str| {
        AddedToken::from(s.to_string(), true)
            .normalized(false)
            .lstrip(false)
            .rstrip(false)
            .single_word(false)
    };
    let all: Vec<AddedToken> = ["<unk>", "<s>", "</s>"]
        .iter()
        .chain(PHI3_ADDED.iter())
        .map(|s| special(s))
        .collect();
    tok.add_special_tokens(&all);
    // The ids are an interface: check them.
    for (i, s) in PHI3_ADDED.iter().enumerate() {
        let want = (BASE_VOCAB + i) as u32;
        if tok.token_to_id(s) != Some(want) {
            return Err(Error::Tokenizer(format!(
                "internal: `{s}` got id {:?}, expected {want}",
                tok.token_to_id(s)
            )));
        }
    }
    Ok(tok)
}

/// Token count of Phi-3's tokenizer (32000 pieces + 11 added tokens): X-SAM's first token
/// gets this id.
pub const PHI3_VOCAB: usize = BASE_VOCAB + PHI3_ADDED.len();

/// Adds X-SAM's `<SEG>`, `<p>`, `</p>` to a Phi-3 tokenizer as special added tokens (not
/// normalized, no stripping), as X-SAM's `tokenizer.add_tokens(..., special_tokens=True)`
/// does; they must get ids 32011, 32012, 32013.
///
/// The tokenizer must have exactly 32011 tokens (Phi-3's), else the ids would differ and the
/// embedding rows would not match: that is an error. A tokenizer that already has the three
/// tokens at those ids (32014 tokens) is left as it is; returns whether tokens were added.
pub fn add_xsam_tokens(tok: &mut Tokenizer) -> Result<bool> {
    let want = |i: usize| (PHI3_VOCAB + i) as u32;
    let n = tok.get_vocab_size(true);
    let already = XSAM_ADDED
        .iter()
        .enumerate()
        .all(|(i, s)| tok.token_to_id(s) == Some(want(i)));
    if already && n == VOCAB_SIZE {
        return Ok(false);
    }
    if n != PHI3_VOCAB {
        return Err(Error::Tokenizer(format!(
            "the base tokenizer has {n} tokens; Phi-3's has {PHI3_VOCAB} ({BASE_VOCAB} pieces + \
             {} added tokens), which puts <SEG>, <p>, </p> at ids {}..={} as the checkpoint \
             expects",
            PHI3_ADDED.len(),
            want(0),
            want(2)
        )));
    }
    let tokens: Vec<AddedToken> = XSAM_ADDED
        .iter()
        .map(|s| {
            AddedToken::from(s.to_string(), true)
                .normalized(false)
                .lstrip(false)
                .rstrip(false)
                .single_word(false)
        })
        .collect();
    tok.add_special_tokens(&tokens);
    for (i, s) in XSAM_ADDED.iter().enumerate() {
        if tok.token_to_id(s) != Some(want(i)) {
            return Err(Error::Tokenizer(format!(
                "`{s}` got id {:?} after adding it, expected {} (is it already in the base \
                 vocabulary?)",
                tok.token_to_id(s),
                want(i)
            )));
        }
    }
    Ok(true)
}

/// Writes the synthesised tokenizer to `path` (`tokenizer.json`).
pub fn write_tokenizer(path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let tok = synthesize_tokenizer()?;
    tok.save(path, false)
        .map_err(|e| Error::Tokenizer(format!("writing {}: {e}", path.display())))
}

/// Loads a `tokenizer.json` (a file, or a model directory holding one).
pub fn load_tokenizer(path: impl AsRef<Path>) -> Result<Tokenizer> {
    let mut path = path.as_ref().to_path_buf();
    if path.is_dir() {
        path = path.join("tokenizer.json");
    }
    if !path.is_file() {
        return Err(Error::Tokenizer(format!(
            "{}: no such file",
            path.display()
        )));
    }
    Tokenizer::from_file(&path).map_err(|e| {
        Error::Tokenizer(format!(
            "{}: not a valid tokenizer.json: {e}",
            path.display()
        ))
    })
}

/// Checks that the tokenizer knows the tokens the config names, with the same ids, and that its
/// vocabulary fits the embedding table.
pub fn check_tokenizer(tok: &Tokenizer, cfg: &crate::model::Config) -> Result<()> {
    let t = &cfg.tokens;
    let mut problems = Vec::new();
    for (name, text, id) in [
        ("tokens.seg", "<SEG>", t.seg),
        ("tokens.phrase_start", "<p>", t.phrase_start),
        ("tokens.phrase_end", "</p>", t.phrase_end),
        ("tokens.end", "<|end|>", t.end),
    ] {
        match tok.token_to_id(text) {
            Some(x) if x == id => {}
            Some(x) => problems.push(format!("`{text}` has id {x}, config {name} says {id}")),
            None => problems.push(format!("`{text}` is not in the vocabulary ({name} = {id})")),
        }
    }
    let n = tok.get_vocab_size(true);
    if n > cfg.llm.vocab_size {
        problems.push(format!(
            "vocabulary has {n} tokens, more than llm.vocab_size {}",
            cfg.llm.vocab_size
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Tokenizer(problems.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_pieces_are_a_valid_bpe() {
        let (pieces, merges) = base_pieces();
        assert_eq!(pieces.len(), BASE_VOCAB - 259);
        let set: HashSet<&String> = pieces.iter().collect();
        assert_eq!(set.len(), pieces.len());
        for (l, r) in &merges {
            assert!(set.contains(l) && set.contains(r) && set.contains(&format!("{l}{r}")));
        }
    }
}
