"""Fixtures for `xsam convert` (tests/convert.rs): checkpoints written by `torch.save` itself.

Writes tests/fixtures/convert/:

* `reader_flat.bin`      a flat OrderedDict state dict (with `_metadata`, as `Module.state_dict()` has), protocol 2
* `reader_module.bin`    the same dict wrapped the DeepSpeed way: `{'module': state_dict}`
* `reader_prefixed.bin`  a plain dict whose keys carry a `module.` prefix, pickle protocol 4
                         (STACK_GLOBAL, MEMOIZE, FRAME, SHORT_BINUNICODE instead of GLOBAL, BINPUT, BINUNICODE)
* `reader_deflated.bin`  `reader_flat.bin` repacked with deflate (a repacked archive; torch writes stored entries)
* `reader_expected.safetensors`  every tensor as a contiguous clone in its own dtype, and `bf16.<name>` = torch's
                         `.to(torch.bfloat16)` of every floating-point tensor
* `reader_global.bin`    a checkpoint that also pickles an `argparse.Namespace` (an unsupported global)
* `micro.bin`            a complete state dict for the micro geometry of `micro_manifest.json` (names and shapes
                         written by the Rust test `write_micro_manifest`), flat like the released file, mixed
                         dtypes, one transposed view, three tensors sharing one storage, one unknown key, the
                         unused SAM neck conv2 left out
* `micro_expected.json`  per tensor of micro.bin: stored dtype, shape, and the sha256 of torch's bf16 conversion

Deterministic: with the pinned versions a rerun rewrites byte-identical files.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from common import FIXTURES, setup_torch

OUT = FIXTURES / "convert"


def specials_f32() -> torch.Tensor:
    """Values that exercise bf16 rounding: ties to even both ways, overflow to inf, NaNs, zeros, subnormals."""
    bits = [
        0x3F808000,  # 1.00390625: exact tie, rounds down to even 0x3F80
        0x3F818000,  # tie, rounds up to even 0x3F82
        0x3F808001,  # just above a tie: up
        0x3F807FFF,  # just below a tie: down
        0x7F7FFFFF,  # f32 max: rounds to +inf in bf16
        0xFF7FFFFF,  # -f32 max: -inf
        0x7F800000,  # +inf
        0xFF800000,  # -inf
        0x7FC00000,  # quiet NaN
        0xFFC00001,  # negative NaN with payload: torch gives 0x7FC0
        0x7F800001,  # signalling NaN
        0x00000000,  # +0
        0x80000000,  # -0
        0x00000001,  # smallest subnormal
        0x807FFFFF,  # largest negative subnormal
        0x3EAAAAAB,  # 1/3
    ]
    import numpy as np

    return torch.from_numpy(np.array(bits, dtype=np.uint32).view(np.float32).copy())


def reader_state_dict() -> collections.OrderedDict:
    g = torch.Generator().manual_seed(1234)

    def rn(*shape):
        return torch.randn(*shape, generator=g)

    sd = collections.OrderedDict()
    # bf16, contiguous (the released checkpoint's case)
    sd["segmentor.encoder.layers.0.attn.qkv.weight"] = rn(96, 32).to(torch.bfloat16)
    sd["segmentor.encoder.layers.0.attn.qkv.bias"] = rn(96)  # f32
    sd["segmentor.encoder.layers.0.attn.proj.weight"] = rn(32, 32).to(torch.float16)
    # non-contiguous: a transposed view, stride (1, 32)
    sd["segmentor.encoder.layers.0.mlp.lin2.weight"] = rn(64, 32).t()
    # two slices of one bf16 storage (offsets 64 and 384 elements); the base itself is not saved
    big = rn(24, 32).to(torch.bfloat16)
    sd["segmentor.decoder.queries_embedder.weight"] = big[2:12]
    sd["segmentor.decoder.queries_features.weight"] = big[12:22]
    # a channels-first tensor saved as its channels-last permutation (4-D strided view)
    sd["segmentor.encoder.pos_embed"] = rn(1, 32, 8, 8).to(torch.bfloat16).permute(0, 2, 3, 1)
    # a strided 1-D view (every other element) of an f16 storage
    sd["segmentor.encoder.layers.0.layer_norm1.weight"] = rn(64).to(torch.float16)[1::2]
    sd["segmentor.logit_scale"] = torch.tensor([2.6592600345611572])
    sd["bg_embeds.weight"] = rn(1, 32).to(torch.float64) * 1.000000001
    sd["extra.specials"] = specials_f32()
    sd["extra.specials_f16"] = torch.tensor(
        [1.0, -2.5, 65504.0, -65504.0, 6.1e-5, 5.96e-8, float("inf"), float("nan")], dtype=torch.float16
    )
    sd["extra.num_batches_tracked"] = torch.tensor([3, -1, 1 << 40], dtype=torch.int64)
    sd["extra.empty"] = torch.zeros(0, 4)
    sd["extra.scalar"] = torch.tensor(0.5)
    # what Module.state_dict() attaches (pickled with BUILD)
    sd._metadata = collections.OrderedDict([("", {"version": 1}), ("segmentor", {"version": 1})])
    return sd


def repack_deflated(src: Path, dst: Path) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            # A fixed timestamp keeps the file byte-identical across runs.
            zinfo = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
            zout.writestr(zinfo, zin.read(info.filename), compress_type=zipfile.ZIP_DEFLATED)


def bf16_sha256(t: torch.Tensor) -> str:
    b = t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
    return hashlib.sha256(b).hexdigest()


def make_reader_fixtures() -> None:
    sd = reader_state_dict()
    # The view checks the Rust test makes depend on these.
    assert not sd["segmentor.encoder.layers.0.mlp.lin2.weight"].is_contiguous()
    assert sd["segmentor.decoder.queries_features.weight"].storage_offset() == 384
    assert not sd["segmentor.encoder.pos_embed"].is_contiguous()

    torch.save(sd, OUT / "reader_flat.bin")
    torch.save({"module": sd}, OUT / "reader_module.bin")
    prefixed = {f"module.{k}": v for k, v in sd.items()}
    torch.save(prefixed, OUT / "reader_prefixed.bin", pickle_protocol=4)
    repack_deflated(OUT / "reader_flat.bin", OUT / "reader_deflated.bin")
    for f in ["reader_flat.bin", "reader_module.bin", "reader_prefixed.bin"]:
        with zipfile.ZipFile(OUT / f) as z:
            assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist()), f

    # torch reads its own files back bit-exactly (sanity check of the fixture, not of the Rust reader).
    def raw(t):
        return t.contiguous().reshape(-1).view(torch.uint8)

    for f in ["reader_flat.bin", "reader_module.bin", "reader_prefixed.bin", "reader_deflated.bin"]:
        back = torch.load(OUT / f, weights_only=False)  # our own file; the weights-only loader lacks FRAME
        back = back.get("module", back)
        for k, v in sd.items():
            w = back[k] if k in back else back[f"module.{k}"]
            assert w.dtype == v.dtype and w.shape == v.shape and torch.equal(raw(w), raw(v)), (f, k)

    expected = {}
    for k, v in sd.items():
        expected[k] = v.contiguous().clone()
        if v.is_floating_point():
            expected[f"bf16.{k}"] = v.to(torch.bfloat16).contiguous().clone()
    save_file(expected, OUT / "reader_expected.safetensors")

    # A checkpoint with a non-tensor Python object: the reader must name the global and stop.
    small = collections.OrderedDict([("bg_embeds.weight", torch.ones(1, 4, dtype=torch.bfloat16))])
    torch.save({"module": small, "args": argparse.Namespace(lr=0.1)}, OUT / "reader_global.bin")


def micro_dtype(i: int, name: str) -> torch.dtype:
    if name in ("llm.model.embed_tokens.weight", "llm.lm_head.weight"):
        return torch.bfloat16  # the two big ones stay small on disk
    if "norm" in name:
        return torch.float32
    return [torch.bfloat16, torch.float32, torch.float16][i % 3]


def make_micro_fixture() -> None:
    manifest = json.loads((OUT / "micro_manifest.json").read_text())
    tensors = manifest["tensors"]
    assert tensors, "run `cargo test --test convert -- --ignored write_micro_manifest` first"
    g = torch.Generator().manual_seed(4321)
    sd = collections.OrderedDict()
    omitted = []
    for i, t in enumerate(tensors):
        name, shape = t["name"], t["shape"]
        if name == "segmentor.encoder.neck.conv2.weight":
            # Unused, so it may be absent; and at 256x256x3x3 (the neck width is fixed) it would
            # be most of the file.
            assert not t["needed"]
            omitted.append(name)
            continue
        sd[name] = (0.5 * torch.randn(*shape, generator=g)).to(micro_dtype(i, name))
    # A transposed view.
    qkv = "llm.model.layers.0.self_attn.qkv_proj.weight"
    r, c = sd[qkv].shape
    sd[qkv] = (0.5 * torch.randn(c, r, generator=g)).to(torch.float32).t()
    assert not sd[qkv].is_contiguous()
    # q, k, v projections of a SigLIP layer as slices of one storage.
    pre = "visual_encoder.vision_model.encoder.layers.0.self_attn"
    h = sd[f"{pre}.q_proj.weight"].shape[0]
    base = (0.5 * torch.randn(3 * h + 1, h, generator=g)).to(torch.bfloat16)
    for j, p in enumerate(["q", "k", "v"]):
        sd[f"{pre}.{p}_proj.weight"] = base[1 + j * h : 1 + (j + 1) * h]
    # A stage-1 tensor the final model does not have.
    sd["segmentor.class_predictor.weight"] = torch.randn(3, 8, generator=g).to(torch.bfloat16)
    torch.save(sd, OUT / "micro.bin")

    expected = {
        "note": "written by reference/make_fixtures_convert.py; sha256 of torch's .to(bfloat16) bytes",
        "omitted": omitted,
        "extra": ["segmentor.class_predictor.weight"],
        "torch": torch.__version__,
        "tensors": {
            k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape), "bf16_sha256": bf16_sha256(v)}
            for k, v in sd.items()
        },
    }
    (OUT / "micro_expected.json").write_text(json.dumps(expected, indent=1) + "\n")


def main() -> None:
    setup_torch()
    OUT.mkdir(parents=True, exist_ok=True)
    make_reader_fixtures()
    make_micro_fixture()
    for p in sorted(OUT.iterdir()):
        print(f"{p.name:32s} {p.stat().st_size:>8d} bytes")


if __name__ == "__main__":
    main()
