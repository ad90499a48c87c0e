"""The whole X-SAM pipeline in PyTorch + transformers on an xsam model directory (interfaces.md §1):
image in, the interfaces.md §4 result JSON out (without `timings_ms`).

Built from the pieces the other fixture scripts check stage by stage:

* preprocessing (PIL on uint8): `common.sam_preprocess`, `common.siglip_preprocess`, `common.sam_prompt_mask`
* SAM ViT encoder = transformers' `SamVisionEncoder` (pre-neck block outputs via forward hooks, as in
  `make_fixtures_encoders.py`), SigLIP = transformers' `SiglipVisionModel` (layer outputs via hooks, no
  post-layernorm)
* projectors, connector, pixel decoder, masked-attention decoder with `<SEG>` in the content queries, class head,
  region sampler with the deterministic points: `make_fixtures_seg.py`
* Phi-3 = transformers' `Phi3ForCausalLM` (eager) with the explicit sliding-window mask of interfaces.md §2
* chunked tokenization: `make_fixtures_tokenizer.encode_chunks` (BOS first, split at `<image>` / `<region>`)
* post-processing per task, RLE: `make_fixtures_post.py`

plus the glue from the spec (interfaces.md §2, §4, §5; xsam-architecture.md §6.3-§6.4, §12-§13): the first
question template of each task, the chat prompt, forced answers as their own chunk, splicing (SigLIP tokens then
SAM tokens; one vector per region), greedy generation, phrase / `<SEG>` embeddings, the §5.12 no-masks rule and
cross-image vgd (§5.13).

Generation recomputes the full sequence at every step (no KV cache): slower, but it is the plain definition, and
it records the top-1 / top-2 logit gap of every step (`XSamReference.last_margins`).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import tokenizers
from safetensors.torch import load_file
from transformers import Phi3Config, Phi3ForCausalLM, SiglipVisionConfig, SiglipVisionModel
from transformers.models.sam.configuration_sam import SamVisionConfig
from transformers.models.sam.modeling_sam import SamVisionEncoder

import make_fixtures_post as post
import make_fixtures_seg as seg
from common import sam_preprocess, sam_prompt_mask, siglip_preprocess
from make_fixtures_encoders import capture_layer_outputs
from make_fixtures_phi3 import window_mask
from make_fixtures_tokenizer import IMAGE, REGION, chat, encode_chunks

SEG_TASKS = ("semantic", "instance", "panoptic", "referring", "reasoning", "gcg", "interactive", "vgd")
DEFAULT_ANSWER = "Sure, <SEG>."
# Simulated mistakes for the sensitivity check of make_fixtures_e2e.py (None = the reference).
VARIANT = None


def normalize_class_name(name: str) -> str:
    """interfaces.md §5.4: lowercased; -merged, -other, -stuff removed; - becomes a space."""
    n = name.strip().lower()
    for suf in ("-merged", "-other", "-stuff"):
        n = n.replace(suf, "")
    return n.replace("-", " ")


def question_for(task: str, classes, stuff, text, n_regions) -> str:
    """The FIRST template of each task's list (xsam-architecture.md §13; interfaces.md §2)."""
    if task == "conversation":
        return text.strip()
    if task in ("semantic", "instance", "panoptic"):
        cats = ", ".join(f"<p>{normalize_class_name(c)}</p>" for c in list(classes) + list(stuff))
        return (f"Can you segment the image based on the following categories: {cats}? "
                "Please output the segmentation masks.")
    if task == "referring":
        return f"Please identify and segment the <p>{text.strip().lower()}</p> in this image."
    if task == "reasoning":
        return f"<p>{text.strip()}</p> Please output the corresponding segmentation mask."
    if task == "gcg":
        return ("Could you please give me a brief description of the image? Please respond with interleaved "
                "segmentation masks for the corresponding parts of the answer.")
    if task in ("interactive", "vgd"):
        regs = ", ".join(["<p><region></p>"] * n_regions)
        return (f"Can you segment the image based on the following regions: {regs}? "
                "Please output the corresponding segmentation mask.")
    raise ValueError(f"unknown task {task}")


def spans(ids, start_id, end_id):
    out, start = [], None
    for i, t in enumerate(ids):
        if t == start_id:
            start = i
        elif t == end_id and start is not None:
            out.append((start, i))
            start = None
    return out


class XSamReference:
    def __init__(self, model_dir):
        model_dir = Path(model_dir)
        self.cfg = cfg = json.loads((model_dir / "config.json").read_text())
        assert cfg["model_type"] == "xsam"
        sd = {k: v.float() for k, v in load_file(str(model_dir / "model.safetensors")).items()}
        self.tok = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokens = cfg["tokens"]
        sam, vis, llm = cfg["sam"], cfg["vision"], cfg["llm"]

        def sub(prefix, drop=()):
            return {k[len(prefix):]: v for k, v in sd.items()
                    if k.startswith(prefix) and not any(k[len(prefix):].startswith(d) for d in drop)}

        # SAM ViT (HF SamVisionEncoder, eager)
        sam_sd = sub("segmentor.encoder.")
        neck_ch = sam_sd["neck.conv1.weight"].shape[0] if "neck.conv1.weight" in sam_sd else 16
        self.sam = SamVisionEncoder(SamVisionConfig(
            hidden_size=sam["hidden_size"], output_channels=neck_ch, num_hidden_layers=sam["num_hidden_layers"],
            num_attention_heads=sam["num_attention_heads"], image_size=sam["image_size"],
            patch_size=sam["patch_size"], hidden_act="gelu", layer_norm_eps=sam["layer_norm_eps"], qkv_bias=True,
            use_abs_pos=True, use_rel_pos=True, window_size=sam["window_size"],
            global_attn_indexes=list(sam["global_attn_indexes"]), mlp_dim=sam["mlp_dim"],
            attn_implementation="eager")).eval().float().requires_grad_(False)
        missing, unexpected = self.sam.load_state_dict(sam_sd, strict=False)
        assert not unexpected and all(m.startswith("neck.") for m in missing), (missing, unexpected)

        # SigLIP (HF SiglipVisionModel, no head)
        self.siglip = SiglipVisionModel(SiglipVisionConfig(
            hidden_size=vis["hidden_size"], intermediate_size=vis["intermediate_size"],
            num_hidden_layers=vis["num_hidden_layers"], num_attention_heads=vis["num_attention_heads"],
            num_channels=3, image_size=vis["image_size"], patch_size=vis["patch_size"],
            hidden_act="gelu_pytorch_tanh", layer_norm_eps=vis["layer_norm_eps"], vision_use_head=False,
            attn_implementation="eager")).eval().float().requires_grad_(False)
        missing, unexpected = self.siglip.load_state_dict(sub("visual_encoder.", drop=("vision_model.head.",)),
                                                          strict=False)
        assert not unexpected and all("post_layernorm" in m for m in missing), (missing, unexpected)

        # Phi-3 (eager, explicit window mask)
        self.llm = Phi3ForCausalLM(Phi3Config(
            **{k: llm[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_theta",
                                   "max_position_embeddings", "sliding_window", "bos_token_id")},
            original_max_position_embeddings=llm["max_position_embeddings"], tie_word_embeddings=False,
            eos_token_id=32000, pad_token_id=32000, hidden_act="silu", rope_scaling=None,
            partial_rotary_factor=1.0, attention_dropout=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_implementation="eager")).eval().float().requires_grad_(False)
        self.llm.load_state_dict(sub("llm."), strict=True)

        # segmentation side (projectors, connector, pixel decoder, decoder, class head)
        self.seg = seg.XSamSeg(cfg).eval().float().requires_grad_(False)
        seg_sd = {k: v for k, v in sd.items() if k in seg.expected_names(cfg)}
        assert set(seg_sd) == seg.expected_names(cfg), sorted(seg.expected_names(cfg) - set(seg_sd))
        self.seg.load_state_dict(seg_sd, strict=True)
        self.last_margins = {}

    # ------------------------------------------------------------------------------------------
    def image_side(self, img: np.ndarray) -> dict:
        """Encoders, projectors, connector and pixel decoder of one image (HWC uint8)."""
        cfg = self.cfg
        S, V = cfg["sam"]["image_size"], cfg["vision"]["image_size"]
        L = cfg["sam"]["num_hidden_layers"]
        _, sam_px, scaled = sam_preprocess(img, S)
        resample = cfg["vision"].get("resample", "bilinear")
        if VARIANT == "siglip_bicubic":
            resample = "bicubic"
        _, _, sig_px = siglip_preprocess(img, V, resample)
        with torch.no_grad():
            hs, _ = capture_layer_outputs(self.sam.layers, lambda: self.sam(torch.from_numpy(sam_px)))
            vhs, _ = capture_layer_outputs(self.siglip.vision_model.encoder.layers,
                                           lambda: self.siglip(pixel_values=torch.from_numpy(sig_px)))
            assert len(hs) == L + 1 and len(vhs) == cfg["vision"]["num_hidden_layers"] + 1
            selected = vhs[cfg["vision"]["select_layer"]]
            visual = self.seg.visual_projector(selected)[0]
            ssel = cfg["projector"]["seg_select_layer"] % (L + 1)
            segtok = self.seg.seg_projector(hs[ssel])[0]
            conn = self.seg.seg_connector([hs[k] for k in cfg["connector"]["select_layers"]])
            pd_out, _ = seg.run_pixel_decoder(self.seg.segmentor.pixel_decoder, conn)
        return {"image_hw": img.shape[:2], "scaled": scaled, "visual": visual, "seg": segtok,
                "multi_scale": pd_out.multi_scale_features, "mask_features": pd_out.mask_features}

    def region_vectors(self, side: dict, masks) -> torch.Tensor:
        S = self.cfg["sam"]["image_size"]
        P = self.cfg["region_sampler"]["num_points"]
        pts = []
        for m in masks:
            assert m.shape == tuple(side["image_hw"]), "visual prompt of the wrong size"
            _, padded = sam_prompt_mask(np.asarray(m, dtype=np.uint8), S)
            assert padded.any(), "empty visual prompt"
            pts.append(seg.region_points(padded, P))
        with torch.no_grad():
            return seg.region_vectors(side["seg"], pts, S)

    def llm_forward(self, embeds: torch.Tensor):
        """Full forward over embeds [T, D]: logits [T, V] and post-final-norm states [T, D]."""
        t = embeds.shape[0]
        with torch.no_grad():
            out = self.llm(inputs_embeds=embeds[None],
                           attention_mask=window_mask(t, self.cfg["llm"]["sliding_window"]),
                           position_ids=torch.arange(t)[None], use_cache=False, output_hidden_states=True)
        return out.logits[0], out.hidden_states[-1][0]

    # ------------------------------------------------------------------------------------------
    def run(self, image, task, classes=(), stuff=(), text=None, vprompts=(), vprompt_image=None, answer=None,
            forced=False, max_new_tokens=512, threshold=0.5) -> dict:
        cfg, tk = self.cfg, self.tokens
        image = np.asarray(image, dtype=np.uint8)
        h0, w0 = image.shape[:2]
        side = self.image_side(image)
        margins = {}
        q = question_for(task, classes, stuff, text, len(vprompts))
        if VARIANT == "referring_second_template" and task == "referring":
            q = f"Please segment <p>{text.strip().lower()}</p> in this image."
        ids = encode_chunks(self.tok, chat(q), bos=cfg["llm"]["bos_token_id"])
        if VARIANT == "no_bos":
            ids = ids[1:]
        if task in ("interactive", "vgd"):
            pside = self.image_side(np.asarray(vprompt_image, dtype=np.uint8)) if vprompt_image is not None else side
            regions = self.region_vectors(pside, vprompts)
        else:
            regions = torch.zeros(0, cfg["llm"]["hidden_size"])
        if forced or answer is not None:
            forced = True
            ans = DEFAULT_ANSWER if answer is None else answer
            ans_ids = self.tok.encode(ans + "<|end|>", add_special_tokens=False).ids
        # splice: <image> -> SigLIP tokens then SAM tokens; k-th <region> -> region vector k
        emb = self.llm.model.embed_tokens
        img_block = torch.cat([side["visual"], side["seg"]], 0)
        if VARIANT == "image_block_sam_first":
            img_block = torch.cat([side["seg"], side["visual"]], 0)

        def splice(id_list):
            rows, exp, r = [], [], 0
            for t in id_list:
                if t == IMAGE:
                    rows.append(img_block)
                    exp += [IMAGE] * img_block.shape[0]
                elif t == REGION:
                    rows.append(regions[r:r + 1])
                    exp.append(REGION)
                    r += 1
                else:
                    rows.append(emb.weight[t][None])
                    exp.append(t)
            assert r == regions.shape[0]
            return torch.cat(rows, 0), exp

        prompt_embeds, prompt_exp = splice(ids)
        if forced:
            out_ids = ans_ids
            embeds = torch.cat([prompt_embeds, emb.weight[ans_ids]], 0)
            fed = prompt_exp + ans_ids
            _, hidden = self.llm_forward(embeds)
        else:
            gen, gaps = [], []
            embeds = prompt_embeds
            while len(gen) < max_new_tokens:
                logits, _ = self.llm_forward(embeds)
                top = logits[-1].topk(2)
                gaps.append(float(top.values[0] - top.values[1]))
                nxt = int(top.indices[0])
                gen.append(nxt)
                if nxt == tk["end"]:
                    break
                embeds = torch.cat([embeds, emb.weight[nxt][None]], 0)
            margins["generation_min_top2_gap"] = min(gaps)
            out_ids = gen
            # every fed position: the prompt and the generated ids except the last (never fed back)
            fed = prompt_exp + gen[:-1]
            _, hidden = self.llm_forward(torch.cat([prompt_embeds, emb.weight[gen[:-1]]], 0)
                                         if len(gen) > 1 else prompt_embeds)
        assert hidden.shape[0] == len(fed)
        txt_ids = out_ids[:-1] if out_ids and out_ids[-1] == tk["end"] else out_ids
        result = {"task": task, "text": self.tok.decode(txt_ids, skip_special_tokens=False),
                  "token_ids": list(map(int, out_ids)), "image": {"width": int(w0), "height": int(h0)}, "masks": []}
        self.last_margins = margins
        if task not in SEG_TASKS:
            return result
        # §5.12: exactly one <SEG> in the answer (with a hidden state); referring / reasoning one phrase
        n_prompt = len(prompt_exp)
        seg_pos = [i for i in range(n_prompt, len(fed)) if fed[i] == tk["seg"]]
        if len(seg_pos) != 1 or (out_ids.count(tk["seg"]) != 1):
            margins["no_masks"] = f"{out_ids.count(tk['seg'])} <SEG> in the answer"
            return result
        sp = spans(fed, tk["phrase_start"], tk["phrase_end"])
        if task == "gcg":
            sp = [s for s in sp]  # prompt has none: the answer's spans in order (§5.10)
        if task in ("referring", "reasoning") and len(sp) != 1:
            margins["no_masks"] = f"{len(sp)} phrases"
            return result
        if not sp:
            margins["no_masks"] = "no phrases"
            return result
        with torch.no_grad():
            proj = self.seg.llm_projector(hidden)
            cond = torch.stack([proj[a:b + 1].mean(0) for a, b in sp])
            if VARIANT == "project_after_mean":
                cond = torch.stack([self.seg.llm_projector(hidden[a:b + 1].mean(0)) for a, b in sp])
            if VARIANT == "phrase_inner_tokens_only":
                cond = torch.stack([proj[a + 1:b].mean(0) for a, b in sp])
            seg_embed = proj[seg_pos[0]]
            if VARIANT == "seg_state_one_later":
                seg_embed = proj[seg_pos[0] + 1]
            out, _, sizes = seg.run_decoder(self.seg.segmentor.decoder, side["multi_scale"], side["mask_features"],
                                            seg_embed)
            table = torch.cat([cond, self.seg.bg_embeds.weight], 0)
            q_last = out.intermediate_hidden_states[-1][:, 0]
            cl = seg.class_logits(q_last, table, self.seg.segmentor.logit_scale)
            ml = out.masks_queries_logits[-1][0]
            # attention-mask decisions of every masked layer (prediction i decides layer i)
            n_layers = len(out.masks_queries_logits) - 1
            margins["attn_mask_min_abs_logit"] = min(
                seg.attention_keep(out.masks_queries_logits[i], sizes[i % 3])[1] for i in range(n_layers))
        post.CANVAS = cfg["sam"]["image_size"]  # the post-processing module's canvas = the SAM canvas
        scaled, img_hw = side["scaled"], (h0, w0)
        K = cl.shape[1] - 1
        if task in ("semantic", "instance", "panoptic"):
            names = [{"name": c.strip(), "kind": "thing"} for c in classes] + \
                    [{"name": c.strip(), "kind": "stuff"} for c in stuff]
            assert len(names) == K, (len(names), K)
            if task == "semantic":
                masks, m = post.pp_semantic(cl, ml, scaled, img_hw, names)
            elif task == "instance":
                masks, m = post.pp_instance(cl, ml, scaled, img_hw, names, threshold)
                flat = post.probs_no_bg(cl).flatten().sort(descending=True).values
                nq = cl.shape[0]
                m["topq_boundary_gap"] = float(flat[nq - 1] - flat[nq]) if flat.numel() > nq else None
            else:
                masks, m = post.pp_panoptic(cl, ml, scaled, img_hw, names, threshold)
        elif task == "vgd":
            names = [{"name": f"region {k + 1}", "kind": "thing"} for k in range(K)]
            masks, m = post.pp_instance(cl, ml, scaled, img_hw, names, threshold)
        elif task == "interactive":
            S = cfg["sam"]["image_size"]
            _, canvas = sam_prompt_mask(np.asarray(vprompts[0], dtype=np.uint8), S)
            masks, m = post.pp_interactive(cl, ml, scaled, img_hw, "region 1", threshold, canvas)
            m = {k: m[k] for k in ("min_score_threshold_gap", "iou_top2_gap")}
        elif task in ("referring", "reasoning"):
            masks, m = post.pp_referring(cl, ml, scaled, img_hw, text.strip())
            p = post.probs_no_bg(cl)[:, 0].sort(descending=True).values
            m["query_top2_gap"] = float(p[0] - p[1])
        elif task == "gcg":
            a_ids = [fed[a + 1:b] for a, b in sp]
            phrases = [self.tok.decode(x, skip_special_tokens=False).strip() for x in a_ids]
            masks, m = post.pp_gcg(cl, ml, scaled, img_hw, phrases)
            p = post.probs_no_bg(cl).sort(dim=0, descending=True).values
            m["query_top2_gap"] = float((p[0] - p[1]).min())
        # pixels whose final decision sits near its threshold (mask logit near 0)
        mp = post.masks_to_image(ml, scaled, img_hw)
        m["mask_logits_abs_lt_1e-3"] = int((mp.abs() < 1e-3).sum())
        margins.update(m)
        result["masks"] = [{"label": x["label"], "class_index": x["class_index"], "score": round(x["score"], 6),
                            "kind": x["kind"], "segment_id": x["segment_id"], "rle": post.rle_encode(x["mask"])}
                           for x in masks]
        return result
