"""Fixtures for the image side: preprocessing, SAM ViT encoder, SigLIP vision encoder.

Writes into tests/fixtures/:
  sam_a.safetensors / .json      SAM cfg A (window 3 on an 8x8 grid -> padded to 9x9)
  sam_b.safetensors / .json      SAM cfg B (three global layers out of four, window 4 on 12x12)
  siglip_a.safetensors / .json   SigLIP cfg A
  siglip_b.safetensors / .json   SigLIP cfg B
  preprocess_resize.safetensors / .json   resize-only cases (both paths, PIL uint8 outputs)

Run: .venv-ref/bin/python reference/make_fixtures_encoders.py   (from the repo root)
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from transformers import SiglipVisionConfig, SiglipVisionModel
from transformers.models.sam.configuration_sam import SamVisionConfig
from transformers.models.sam.modeling_sam import SamVisionAttention, SamVisionEncoder

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from common import (  # noqa: E402
    make_image,
    make_mask,
    perturb_module_params,
    rel_err,
    sam_preprocess,
    sam_prompt_mask,
    sam_scaled_size,
    siglip_preprocess,
    setup_torch,
    write_fixture,
    pil_resize,
    expand2square,
)

TOL = 1e-4  # what the Rust tests will use; the checks below require far less

# ----------------------------------------------------------------------------------------------
# configs (xsam config.json field names, interfaces.md section 1)

SAM_CONFIGS = {
    "sam_a": dict(
        hidden_size=32, mlp_dim=64, num_hidden_layers=4, num_attention_heads=2, image_size=128,
        patch_size=16, window_size=3, global_attn_indexes=[1, 3], layer_norm_eps=1e-6,
        output_channels=16, seed=1001,
        images=[(77, 123, 11), (140, 61, 12)],
    ),
    "sam_b": dict(
        hidden_size=48, mlp_dim=96, num_hidden_layers=4, num_attention_heads=3, image_size=96,
        patch_size=8, window_size=4, global_attn_indexes=[1, 2, 3], layer_norm_eps=1e-6,
        output_channels=16, seed=1002,
        # 61x192 -> scale 0.5 -> 30.5 rounds half-up to 31
        images=[(61, 192, 13), (96, 96, 14)],
    ),
}

SIGLIP_CONFIGS = {
    "siglip_a": dict(
        hidden_size=32, intermediate_size=80, num_hidden_layers=3, num_attention_heads=2, image_size=56,
        patch_size=14, layer_norm_eps=1e-6, select_layer=-2, resample="bilinear", seed=2001,
        images=[(77, 123, 11), (140, 61, 12)],
    ),
    "siglip_b": dict(
        hidden_size=48, intermediate_size=100, num_hidden_layers=4, num_attention_heads=4, image_size=48,
        patch_size=8, layer_norm_eps=1e-6, select_layer=-2, resample="bilinear", seed=2002,
        images=[(61, 192, 13), (96, 96, 14)],
    ),
}

SAM_XSAM_KEYS = ["hidden_size", "mlp_dim", "num_hidden_layers", "num_attention_heads", "image_size",
                 "patch_size", "window_size", "global_attn_indexes", "layer_norm_eps"]
SIGLIP_XSAM_KEYS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "image_size", "patch_size", "layer_norm_eps", "select_layer", "resample"]


def versions() -> dict:
    import PIL
    import safetensors

    return {"torch": torch.__version__, "transformers": transformers.__version__, "pillow": PIL.__version__,
            "numpy": np.__version__, "safetensors": safetensors.__version__}


# ----------------------------------------------------------------------------------------------
# independent float64 re-implementations written from the spec (xsam-architecture.md sections 3, 4)


def ln(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def spec_sam(sd: dict, cfg: dict, px: torch.Tensor, variant: str = "") -> list[torch.Tensor]:
    """variant (for the sensitivity checks only): "no_rel_pos", "mask_pad_keys", "scaled_q_rel_pos", "tanh_gelu"."""
    sd = {k: v.double() for k, v in sd.items()}
    C, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    hd = C // nh
    x = F.conv2d(px.double(), sd["patch_embed.projection.weight"], sd["patch_embed.projection.bias"],
                 stride=cfg["patch_size"]).permute(0, 2, 3, 1)
    x = x + sd["pos_embed"]
    hs = [x]
    G = x.shape[1]
    for i in range(cfg["num_hidden_layers"]):
        p = f"layers.{i}."
        win = 0 if i in cfg["global_attn_indexes"] else cfg["window_size"]
        h = ln(x, sd[p + "layer_norm1.weight"], sd[p + "layer_norm1.bias"], cfg["layer_norm_eps"])
        if win:
            Gp = math.ceil(G / win) * win
            hp = torch.zeros(1, Gp, Gp, C, dtype=h.dtype)
            hp[:, :G, :G] = h  # zero pad AFTER the layer norm
            nw = Gp // win
            wins = hp.reshape(nw, win, nw, win, C).permute(0, 2, 1, 3, 4).reshape(nw * nw, win, win, C)
            K = win
        else:
            wins, K = h, G
        B = wins.shape[0]
        qkv = wins.reshape(B, K * K, C) @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]
        q, k, v = qkv.reshape(B, K * K, 3, nh, hd).permute(2, 0, 3, 1, 4)  # [B, nh, K*K, hd] each
        logits = (q * hd**-0.5) @ k.transpose(-1, -2)
        idx = torch.arange(K)[:, None] - torch.arange(K)[None, :] + (K - 1)
        Rh = sd[p + "attn.rel_pos_h"][idx]  # [K(q), K(k), hd]
        Rw = sd[p + "attn.rel_pos_w"][idx]
        qg = q.reshape(B, nh, K, K, hd)  # unscaled q
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", qg, Rh)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", qg, Rw)
        if variant == "scaled_q_rel_pos":
            rel_h, rel_w = rel_h * hd**-0.5, rel_w * hd**-0.5
        if variant != "no_rel_pos":
            logits = logits + (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, nh, K * K, K * K)
        if variant == "mask_pad_keys" and win:
            valid = torch.zeros(1, Gp, Gp, dtype=torch.bool)
            valid[:, :G, :G] = True
            valid = valid.reshape(nw, win, nw, win).permute(0, 2, 1, 3).reshape(nw * nw, 1, 1, K * K)
            logits = logits.masked_fill(~valid, float("-inf"))
        att = torch.softmax(logits, -1) @ v  # [B, nh, K*K, hd]
        o = att.permute(0, 2, 1, 3).reshape(B, K * K, C) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        o = o.reshape(B, K, K, C)
        if win:
            o = o.reshape(nw, nw, win, win, C).permute(0, 2, 1, 3, 4).reshape(1, Gp, Gp, C)[:, :G, :G]
        x = x + o
        h2 = ln(x, sd[p + "layer_norm2.weight"], sd[p + "layer_norm2.bias"], cfg["layer_norm_eps"])
        m = F.gelu(h2 @ sd[p + "mlp.lin1.weight"].T + sd[p + "mlp.lin1.bias"],
                   approximate="tanh" if variant == "tanh_gelu" else "none")  # exact erf GELU
        x = x + m @ sd[p + "mlp.lin2.weight"].T + sd[p + "mlp.lin2.bias"]
        hs.append(x)
    return hs


def spec_siglip(sd: dict, cfg: dict, px: torch.Tensor, variant: str = "") -> list[torch.Tensor]:
    """variant (for the sensitivity checks only): "erf_gelu"."""
    sd = {k: v.double() for k, v in sd.items()}
    pre = "vision_model."
    C, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    hd = C // nh
    e = F.conv2d(px.double(), sd[pre + "embeddings.patch_embedding.weight"], sd[pre + "embeddings.patch_embedding.bias"],
                 stride=cfg["patch_size"])
    x = e.flatten(2).transpose(1, 2) + sd[pre + "embeddings.position_embedding.weight"][None]
    hs = [x]
    N = x.shape[1]
    for i in range(cfg["num_hidden_layers"]):
        p = f"{pre}encoder.layers.{i}."
        h = ln(x, sd[p + "layer_norm1.weight"], sd[p + "layer_norm1.bias"], cfg["layer_norm_eps"])

        def lin(t, n):
            return t @ sd[p + n + ".weight"].T + sd[p + n + ".bias"]

        q = lin(h, "self_attn.q_proj").reshape(1, N, nh, hd).transpose(1, 2)
        k = lin(h, "self_attn.k_proj").reshape(1, N, nh, hd).transpose(1, 2)
        v = lin(h, "self_attn.v_proj").reshape(1, N, nh, hd).transpose(1, 2)
        a = torch.softmax((q @ k.transpose(-1, -2)) * hd**-0.5, -1) @ v
        x = x + lin(a.transpose(1, 2).reshape(1, N, C), "self_attn.out_proj")
        h2 = ln(x, sd[p + "layer_norm2.weight"], sd[p + "layer_norm2.bias"], cfg["layer_norm_eps"])
        x = x + lin(F.gelu(lin(h2, "mlp.fc1"), approximate="none" if variant == "erf_gelu" else "tanh"), "mlp.fc2")
        hs.append(x)
    return hs


# ----------------------------------------------------------------------------------------------


def capture_layer_outputs(layers, run):
    """Runs `run()` with forward hooks: returns [input of layer 0, output of layer 0, ..., output of layer L-1]."""
    out = []

    def pre(_m, args, kwargs):
        if not out:
            out.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    def post(_m, _args, output):
        t = output[0] if isinstance(output, tuple) else output
        out.append(t.detach().clone())

    handles = [layers[0].register_forward_pre_hook(pre, with_kwargs=True)]
    handles += [lay.register_forward_hook(post) for lay in layers]
    try:
        res = run()
    finally:
        for h in handles:
            h.remove()
    return out, res


def build_sam(cfg: dict):
    hf_cfg = SamVisionConfig(
        hidden_size=cfg["hidden_size"], output_channels=cfg["output_channels"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        image_size=cfg["image_size"], patch_size=cfg["patch_size"], hidden_act="gelu",
        layer_norm_eps=cfg["layer_norm_eps"], qkv_bias=True, use_abs_pos=True, use_rel_pos=True,
        window_size=cfg["window_size"], global_attn_indexes=list(cfg["global_attn_indexes"]),
        mlp_dim=cfg["mlp_dim"], attn_implementation="eager",
    )
    torch.manual_seed(cfg["seed"])
    model = SamVisionEncoder(hf_cfg).eval().float().requires_grad_(False)
    for lay in model.layers:
        assert type(lay.attn) is SamVisionAttention, type(lay.attn)  # eager attention

    def overrides(name, p, gen):
        if name.endswith("rel_pos_h") or name.endswith("rel_pos_w"):
            return 0.25 * torch.randn(p.shape, generator=gen)
        if name == "pos_embed":
            return 0.5 * torch.randn(p.shape, generator=gen)
        return None

    perturb_module_params(model, cfg["seed"], overrides)
    return hf_cfg, model


def expected_sam_names(cfg: dict) -> set:
    names = {"patch_embed.projection.weight", "patch_embed.projection.bias", "pos_embed",
             "neck.conv1.weight", "neck.layer_norm1.weight", "neck.layer_norm1.bias", "neck.conv2.weight",
             "neck.layer_norm2.weight", "neck.layer_norm2.bias"}
    for i in range(cfg["num_hidden_layers"]):
        for m in ("layer_norm1", "layer_norm2", "attn.qkv", "attn.proj", "mlp.lin1", "mlp.lin2"):
            names |= {f"layers.{i}.{m}.weight", f"layers.{i}.{m}.bias"}
        names |= {f"layers.{i}.attn.rel_pos_h", f"layers.{i}.attn.rel_pos_w"}
    return names


def make_sam(stem: str, cfg: dict, report: dict) -> None:
    hf_cfg, model = build_sam(cfg)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert set(sd) == expected_sam_names(cfg), sorted(set(sd) ^ expected_sam_names(cfg))
    L, G = cfg["num_hidden_layers"], cfg["image_size"] // cfg["patch_size"]
    tensors = {f"segmentor.encoder.{k}": v for k, v in sd.items()}
    cases, checks = [], {}
    for ci, (h0, w0, seed) in enumerate(cfg["images"]):
        img = make_image(h0, w0, seed)
        resized, px, (newh, neww) = sam_preprocess(img, cfg["image_size"])
        pxt = torch.from_numpy(px)
        with torch.no_grad():
            hooked, out = capture_layer_outputs(model.layers, lambda: model(pxt))
            hf = model(pxt, output_hidden_states=True)
        assert len(hooked) == L + 1
        # --- finding: HF 4.57 output_hidden_states: entries 0..L-1 are pre-neck layer inputs/outputs,
        #     but the LAST entry is replaced by last_hidden_state, which is the NECK output (channels-first).
        hf_hs = hf.hidden_states
        assert len(hf_hs) == L + 1
        for k in range(L):
            assert torch.equal(hf_hs[k], hooked[k]), k
        assert hf_hs[L].shape == (1, cfg["output_channels"], G, G), hf_hs[L].shape
        assert torch.equal(hf_hs[L], hf.last_hidden_state)
        neck = model.neck(hooked[L])
        assert torch.equal(neck, hf.last_hidden_state)
        # --- independent float64 implementation from the spec
        ref64 = spec_sam(sd, cfg, pxt)
        errs = [rel_err(hooked[k], ref64[k]) for k in range(L + 1)]
        assert max(errs) < TOL / 10, errs
        # sensitivity: how far the last hidden state moves under plausible implementation mistakes
        # (each must be >> the 1e-4 test tolerance for the fixture to catch it)
        sens = {v: rel_err(spec_sam(sd, cfg, pxt, v)[L], ref64[L])
                for v in ("no_rel_pos", "mask_pad_keys", "scaled_q_rel_pos", "tanh_gelu")}
        checks[f"case{ci}"] = {"max_rel_err_f32_vs_spec_f64": max(errs), "sensitivity_rel_diff": sens}
        pre = f"case{ci}."
        tensors[pre + "image"] = img
        tensors[pre + "sam_resized"] = resized
        tensors[pre + "sam_scaled_size"] = np.array([newh, neww], dtype=np.int64)
        tensors[pre + "input.sam_pixel_values"] = px
        for k in range(L + 1):
            assert hooked[k].shape == (1, G, G, cfg["hidden_size"])
            tensors[pre + f"sam.hidden_states.{k}"] = hooked[k]
        tensors[pre + "sam.neck_output"] = neck
        cases.append({"key_prefix": pre, "image_hw": [h0, w0], "image_seed": seed, "scaled_size": [newh, neww]})
    sam = {k: cfg[k] for k in SAM_XSAM_KEYS}
    meta = {
        "kind": "sam_encoder",
        "config": {"model_type": "xsam", "sam": sam},
        "hf_only_config": {"output_channels": cfg["output_channels"], "hidden_act": "gelu", "qkv_bias": True,
                           "use_abs_pos": True, "use_rel_pos": True, "attn_implementation": "eager"},
        "weight_seed": cfg["seed"],
        "weights_prefix": "segmentor.encoder.",
        "cases": cases,
        "checks": checks,
        "notes": "sam.hidden_states.k: k=0 patch embed + pos_embed, k>=1 output of block k (1-based), [1,G,G,C] "
                 "channels-last, pre-neck. sam.neck_output = neck(hidden_states.L) [1,out,G,G] (unused by X-SAM). "
                 "image/sam_resized are HWC uint8; input.sam_pixel_values is NCHW f32, zero-padded after "
                 "normalisation.",
        "versions": versions(),
    }
    write_fixture(stem, tensors, meta)
    report[stem] = checks


def build_siglip(cfg: dict):
    hf_cfg = SiglipVisionConfig(
        hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_channels=3, image_size=cfg["image_size"], patch_size=cfg["patch_size"],
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=cfg["layer_norm_eps"], vision_use_head=False,
        attn_implementation="eager",
    )
    torch.manual_seed(cfg["seed"])
    model = SiglipVisionModel(hf_cfg).eval().float().requires_grad_(False)
    assert model.config._attn_implementation == "eager"

    def overrides(name, p, gen):
        if name.endswith("position_embedding.weight"):
            return 0.5 * torch.randn(p.shape, generator=gen)
        return None

    perturb_module_params(model, cfg["seed"], overrides)
    return hf_cfg, model


def expected_siglip_names(cfg: dict) -> set:
    pre = "vision_model."
    names = {pre + "embeddings.patch_embedding.weight", pre + "embeddings.patch_embedding.bias",
             pre + "embeddings.position_embedding.weight", pre + "post_layernorm.weight", pre + "post_layernorm.bias"}
    for i in range(cfg["num_hidden_layers"]):
        for m in ("layer_norm1", "layer_norm2", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                  "self_attn.out_proj", "mlp.fc1", "mlp.fc2"):
            names |= {f"{pre}encoder.layers.{i}.{m}.weight", f"{pre}encoder.layers.{i}.{m}.bias"}
    return names


def make_siglip(stem: str, cfg: dict, report: dict) -> None:
    hf_cfg, model = build_siglip(cfg)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert set(sd) == expected_siglip_names(cfg), sorted(set(sd) ^ expected_siglip_names(cfg))
    L = cfg["num_hidden_layers"]
    N = (cfg["image_size"] // cfg["patch_size"]) ** 2
    sel = cfg["select_layer"] % (L + 1)
    tensors = {f"visual_encoder.{k}": v for k, v in sd.items()}
    cases, checks = [], {}
    layers = model.vision_model.encoder.layers
    for ci, (h0, w0, seed) in enumerate(cfg["images"]):
        img = make_image(h0, w0, seed)
        sq, resized, px = siglip_preprocess(img, cfg["image_size"], cfg["resample"])
        pxt = torch.from_numpy(px)
        with torch.no_grad():
            hooked, out = capture_layer_outputs(layers, lambda: model(pixel_values=pxt))
            hf = model(pixel_values=pxt, output_hidden_states=True)
        hf_hs = hf.hidden_states
        assert len(hooked) == L + 1 and len(hf_hs) == L + 1
        # finding: entries 0..L-1 equal the layer inputs/outputs; the last entry is last_hidden_state
        # (= post_layernorm(output of layer L)) in transformers 4.57, not the raw layer output.
        for k in range(L):
            assert torch.equal(hf_hs[k], hooked[k]), k
        post = model.vision_model.post_layernorm(hooked[L])
        assert torch.equal(hf_hs[L], hf.last_hidden_state) and torch.equal(post, hf.last_hidden_state)
        assert torch.equal(hf_hs[cfg["select_layer"]], hooked[sel])
        ref64 = spec_siglip(sd, cfg, pxt)
        errs = [rel_err(hooked[k], ref64[k]) for k in range(L + 1)]
        assert max(errs) < TOL / 10, errs
        sens = {"erf_gelu": rel_err(spec_siglip(sd, cfg, pxt, "erf_gelu")[sel], ref64[sel]),
                "post_layernorm_applied": rel_err(post, hooked[sel]) if sel == L else
                rel_err(model.vision_model.post_layernorm(hooked[sel]), hooked[sel])}
        checks[f"case{ci}"] = {"max_rel_err_f32_vs_spec_f64": max(errs), "sensitivity_rel_diff": sens}
        pre = f"case{ci}."
        tensors[pre + "image"] = img
        tensors[pre + "siglip_square"] = sq
        tensors[pre + "siglip_resized"] = resized
        tensors[pre + "input.siglip_pixel_values"] = px
        for k in range(L + 1):
            assert hooked[k].shape == (1, N, cfg["hidden_size"])
            tensors[pre + f"siglip.hidden_states.{k}"] = hooked[k]
        tensors[pre + "siglip.selected"] = hooked[sel]
        tensors[pre + "siglip.post_layernorm"] = post
        cases.append({"key_prefix": pre, "image_hw": [h0, w0], "image_seed": seed, "square_side": int(sq.shape[0])})
    vision = {k: cfg[k] for k in SIGLIP_XSAM_KEYS}
    meta = {
        "kind": "siglip_encoder",
        "config": {"model_type": "xsam", "vision": vision},
        "hf_only_config": {"hidden_act": "gelu_pytorch_tanh", "vision_use_head": False,
                           "attn_implementation": "eager"},
        "weight_seed": cfg["seed"],
        "weights_prefix": "visual_encoder.vision_model.",
        "selected_index": sel,
        "cases": cases,
        "checks": checks,
        "notes": "siglip.hidden_states.k: k=0 embeddings (patch conv + positions), k>=1 output of layer k (1-based), "
                 "all WITHOUT post_layernorm, [1,N,C]. siglip.selected = hidden_states[select_layer] (select_layer=-2 "
                 "-> index L-1). siglip.post_layernorm = post_layernorm(hidden_states.L) (HF last_hidden_state; unused "
                 "by X-SAM). image/siglip_square/siglip_resized are HWC uint8.",
        "versions": versions(),
    }
    write_fixture(stem, tensors, meta)
    report[stem] = checks


def make_resize_set() -> None:
    """Resize-only cases: SAM path (bilinear, longest side, half-up rounding), SigLIP path (expand2square then
    bilinear and bicubic), SAM prompt-mask path (NEAREST). All outputs are uint8 straight from PIL."""
    # (h, w, seed, sam_target, siglip_target)
    specs = [
        (77, 123, 21, 128, 56),    # up-scale both axes on the SAM path
        (140, 61, 22, 128, 56),    # down H, down W; odd (side - w) for the square pad
        (61, 192, 23, 96, 48),     # 30.5 -> 31 (round half up), strong down-scale
        (190, 131, 24, 40, 32),    # strong down-scale (4.75x SAM, 5.9x SigLIP): antialias support matters
        (33, 47, 25, 160, 96),     # strong up-scale (3.4x)
        (5, 3, 26, 40, 24),        # tiny
        (96, 96, 27, 64, 80),      # square: no pad; different targets per path
        (1, 9, 28, 32, 18),        # one-pixel-high strip
    ]
    tensors, cases = {}, []
    for ci, (h, w, seed, st, vt) in enumerate(specs):
        img = make_image(h, w, seed)
        newh, neww = sam_scaled_size(h, w, st)
        sam_r = pil_resize(img, (newh, neww), "bilinear")
        sq = expand2square(img)
        sig_bl = pil_resize(sq, (vt, vt), "bilinear")
        sig_bc = pil_resize(sq, (vt, vt), "bicubic")
        mask = make_mask(h, w, seed + 100)
        m_r, _ = sam_prompt_mask(mask, st)
        pre = f"case{ci}."
        tensors[pre + "image"] = img
        tensors[pre + "sam_resized"] = sam_r
        tensors[pre + "siglip_square"] = sq
        tensors[pre + "siglip_resized_bilinear"] = sig_bl
        tensors[pre + "siglip_resized_bicubic"] = sig_bc
        tensors[pre + "mask"] = mask
        tensors[pre + "mask_resized_nearest"] = m_r
        cases.append({"key_prefix": pre, "image_hw": [h, w], "image_seed": seed, "sam_image_size": st,
                      "sam_scaled_size": [newh, neww], "siglip_image_size": vt, "square_side": max(h, w),
                      "square_offset_yx": [(max(h, w) - h) // 2, (max(h, w) - w) // 2]})
    meta = {
        "kind": "preprocess_resize",
        "cases": cases,
        "notes": "All tensors HWC (or HW for masks) uint8. sam_resized: PIL BILINEAR to sam_scaled_size "
                 "(longest side to sam_image_size, int(x*scale+0.5)). siglip_square: expand2square fill 127 centered. "
                 "siglip_resized_*: PIL resize of siglip_square to siglip_image_size^2. mask_resized_nearest: PIL "
                 "NEAREST of the L-mode mask to sam_scaled_size (prompt-mask path, before zero padding).",
        "versions": versions(),
    }
    write_fixture("preprocess_resize", tensors, meta)


def main() -> None:
    setup_torch()
    report = {}
    for stem, cfg in SAM_CONFIGS.items():
        make_sam(stem, cfg, report)
    for stem, cfg in SIGLIP_CONFIGS.items():
        make_siglip(stem, cfg, report)
    make_resize_set()
    for k, v in report.items():
        print(k, v)
    print("ok")


if __name__ == "__main__":
    main()
