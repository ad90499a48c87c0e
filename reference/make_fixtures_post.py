"""Reference for xsam's task post-processing: tests/fixtures/post/*.json.

Each task's post-processing is written here in PyTorch after X-SAM's official process fns
(github.com/wanghao9610/X-SAM, branch AAAI26_Archive, xsam/xsam/dataset/process_fns/postprocess_fns/
{genseg,refseg,gcgseg,intseg,vgdseg}_process_fn.py and dataset/utils/process.py), with the fixed
choices of xsam's interfaces.md §5 where the official code leaves an order unspecified or differs
(each marked CHOICE below). It runs them on seeded synthetic class / mask logits (Q = 10 queries,
16 x 16 mask grid, SAM canvas 64) and writes the inputs with the expected result masks (COCO
uncompressed RLE) per case.

    .venv-ref/bin/python reference/make_fixtures_post.py     # ~2 s, deterministic

Nothing is downloaded. Rust tests read the JSON; they never run Python.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common import setup_torch

OUT_DIR = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "post"
Q = 10
GRID = 16
CANVAS = 64


# ----------------------------------------------------------------------------------------------
# geometry


def sam_scaled_size(h: int, w: int, side: int = CANVAS) -> tuple[int, int]:
    """SAM longest-side resize: int(x * scale + 0.5)."""
    s = side / max(h, w)
    return int(h * s + 0.5), int(w * s + 0.5)


def to_canvas(mask_logits: torch.Tensor) -> torch.Tensor:
    """[N, h, w] -> [N, S, S] bilinear, align_corners=False (X-Segmentor.postprocess_masks_preds)."""
    return F.interpolate(mask_logits[None], size=(CANVAS, CANVAS), mode="bilinear", align_corners=False)[0]


def canvas_to_image(maps: torch.Tensor, scaled, image) -> torch.Tensor:
    """sem_seg_postprocess: crop [:, :newh, :neww], bilinear to (H0, W0)."""
    crop = maps[:, : scaled[0], : scaled[1]]
    return F.interpolate(crop[None], size=tuple(image), mode="bilinear", align_corners=False)[0]


def masks_to_image(mask_logits, scaled, image):
    return canvas_to_image(to_canvas(mask_logits), scaled, image)


def probs_no_bg(class_logits: torch.Tensor) -> torch.Tensor:
    return class_logits.softmax(-1)[:, :-1]


# ----------------------------------------------------------------------------------------------
# RLE (COCO uncompressed: column-major, first run counts zeros)


def rle_encode(mask: np.ndarray) -> dict:
    h, w = mask.shape
    flat = np.asarray(mask, dtype=bool).flatten(order="F")
    counts, prev, run = [], False, 0
    for v in flat:
        if bool(v) != prev:
            counts.append(run)
            run, prev = 0, bool(v)
        run += 1
    counts.append(run)
    return {"size": [h, w], "counts": counts}


def rle_decode(rle: dict) -> np.ndarray:
    h, w = rle["size"]
    flat = np.zeros(h * w, dtype=bool)
    pos, on = 0, False
    for c in rle["counts"]:
        if on:
            flat[pos : pos + c] = True
        pos += c
        on = not on
    assert pos == h * w
    return flat.reshape((w, h)).T


# ----------------------------------------------------------------------------------------------
# post-processing per task


def result(label, class_index, score, kind, segment_id, mask, **extra):
    return {
        "label": label,
        "class_index": int(class_index),
        "score": float(score),
        "kind": kind,
        "segment_id": int(segment_id),
        "mask": mask.cpu().numpy().astype(bool),
        **extra,
    }


def pp_semantic(cl, ml, scaled, image, classes):
    """genseg sem: einsum at canvas size, crop + resize the class maps, argmax.
    Score (interfaces.md §5.6, not in the official code): mean of the winning class's map over its pixels."""
    p = probs_no_bg(cl)
    seg = torch.einsum("qc,qhw->chw", p, to_canvas(ml).sigmoid())
    seg = canvas_to_image(seg, scaled, image)
    labels = seg.argmax(0)
    out = []
    for k in range(p.shape[1]):
        m = labels == k
        if m.any():
            score = seg[k][m].mean().item()
            out.append(result(classes[k]["name"], k, score, classes[k]["kind"], len(out) + 1, m))
    # margin: per-pixel top-1 / top-2 gap (a tie flips a pixel at most)
    top2 = seg.topk(2, dim=0).values if seg.shape[0] > 1 else None
    gap = (top2[0] - top2[1]).min().item() if top2 is not None else None
    return out, {"min_top2_gap": gap}


def instance_pairs(cl, ml, scaled, image):
    """top-Q (query, class) pairs; binary = logit > 0; score = p * mean sigmoid inside."""
    p = probs_no_bg(cl)
    nq, k = p.shape
    mp = masks_to_image(ml, scaled, image)
    flat = p.flatten()
    # CHOICE: deterministic top-Q by (prob desc, flat index asc) instead of topk(sorted=False).
    order = torch.sort(flat, descending=True, stable=True).indices[:nq]
    pairs = []
    for f in order.tolist():
        q, c = f // k, f % k
        logits = mp[q]
        binary = (logits > 0).float()
        mscore = (logits.sigmoid().flatten() * binary.flatten()).sum() / (binary.flatten().sum() + 1e-6)
        score = (flat[f] * mscore).item()
        pairs.append({"flat": f, "q": q, "c": c, "p": flat[f].item(), "score": score, "binary": binary > 0})
    return pairs


def pp_instance(cl, ml, scaled, image, classes, threshold):
    pairs = instance_pairs(cl, ml, scaled, image)
    kept = [x for x in pairs if x["binary"].any() and x["score"] >= threshold]
    # CHOICE (interfaces.md §5.7): score descending, ties by (query, class) index.
    kept.sort(key=lambda x: (-x["score"], x["flat"]))
    out = [
        result(classes[x["c"]]["name"], x["c"], x["score"], classes[x["c"]]["kind"], i + 1, x["binary"])
        for i, x in enumerate(kept)
    ]
    margin = min((abs(x["score"] - threshold) for x in pairs), default=None)
    empties = sum(1 for x in pairs if not x["binary"].any())
    return out, {"min_score_threshold_gap": margin, "empty_candidates": empties}


def pp_panoptic(cl, ml, scaled, image, classes, threshold):
    """genseg pan -> HF compute_segments (bg dropped before the max; area test on the score-weighted map)."""
    p = probs_no_bg(cl)
    mask_prob = masks_to_image(ml, scaled, image).sigmoid()
    score, label = p.max(-1)
    keep = score > threshold
    probs, scores, labels = mask_prob[keep], score[keep], label[keep]
    qidx = torch.arange(p.shape[0])[keep]
    if probs.shape[0] == 0:
        return [], {"kept": 0}
    probs = probs * scores.view(-1, 1, 1)
    lab = probs.argmax(0)
    segs, stuff_mem, ratios = [], {}, []
    for j in range(labels.shape[0]):
        c = labels[j].item()
        is_stuff = classes[c]["kind"] == "stuff"
        mk = lab == j
        area = mk.sum()
        orig = (probs[j] >= 0.5).sum()
        ok = area.item() > 0 and orig.item() > 0
        if ok:
            ratio = area / orig  # float32 true division, as in HF
            ratios.append(ratio.item())
            ok = ratio.item() > 0.8
        if not ok:
            continue
        if is_stuff and c in stuff_mem:
            seg = stuff_mem[c]
            seg["mask"] = seg["mask"] | mk
            seg["queries"].append(qidx[j].item())
        else:
            # CHOICE: a fresh id per segment in creation order (HF's counter can reuse an id after a merge).
            seg = {"c": c, "score": scores[j].item(), "mask": mk, "queries": [qidx[j].item()]}
            segs.append(seg)
            if is_stuff:
                stuff_mem[c] = seg
    out = [
        result(classes[s["c"]]["name"], s["c"], s["score"], classes[s["c"]]["kind"], i + 1, s["mask"], queries=s["queries"])
        for i, s in enumerate(segs)
    ]
    margin = min((abs(r - 0.8) for r in ratios), default=None)
    return out, {"kept": int(keep.sum()), "min_ratio_gap": margin, "min_keep_gap": (score - threshold).abs().min().item()}


def pp_referring(cl, ml, scaled, image, label):
    p = probs_no_bg(cl)
    assert p.shape[1] == 1
    top_score, top_index = p.max(dim=0)
    mp = masks_to_image(ml[top_index], scaled, image)
    m = mp[0].sigmoid() > 0.5
    return [result(label, 0, top_score.item(), "thing", 1, m, query=top_index.item())], {}


def pp_gcg(cl, ml, scaled, image, phrases):
    p = probs_no_bg(cl)
    h, w = image
    seg = torch.full((h, w), -1, dtype=torch.long)
    top_scores, top_idx = p.max(dim=0)
    for k in range(p.shape[1]):
        m = masks_to_image(ml[top_idx[k] : top_idx[k] + 1], scaled, image)[0].sigmoid() > 0.5
        seg[m] = k  # later phrases overwrite
    out = [
        result(phrases[k], k, top_scores[k].item(), "thing", k + 1, seg == k, query=top_idx[k].item())
        for k in range(p.shape[1])
    ]
    return out, {}


def boxes_of(masks: torch.Tensor) -> torch.Tensor:
    """detectron2 BitMasks.get_bounding_boxes: (x0, y0, x1 + 1, y1 + 1); zeros when empty."""
    boxes = torch.zeros(masks.shape[0], 4, dtype=torch.float32)
    x_any, y_any = masks.any(dim=1), masks.any(dim=2)
    for i in range(masks.shape[0]):
        x, y = torch.where(x_any[i])[0], torch.where(y_any[i])[0]
        if len(x) and len(y):
            boxes[i] = torch.tensor([x[0], y[0], x[-1] + 1, y[-1] + 1], dtype=torch.float32)
    return boxes


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """detectron2 pairwise_iou, [N, M]."""
    area = lambda t: (t[:, 2] - t[:, 0]) * (t[:, 3] - t[:, 1])
    wh = (torch.min(a[:, None, 2:], b[:, 2:]) - torch.max(a[:, None, :2], b[:, :2])).clamp(min=0)
    inter = wh.prod(dim=2)
    return torch.where(inter > 0, inter / (area(a)[:, None] + area(b) - inter), torch.zeros(1))


def pp_interactive(cl, ml, scaled, image, label, threshold, prompt_canvas):
    pairs = instance_pairs(cl, ml, scaled, image)
    # the prompt: crop to the scaled size, torch NEAREST to the image (sem_seg_postprocess mode="nearest")
    pm = torch.from_numpy(prompt_canvas.astype(np.float32))[None, : scaled[0], : scaled[1]]
    pm = F.interpolate(pm[None], size=tuple(image), mode="nearest")[0]
    pbox = boxes_of(pm > 0)
    scores = torch.tensor([x["score"] for x in pairs])
    # CHOICE (interfaces.md §5.8): candidates as for instance (non-empty, score >= threshold), else the
    # single best by (score desc, query asc); ordered by (score desc, query asc); first max IoU wins.
    cands = [x for x in pairs if x["binary"].any() and torch.tensor(x["score"]) >= torch.tensor(threshold)]
    if not cands:
        cands = [min(pairs, key=lambda x: (-x["score"], x["q"]))]
    cands.sort(key=lambda x: (-x["score"], x["q"]))
    iou = box_iou(boxes_of(torch.stack([x["binary"] for x in cands])), pbox)[:, 0]
    win = cands[int(iou.argmax())]
    ious = sorted(iou.tolist(), reverse=True)
    return [result(label, 0, win["score"], "thing", 1, win["binary"], query=win["q"])], {
        "candidates": [x["q"] for x in cands],
        "ious": iou.tolist(),
        "prompt_box": pbox[0].tolist(),
        "min_score_threshold_gap": (scores - threshold).abs().min().item(),
        "iou_top2_gap": (ious[0] - ious[1]) if len(ious) > 1 else None,
    }


# ----------------------------------------------------------------------------------------------
# synthetic logits


class Gen:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def blob(self, scaled, cy=None, cx=None, ry=None, rx=None, amp=None):
        """A [GRID, GRID] logit map: an ellipse of positive logits inside the image part of the canvas."""
        r = self.rng
        vh, vw = GRID * scaled[0] / CANVAS, GRID * scaled[1] / CANVAS
        cy = r.uniform(0.15, 0.85) * vh if cy is None else cy
        cx = r.uniform(0.15, 0.85) * vw if cx is None else cx
        ry = r.uniform(1.5, 0.45 * vh + 1.5) if ry is None else ry
        rx = r.uniform(1.5, 0.45 * vw + 1.5) if rx is None else rx
        amp = r.uniform(4.0, 9.0) if amp is None else amp
        yy, xx = np.mgrid[0:GRID, 0:GRID].astype(np.float64) + 0.5
        d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        return amp * (1.0 - d) + r.normal(0, 0.6, size=(GRID, GRID))

    def noise(self, scale=2.0):
        return self.rng.normal(0, scale, size=(GRID, GRID))

    def negative(self):
        return -3.0 - np.abs(self.rng.normal(0, 1, size=(GRID, GRID)))

    def class_row(self, k, cls=None, boost=None, bg=0.0):
        row = self.rng.normal(0, 1, size=k + 1)
        if cls is not None:
            row[cls] += self.rng.uniform(3.0, 9.0) if boost is None else boost
        row[k] += bg
        return row


def tensors(class_rows, mask_maps):
    cl = torch.tensor(np.array(class_rows), dtype=torch.float32)
    ml = torch.tensor(np.array(mask_maps), dtype=torch.float32)
    assert cl.shape[0] == Q and ml.shape == (Q, GRID, GRID)
    return cl, ml


def std_logits(g: Gen, scaled, k, n_noise=2, n_bgq=2):
    """Q queries: blobs with a peaked class, a few noise masks, a few bg-dominated queries."""
    rows, maps = [], []
    for q in range(Q):
        if q < Q - n_noise - n_bgq:
            rows.append(g.class_row(k, cls=int(g.rng.integers(0, k))))
            maps.append(g.blob(scaled))
        elif q < Q - n_bgq:
            rows.append(g.class_row(k, cls=int(g.rng.integers(0, k)), boost=g.rng.uniform(0, 4)))
            maps.append(g.noise())
        else:
            rows.append(g.class_row(k, bg=6.0))
            maps.append(g.blob(scaled))
    return rows, maps


# ----------------------------------------------------------------------------------------------
# cases


def geometry(image):
    return {"grid": [GRID, GRID], "canvas": CANVAS, "scaled": list(sam_scaled_size(*image)), "image": list(image)}


def classes_of(names, n_stuff=0):
    n = len(names)
    return [{"name": s, "kind": "stuff" if i >= n - n_stuff else "thing"} for i, s in enumerate(names)]


def build_cases():
    cases = {t: [] for t in ["semantic", "instance", "panoptic", "referring", "gcg", "interactive"]}

    def add(task, name, image, cl, ml, outputs, checks, **params):
        geo = geometry(image)
        case = {"name": name, "task": task, **geo, "num_queries": Q, **params}
        case["class_logits"] = cl.flatten().tolist()
        case["mask_logits"] = ml.flatten().tolist()
        case["expected"] = [
            {**{k: v for k, v in r.items() if k != "mask"}, "score_rounded": F64(round(r["score"], 6)), "rle": rle_encode(r["mask"])}
            for r in outputs
        ]
        for r, e in zip(outputs, case["expected"]):
            assert (rle_decode(e["rle"]) == r["mask"]).all()
        case["checks"] = checks
        cases[task].append(case)

    # --- semantic
    for name, image, names, n_stuff, seed in [
        ("sem_a", (150, 97), ["person", "dog", "tree", "sky"], 0, 1),
        ("sem_c", (71, 123), ["car", "road", "building", "grass", "sky"], 2, 2),
    ]:
        g = Gen(seed)
        scaled = sam_scaled_size(*image)
        rows, maps = std_logits(g, scaled, len(names))
        cl, ml = tensors(rows, maps)
        cls = classes_of(names, n_stuff)
        out, chk = pp_semantic(cl, ml, scaled, image, cls)
        add("semantic", name, image, cl, ml, out, chk, classes=cls)

    # --- instance / vgd
    def inst(name, image, names, seed, threshold, n_stuff=0, task_label=None, tweak=None):
        g = Gen(seed)
        scaled = sam_scaled_size(*image)
        rows, maps = std_logits(g, scaled, len(names))
        if tweak:
            tweak(g, rows, maps, len(names))
        cl, ml = tensors(rows, maps)
        cls = classes_of(names, n_stuff)
        out, chk = pp_instance(cl, ml, scaled, image, cls, threshold)
        add("instance", name, image, cl, ml, out, chk, classes=cls, threshold=threshold, variant=task_label or "instance")
        return out, chk

    def empty_query(g, rows, maps, k):
        # a confident query whose mask is empty everywhere: dropped although p is high
        rows[0] = g.class_row(k, cls=1, boost=12.0)
        maps[0] = g.negative()

    out, chk = inst("ins_a", (150, 97), ["person", "dog", "cat"], 11, 0.5)
    assert len(out) >= 2, out
    out, chk = inst("ins_b_empty", (77, 123), ["a", "b", "c", "d", "e"], 12, 0.3, tweak=empty_query)
    assert chk["empty_candidates"] >= 1 and len(out) >= 1
    out, chk = inst("ins_c_thr0", (71, 123), ["person", "car", "road", "sky"], 13, 0.0, n_stuff=2)
    assert len(out) >= 5
    out, chk = inst("ins_d_none", (45, 30), ["person", "dog", "cat"], 14, 0.99)
    assert out == []
    out, chk = inst("vgd_b", (77, 123), ["region 1", "region 2"], 15, 0.5, task_label="vgd")
    assert len(out) >= 1

    # --- panoptic
    def pan(name, image, names, n_stuff, seed, threshold, tweak=None):
        g = Gen(seed)
        scaled = sam_scaled_size(*image)
        k = len(names)
        vh, vw = GRID * scaled[0] / CANVAS, GRID * scaled[1] / CANVAS
        rows, maps = [], []
        # blobs around a 3 x 3 grid of spots (some overlap), classes cycling; the last query is noise
        for q in range(Q):
            cy, cx = (0.2 + 0.3 * (q % 3)) * vh, (0.2 + 0.3 * ((q // 3) % 3)) * vw
            cy, cx = cy + g.rng.normal(0, 0.05 * vh), cx + g.rng.normal(0, 0.05 * vw)
            rows.append(g.class_row(k, cls=q % k, boost=g.rng.uniform(2.0, 9.0)))
            maps.append(g.blob(scaled, cy=cy, cx=cx, ry=g.rng.uniform(0.12, 0.22) * vh, rx=g.rng.uniform(0.12, 0.22) * vw))
        maps[Q - 1] = g.noise()
        if tweak:
            tweak(g, rows, maps, k, scaled)
        cl, ml = tensors(rows, maps)
        cls = classes_of(names, n_stuff)
        out, chk = pp_panoptic(cl, ml, scaled, image, cls, threshold)
        add("panoptic", name, image, cl, ml, out, chk, classes=cls, threshold=threshold)
        return out, chk

    def two_stuff(g, rows, maps, k, scaled):
        # two separated confident queries of the same stuff class (k - 1): merged into one segment
        vh, vw = GRID * scaled[0] / CANVAS, GRID * scaled[1] / CANVAS
        rows[2] = g.class_row(k, cls=k - 1, boost=10.0)
        maps[2] = g.blob(scaled, cy=0.25 * vh, cx=0.25 * vw, ry=0.2 * vh, rx=0.2 * vw, amp=8.0)
        rows[3] = g.class_row(k, cls=k - 1, boost=10.0)
        maps[3] = g.blob(scaled, cy=0.75 * vh, cx=0.75 * vw, ry=0.2 * vh, rx=0.2 * vw, amp=8.0)

    out, chk = pan("pan_a", (150, 97), ["person", "dog", "cat", "grass", "sky"], 2, 21, 0.5, two_stuff)
    assert any(len(s["queries"]) > 1 for s in out), [s["queries"] for s in out]
    assert any(s["kind"] == "stuff" for s in out) and any(s["kind"] == "thing" for s in out), [(s["kind"], s["queries"], chk) for s in out]
    out, chk = pan("pan_b_thr0", (77, 123), ["car", "person", "road", "building"], 2, 22, 0.0, two_stuff)
    assert len(out) >= 3
    def weak(g, rows, maps, k, scaled):
        for q in range(Q):
            rows[q] = g.class_row(k, cls=q % k, boost=g.rng.uniform(0.0, 1.0))

    out, chk = pan("pan_d_none", (45, 30), ["a", "b", "c"], 1, 23, 0.9, weak)
    assert out == [], (out, chk)

    # --- referring / reasoning
    for name, image, seed, label, empty in [
        ("ref_a", (150, 97), 31, "the dog on the left", False),
        ("ref_c", (71, 123), 32, "the man wearing a red hat", False),
        ("rea_b_empty", (77, 123), 33, "What keeps the food cold?", True),
    ]:
        g = Gen(seed)
        scaled = sam_scaled_size(*image)
        rows, maps = std_logits(g, scaled, 1)
        if empty:
            rows[4] = g.class_row(1, cls=0, boost=14.0)
            maps[4] = g.negative()
        cl, ml = tensors(rows, maps)
        out, chk = pp_referring(cl, ml, scaled, image, label)
        if empty:
            assert not out[0]["mask"].any()
        else:
            assert out[0]["mask"].any()
        add("referring", name, image, cl, ml, out, chk, label=label, variant="reasoning" if name.startswith("rea") else "referring")

    # --- gcg
    def gcg_case(name, image, phrases, seed, same_query=False):
        g = Gen(seed)
        scaled = sam_scaled_size(*image)
        k = len(phrases)
        vh, vw = GRID * scaled[0] / CANVAS, GRID * scaled[1] / CANVAS
        rows, maps = std_logits(g, scaled, k)
        # phrase j is best matched by query j; overlapping blobs
        for j in range(k):
            rows[j] = g.class_row(k, cls=j, boost=10.0)
            maps[j] = g.blob(scaled, cy=(0.35 + 0.15 * j) * vh, cx=(0.3 + 0.2 * j) * vw, ry=0.3 * vh, rx=0.3 * vw, amp=7.0)
        if same_query:
            # the first and last phrases both peak on query 0: the last one takes its whole mask
            for q in range(1, Q):
                if q != 1:
                    rows[q] = g.class_row(k, cls=1, boost=g.rng.uniform(0.0, 4.0), bg=2.0)
            rows[0] = g.class_row(k)
            rows[0][0] = rows[0][k - 1] = 8.0
        cl, ml = tensors(rows, maps)
        out, chk = pp_gcg(cl, ml, scaled, image, phrases)
        add("gcg", name, image, cl, ml, out, chk, phrases=phrases)
        return out

    out = gcg_case("gcg_a_overlap", (150, 97), ["a man", "a brown dog", "the grass"], 41)
    assert all(o["mask"].any() for o in out)
    out = gcg_case("gcg_b_same_query", (77, 123), ["a car", "the road", "a tree"], 42, same_query=True)
    assert out[0]["query"] == out[2]["query"] and not out[0]["mask"].any()

    # --- interactive
    def int_case(name, image, seed, threshold, target, tie=False):
        g = Gen(seed)
        scaled = sam_scaled_size(*image)
        vh, vw = GRID * scaled[0] / CANVAS, GRID * scaled[1] / CANVAS
        rows, maps = [], []
        spots = [(0.3, 0.3), (0.7, 0.7), (0.3, 0.7), (0.7, 0.3), (0.5, 0.5)]
        for q in range(Q):
            cy, cx = spots[q % len(spots)]
            rows.append(g.class_row(1, cls=0, boost=g.rng.uniform(1.0, 6.0)))
            maps.append(g.blob(scaled, cy=cy * vh, cx=cx * vw, ry=(0.12 + 0.04 * (q // 5)) * vh, rx=0.15 * vw))
        if tie:
            # query 6 copies query 1's mask with a lower class score: same box, query 1 must win
            maps[6] = maps[1].copy()
            rows[6] = rows[1].copy()
            rows[6][0] -= 0.5
        # the prompt: a box around the target spot, at the scaled size, zero-padded to the canvas
        cy, cx = spots[target]
        prompt = np.zeros((CANVAS, CANVAS), dtype=np.uint8)
        y0, y1 = int((cy - 0.1) * scaled[0]), int((cy + 0.1) * scaled[0])
        x0, x1 = int((cx - 0.1) * scaled[1]), int((cx + 0.1) * scaled[1])
        prompt[y0:y1, x0:x1] = 1
        cl, ml = tensors(rows, maps)
        out, chk = pp_interactive(cl, ml, scaled, image, "region 1", threshold, prompt)
        add("interactive", name, image, cl, ml, out, chk, label="region 1", threshold=threshold, prompt=rle_encode(prompt))
        return out, chk

    out, chk = int_case("int_a", (150, 97), 51, 0.5, target=2)
    assert len(chk["candidates"]) >= 2
    out, chk = int_case("int_b_fallback", (77, 123), 52, 0.999, target=1)
    assert len(chk["candidates"]) == 1
    out, chk = int_case("int_c_tie", (71, 123), 53, 0.3, target=1, tie=True)
    assert out[0]["query"] == 1 and 6 in chk["candidates"], chk
    return cases


# ----------------------------------------------------------------------------------------------
# output


class F64(float):
    """A float written as a double (shortest repr), not narrowed to float32."""


def dumps(obj) -> str:
    """JSON with floats as the shortest text that round-trips their float32 value (F64: the double)."""
    if isinstance(obj, F64):
        return repr(float(obj))
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {dumps(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, (list, tuple)):
        return "[" + ", ".join(dumps(v) for v in obj) + "]"
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return json.dumps(obj)
    if isinstance(obj, (int, np.integer)):
        return str(int(obj))
    if isinstance(obj, float):
        f = np.float32(obj)
        for digits in range(6, 10):
            s = f"{float(f):.{digits}g}"
            if np.float32(float(s)) == f:
                return s
        return f"{float(f):.9g}"
    raise TypeError(type(obj))


def main():
    setup_torch()
    torch.manual_seed(0)
    cases = build_cases()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    meta = {
        "generator": "reference/make_fixtures_post.py",
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
    }
    total = 0
    for task, cs in cases.items():
        path = OUT_DIR / f"{task}.json"
        text = dumps({**meta, "task": task, "cases": cs}) + "\n"
        path.write_text(text)
        total += len(text)
        for c in cs:
            print(f"{task:12s} {c['name']:18s} image {c['image']} scaled {c['scaled']} masks {len(c['expected'])} checks {c['checks']}")
    print(f"wrote {OUT_DIR} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
