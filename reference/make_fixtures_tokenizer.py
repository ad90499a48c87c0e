"""Chunked tokenization fixture (issue 4): ids that the Python `tokenizers` package gives for
X-SAM prompts on the tokenizer.json that `xsam init` writes.

The rule (interfaces.md §2, architecture notes §6.3): split the prompt at `<image>` and `<region>`,
encode every text chunk on its own with add_special_tokens=False, put BOS (id 1) first, and mark
the tags with -200 (image) and -300 (region) as the original code does.

Usage: python reference/make_fixtures_tokenizer.py PATH/TO/tokenizer.json
(`cargo run -- init --preset tiny --out DIR` writes one; the Rust test regenerates the same file
and checks its SHA-256 against the one recorded here before comparing ids.)
"""
import hashlib
import json
import re
import sys

import tokenizers

IMAGE, REGION = -200, -300


def chat(question):
    return f"<|user|>\n<image>\n{question}<|end|>\n<|assistant|>\n"


def encode_chunks(tok, text, bos=1):
    ids = [bos]
    for part in re.split(r"(<image>|<region>)", text):
        if part == "<image>":
            ids.append(IMAGE)
        elif part == "<region>":
            ids.append(REGION)
        elif part:
            ids.extend(tok.encode(part, add_special_tokens=False).ids)
    return ids


CASES = [
    chat("What is in this image?"),
    chat("Please segment <p>the dog on the left</p> in this image."),
    chat("Can you segment the image based on the following categories: <p>person</p>, <p>traffic light</p>, <p>wall</p>? Please output the segmentation masks."),
    chat("Can you segment the image based on the following regions: <p><region></p>, <p><region></p>? Please output the corresponding segmentation mask."),
    chat("Could you please give me a brief description of the image? Please respond with interleaved segmentation masks for the corresponding parts of the answer."),
    chat("Why is the sky blue?  Two  spaces,\ttab, ünïcödé and an emoji 🐕 and digits 12345."),
    "Sure, <SEG>.<|end|>",
    "<p>A man</p> is riding <p>a horse</p> on <p>the beach</p>. And <SEG>.<|end|>",
    "<image>text right after the image",
    "",
]


def main():
    path = sys.argv[1]
    raw = open(path, "rb").read()
    tok = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
    out = {
        "tokenizers_version": tokenizers.__version__,
        "tokenizer_sha256": hashlib.sha256(raw).hexdigest(),
        "bos": 1,
        "image_placeholder": IMAGE,
        "region_placeholder": REGION,
        "cases": [{"text": t, "ids": encode_chunks(tok, t)} for t in CASES],
        "decode": [
            {"ids": ids, "text": tok.decode(ids, skip_special_tokens=False)}
            for ids in (tok.encode("Sure, <SEG>.", add_special_tokens=False).ids,
                        tok.encode("<p>A man</p> rides.", add_special_tokens=False).ids)
        ],
    }
    with open("tests/fixtures/tokenizer_cases.json", "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
    print("wrote tests/fixtures/tokenizer_cases.json", len(CASES), "cases")


if __name__ == "__main__":
    main()
