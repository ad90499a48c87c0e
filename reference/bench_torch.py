"""PyTorch anchor for `xsam bench --stages`: the same stages built from transformers modules (configs only, no
downloads), random weights, timed on CPU or CUDA, with the same table and the same stage names.

    python reference/bench_torch.py [--preset full|tiny] [--device cpu|cuda] [--threads N] [--repeats 3]
        [--warmup 1] [--stages sam_encoder,siglip_encoder,pixel_decoder,mask_decoder,llm_prefill_256,...]
        [--dtype f32|bf16] [--json OUT.json]

Stages: SamVisionEncoder at image_size² (pre-neck blocks, as X-SAM uses them), SiglipVisionModel with the used layers
only (num_hidden_layers + 1 + select_layer, no head), Phi3ForCausalLM prefill of T tokens (logits of the last
position only) and one decode step after T cached tokens (DynamicCache, cropped back to T after each step);
pixel_decoder = transformers' Mask2FormerPixelDecoder (6 MSDeformAttn encoder layers over the three connector maps, one
FPN level, mask projection) and mask_decoder = Mask2FormerMaskedAttentionDecoder (9 layers, 10 mask predictions) with
X-SAM's glue (the <SEG> embedding added to the 200 query features, a cosine class head over a table of 10 phrases +
background), both configured to X-SAM's geometry (docs/xsam-architecture.md §9-§11). Weights are random
(torch default init): speed does not depend on values. f32 on CPU, bf16 on CUDA by default; SDPA attention where
transformers offers it (SigLIP, Phi-3; transformers' SAM vision attention is eager-only). GPU timing uses CUDA events
after warm-up. Needs only torch + transformers + numpy.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import time

import torch
from transformers import Phi3Config, Phi3ForCausalLM, SiglipVisionConfig, SiglipVisionModel
from transformers.models.mask2former.configuration_mask2former import Mask2FormerConfig
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerPixelDecoder,
    Mask2FormerTransformerModule,
)
from transformers.models.sam.configuration_sam import SamVisionConfig
from transformers.models.sam.modeling_sam import SamVisionEncoder

H100_FLOPS = 798e12
H100_BYTES = 3.0e12

# The xsam presets (src/model/config.rs FULL_PRESET_JSON / TINY_PRESET_JSON), the parts these stages use.
PRESETS = {
    "full": {
        "llm": dict(vocab_size=32014, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5, rope_theta=10000.0,
                    max_position_embeddings=4096, sliding_window=2047),
        "vision": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                       image_size=384, patch_size=14, select_layer=-2),
        "sam": dict(hidden_size=1024, mlp_dim=4096, num_hidden_layers=24, num_attention_heads=16, image_size=1024,
                    patch_size=16, window_size=14, global_attn_indexes=[5, 11, 17, 23]),
        "decoder": dict(hidden_dim=256, mask_feature_size=256, num_queries=200, encoder_layers=6,
                        encoder_feedforward_dim=1024, decoder_layers=10, dim_feedforward=2048, num_attention_heads=8,
                        encoder_n_points=4),
    },
    "tiny": {
        "llm": dict(vocab_size=32014, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=10000.0,
                    max_position_embeddings=4096, sliding_window=48),
        "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                       image_size=56, patch_size=14, select_layer=-2),
        "sam": dict(hidden_size=32, mlp_dim=64, num_hidden_layers=4, num_attention_heads=2, image_size=128,
                    patch_size=16, window_size=3, global_attn_indexes=[1, 3]),
        # torch's GroupNorm in the Mask2Former modules is fixed at 32 groups (xsam's tiny preset uses 8): the
        # hidden size 32 keeps the shapes of xsam's tiny preset.
        "decoder": dict(hidden_dim=32, mask_feature_size=32, num_queries=10, encoder_layers=2,
                        encoder_feedforward_dim=64, decoder_layers=5, dim_feedforward=64, num_attention_heads=4,
                        encoder_n_points=4),
    },
}


# ---- FLOPs (src/flops.rs, docs/xsam-architecture.md §16) ----
def sam_flops(s):
    d, g = s["hidden_size"], s["image_size"] // s["patch_size"]
    n = g * g
    macs = n * 3 * s["patch_size"] ** 2 * d
    mlp = n * 2 * d * s["mlp_dim"]
    for i in range(s["num_hidden_layers"]):
        if i in s["global_attn_indexes"] or s["window_size"] == 0:
            macs += n * 4 * d * d + mlp + 2 * n * n * d
        else:
            w = s["window_size"]
            gp = -(-g // w) * w
            macs += gp * gp * 4 * d * d + mlp + 2 * (gp // w) ** 2 * (w * w) ** 2 * d
    return 2.0 * macs


def siglip_layers(v):
    sl = v["select_layer"]
    return v["num_hidden_layers"] + 1 + sl if sl < 0 else sl


def siglip_flops(v):
    d, n = v["hidden_size"], (v["image_size"] // v["patch_size"]) ** 2
    layer = n * (4 * d * d + 2 * d * v["intermediate_size"]) + 2 * n * n * d
    return 2.0 * (n * 3 * v["patch_size"] ** 2 * d + siglip_layers(v) * layer)


def connector_maps(sam):
    """(channels, side) of the connector outputs, highest resolution first (scales 2, 1, 0.5: §8)."""
    h, g = sam["hidden_size"], sam["image_size"] // sam["patch_size"]
    return [(h // 2, 2 * g), (h, g), (2 * h, g // 2)]


def pixel_levels(sam):
    """Token counts of the connector levels, scale factors 2, 1, 0.5 (src/flops.rs pixel_levels)."""
    return [s * s for _, s in connector_maps(sam)]


def pixel_decoder_flops(sam, d):
    """src/flops.rs pixel_decoder: the deformable-attention encoder layers over all levels."""
    e, n = d["hidden_dim"], sum(pixel_levels(sam))
    hlp = d["num_attention_heads"] * 3 * d["encoder_n_points"]
    per_token = 2 * e * e + e * hlp * 3 + 2 * e * d["encoder_feedforward_dim"]
    return 2.0 * d["encoder_layers"] * n * per_token


def mask_decoder_flops(sam, d):
    """src/flops.rs mask_decoder: masked cross-attention, self-attention, FFN per layer, mask predictions."""
    e, q, levels = d["hidden_dim"], d["num_queries"], pixel_levels(sam)
    macs = 0.0
    for i in range(d["decoder_layers"]):
        s = levels[i % len(levels)]
        macs += 2 * s * e * e + 2 * q * s * e
        macs += q * (8 * e * e + 2 * e * d["dim_feedforward"]) + 2 * q * q * e
    macs += (d["decoder_layers"] + 1) * q * e * max(levels)
    return 2.0 * macs


def llm_layer_linear(l):
    h = l["hidden_size"]
    kv = h * l["num_key_value_heads"] / l["num_attention_heads"]
    return h * (h + 2 * kv) + h * h + 3 * h * l["intermediate_size"]


def prefill_flops(l, t):
    h, layers = l["hidden_size"], l["num_hidden_layers"]
    return 2.0 * (layers * (t * llm_layer_linear(l) + 2 * t * (t + 1) / 2 * h) + l["vocab_size"] * h)


def decode_flops(l, ctx):
    h, layers = l["hidden_size"], l["num_hidden_layers"]
    return 2.0 * (layers * (llm_layer_linear(l) + 2 * ctx * h) + l["vocab_size"] * h)


def decode_bytes(l, ctx, kv_bytes=2):
    h = l["hidden_size"]
    kv = h * l["num_key_value_heads"] / l["num_attention_heads"]
    weights = l["num_hidden_layers"] * llm_layer_linear(l) + l["vocab_size"] * h
    return 2.0 * weights + l["num_hidden_layers"] * 2 * kv * ctx * kv_bytes


# ---- modules ----
def build_sam(s, dtype, device):
    cfg = SamVisionConfig(
        hidden_size=s["hidden_size"], output_channels=256, num_hidden_layers=s["num_hidden_layers"],
        num_attention_heads=s["num_attention_heads"], image_size=s["image_size"], patch_size=s["patch_size"],
        hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True, use_abs_pos=True, use_rel_pos=True,
        window_size=s["window_size"], global_attn_indexes=list(s["global_attn_indexes"]), mlp_dim=s["mlp_dim"],
    )
    m = SamVisionEncoder(cfg).eval().requires_grad_(False).to(device=device, dtype=dtype)
    # X-SAM uses the pre-neck block outputs (hs[12], hs[18], hs[23], hs[24]); the neck is not run.
    def run(px):
        x = m.patch_embed(px)
        if m.pos_embed is not None:
            x = x + m.pos_embed
        for lay in m.layers:
            out = lay(x)
            x = out[0] if isinstance(out, tuple) else out
        return x
    return run


def build_siglip(v, dtype, device, attn):
    cfg = SiglipVisionConfig(
        hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
        num_hidden_layers=siglip_layers(v), num_attention_heads=v["num_attention_heads"], num_channels=3,
        image_size=v["image_size"], patch_size=v["patch_size"], hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6, vision_use_head=False, attn_implementation=attn,
    )
    m = SiglipVisionModel(cfg).eval().requires_grad_(False).to(device=device, dtype=dtype)
    vm = m.vision_model
    return lambda px: vm.encoder(inputs_embeds=vm.embeddings(px)).last_hidden_state


def build_phi3(l, dtype, device, attn):
    cfg = Phi3Config(
        **l, original_max_position_embeddings=l["max_position_embeddings"], tie_word_embeddings=False,
        eos_token_id=32000, pad_token_id=32000, bos_token_id=1, hidden_act="silu", rope_scaling=None,
        attention_dropout=0.0, resid_pdrop=0.0, embd_pdrop=0.0, attn_implementation=attn,
    )
    return Phi3ForCausalLM(cfg).eval().requires_grad_(False).to(device=device, dtype=dtype)


def mask2former_config(d):
    return Mask2FormerConfig(
        feature_size=d["hidden_dim"], mask_feature_size=d["mask_feature_size"], hidden_dim=d["hidden_dim"],
        encoder_feedforward_dim=d["encoder_feedforward_dim"], encoder_layers=d["encoder_layers"],
        decoder_layers=d["decoder_layers"], num_attention_heads=d["num_attention_heads"], dropout=0.0,
        dim_feedforward=d["dim_feedforward"], pre_norm=False, enforce_input_projection=False, common_stride=4,
        feature_strides=[4, 8, 16, 32], num_queries=d["num_queries"], activation_function="relu",
    )


def build_pixel_decoder(sam, d, dtype, device):
    """Mask2FormerPixelDecoder over the connector maps [512@128², 1024@64², 2048@32²] (full preset)."""
    maps = connector_maps(sam)
    m = Mask2FormerPixelDecoder(mask2former_config(d), feature_channels=[c for c, _ in maps])
    with torch.no_grad():  # nn.Parameter(torch.Tensor(...)) is left uninitialised by the module
        m.level_embed.normal_()
    m = m.eval().requires_grad_(False).to(device=device, dtype=dtype)
    feats = [torch.randn(1, c, s, s, device=device, dtype=dtype) for c, s in maps]
    return (lambda: m(feats)), m, feats


def build_mask_decoder(d, dtype, device, classes=10):
    """Mask2FormerTransformerModule's decoder with X-SAM's glue: <SEG> added to the query features, cosine class
    logits of the final query states against [phrases..., background] scaled by exp(logit_scale), clamped."""
    m = Mask2FormerTransformerModule(d["hidden_dim"], mask2former_config(d))
    m = m.eval().requires_grad_(False).to(device=device, dtype=dtype)
    e = d["hidden_dim"]
    seg = torch.randn(e, device=device, dtype=dtype)
    table = torch.randn(classes + 1, e, device=device, dtype=dtype)
    logit_scale = torch.tensor(2.659, device=device, dtype=dtype)

    def run(multi_scale, mask_features):
        feats, pos, sizes = [], [], []
        for i in range(3):
            x = multi_scale[i]
            sizes.append(x.shape[-2:])
            pos.append(m.position_embedder(x.shape, x.device, x.dtype, None).flatten(2).permute(2, 0, 1))
            feats.append((m.input_projections[i](x).flatten(2) + m.level_embed.weight[i][None, :, None]).permute(2, 0, 1))
        queries = (m.queries_features.weight + seg).unsqueeze(1)
        out = m.decoder(inputs_embeds=queries, multi_stage_positional_embeddings=pos, pixel_embeddings=mask_features,
                        encoder_hidden_states=feats, query_position_embeddings=m.queries_embedder.weight.unsqueeze(1),
                        feature_size_list=sizes, return_dict=True)
        q = torch.nn.functional.normalize(out.intermediate_hidden_states[-1].transpose(0, 1), dim=-1)
        cls = (logit_scale.exp() * q @ torch.nn.functional.normalize(table, dim=-1).T).clamp(-500, 500)
        return cls, out.masks_queries_logits[-1]
    return run


# ---- timing ----
def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_it(fn, warmup, repeats, device, label, quiet):
    out = []
    for i in range(warmup + repeats):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ms = a.elapsed_time(b)
        else:
            t = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t) * 1e3
        if not quiet:
            print(f"{label} run {i}: {ms:.1f} ms", flush=True)
        if i >= warmup:
            out.append(ms)
    return out


def pct(v, p):
    """Linear interpolation between the closest ranks, as xsam bench (the median of 2 is their mean)."""
    s = sorted(v)
    x = (len(s) - 1) * p
    lo, hi = int(x), min(int(x) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (x - lo)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="full", choices=sorted(PRESETS))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", choices=["f32", "bf16"], default=None, help="default: f32 on CPU, bf16 on CUDA")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: os.cpu_count())")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--stages", default="sam_encoder,siglip_encoder,llm_prefill_256,llm_prefill_1024,llm_decode_ctx1024")
    ap.add_argument("--attn", default="sdpa", help="attn_implementation for SigLIP / Phi-3 (sdpa, eager)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args()
    threads = a.threads or os.cpu_count()
    torch.set_num_threads(threads)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype or ("bf16" if a.device == "cuda" else "f32")]
    torch.manual_seed(0)
    P = PRESETS[a.preset]
    dev = a.device
    rows = []
    phi3 = None
    for stage in [s.strip() for s in a.stages.split(",") if s.strip()]:
        tokens, floor = None, None
        with torch.inference_mode():
            if stage == "sam_encoder":
                run = build_sam(P["sam"], dtype, dev)
                px = torch.randn(1, 3, P["sam"]["image_size"], P["sam"]["image_size"], device=dev, dtype=dtype)
                fl = sam_flops(P["sam"])
                fn = lambda: run(px)  # noqa: E731
            elif stage == "siglip_encoder":
                run = build_siglip(P["vision"], dtype, dev, a.attn)
                px = torch.randn(1, 3, P["vision"]["image_size"], P["vision"]["image_size"], device=dev, dtype=dtype)
                fl = siglip_flops(P["vision"])
                fn = lambda: run(px)  # noqa: E731
            elif stage == "pixel_decoder":
                fn, _, _ = build_pixel_decoder(P["sam"], P["decoder"], dtype, dev)
                fl = pixel_decoder_flops(P["sam"], P["decoder"])
            elif stage == "mask_decoder":
                # its inputs: a pixel-decoder run on random connector maps (multi-scale lowest resolution first)
                pd_fn, _, _ = build_pixel_decoder(P["sam"], P["decoder"], dtype, dev)
                pd_out = pd_fn()
                ms, mf = list(pd_out.multi_scale_features), pd_out.mask_features
                del pd_fn, pd_out
                run_dec = build_mask_decoder(P["decoder"], dtype, dev)
                fl = mask_decoder_flops(P["sam"], P["decoder"])
                fn = lambda: run_dec(ms, mf)  # noqa: E731
            elif stage.startswith("llm_prefill_"):
                t = int(stage[len("llm_prefill_"):])
                phi3 = phi3 or build_phi3(P["llm"], dtype, dev, a.attn)
                ids = (300 + (torch.arange(t) * 7919) % 30000).unsqueeze(0).to(dev)
                fl, tokens = prefill_flops(P["llm"], t), t
                fn = lambda: phi3(input_ids=ids, use_cache=True, logits_to_keep=1)  # noqa: E731
            elif stage.startswith("llm_decode_ctx"):
                t = int(stage[len("llm_decode_ctx"):])
                phi3 = phi3 or build_phi3(P["llm"], dtype, dev, a.attn)
                ids = (300 + (torch.arange(t) * 7919) % 30000).unsqueeze(0).to(dev)
                past = phi3(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
                one = torch.tensor([[1234]], device=dev)
                pos = torch.tensor([[t]], device=dev)
                fl, tokens = decode_flops(P["llm"], t), 1
                floor = decode_bytes(P["llm"], t) / H100_BYTES * 1e3

                windowed = t + 1 > P["llm"]["sliding_window"]

                def fn():
                    # One step on the t-token cache, then crop it back to t tokens (no copy of the cache). A
                    # sliding-window cache that has dropped states cannot be cropped: copy it instead (tiny preset).
                    pkv = copy.deepcopy(past) if windowed else past
                    out = phi3(input_ids=one, position_ids=pos, past_key_values=pkv, use_cache=True)
                    if not windowed:
                        pkv.crop(t)
                    return out
            else:
                raise SystemExit(f"unknown stage {stage!r}")
            ms = time_it(fn, a.warmup, a.repeats, dev, stage, a.quiet)
        if floor is None:
            floor = fl / H100_FLOPS * 1e3
        med = pct(ms, 0.5)
        rows.append(dict(stage=stage, samples_ms=ms, median_ms=med, p90_ms=pct(ms, 0.9),
                         tokens_per_s=(tokens / (med / 1e3)) if tokens else None, flops=fl,
                         tflops_per_s=fl / (med / 1e3) / 1e12, h100_floor_ms=floor, ratio_to_floor=med / floor))
    hwm_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"bench_torch: preset {a.preset}, {dev}, {str(dtype).replace('torch.', '')}, {threads} thread(s), "
          f"attn {a.attn}, torch {torch.__version__}, peak RSS {hwm_mb:.0f} MB")
    print("(floor = H100 floor of docs/performance.md: FLOPs / 798 TFLOP/s, decode: bytes / 3 TB/s; "
          "ratio = median / floor)")
    hdr = ("stage", "n", "median ms", "p90 ms", "tokens/s", "GFLOP", "TFLOP/s", "floor ms", "ratio")
    print("| {:<44} | {:>3} | {:>11} | {:>11} | {:>10} | {:>10} | {:>8} | {:>10} | {:>9} |".format(*hdr))
    print("|" + "|".join(["---"] * 9) + "|")
    f = lambda x, p: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
    for r in rows:
        print("| {:<44} | {:>3} | {:>11} | {:>11} | {:>10} | {:>10} | {:>8} | {:>10} | {:>9} |".format(
            r["stage"], len(r["samples_ms"]), f(r["median_ms"], 2), f(r["p90_ms"], 2), f(r["tokens_per_s"], 1),
            f(r["flops"] / 1e9, 2), f(r["tflops_per_s"], 4), f(r["h100_floor_ms"], 3), f(r["ratio_to_floor"], 1)))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(preset=a.preset, device=dev, dtype=str(dtype), threads=threads, attn=a.attn,
                           torch=torch.__version__, peak_rss_mb=hwm_mb, stages=rows), fh, indent=1)


if __name__ == "__main__":
    main()
