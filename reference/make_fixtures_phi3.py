"""Fixtures for the Phi-3 LLM: prefill logits / post-final-norm hidden states and 32 greedy steps.

Writes tests/fixtures/phi3_tiny.safetensors (+ .json sidecar): weights under the X-SAM names (`llm.*`) and three
cases (a: 20 ids, shorter than the window; b: 100 ids, crossing the window; c: ids with injected embedding vectors,
crossing the window).

Sliding window: a query at position i attends to key j iff 0 <= i - j < sliding_window (interfaces.md section 2).
Every forward pass here passes that mask explicitly as a 4-D float attention mask (0 / finfo(f32).min), so the
fixtures follow interfaces.md whatever transformers does; the script also checks that transformers' own eager mask
and its sliding-window KV cache give the same numbers (they do in 4.57.1, see README).

Run: .venv-ref/bin/python reference/make_fixtures_phi3.py   (from the repo root)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from transformers import Phi3Config, Phi3ForCausalLM
from transformers.cache_utils import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import perturb_module_params, rel_err, setup_torch, write_fixture  # noqa: E402

LLM = dict(
    vocab_size=32014, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256,
    sliding_window=48, bos_token_id=1,
)
SEED = 3001
N_STEPS = 32
IMAGE_PLACEHOLDER, REGION_PLACEHOLDER = -200, -300
SEG, P_OPEN, P_CLOSE, END = 32011, 32012, 32013, 32007
# bf16 storage for the two vocab-sized matrices (values are bf16-exact, the model runs in f32)
BF16_TENSORS = ("llm.model.embed_tokens.weight", "llm.lm_head.weight")
MIN_MARGIN = 1e-2  # smallest allowed top1 - top2 logit gap at any greedy step
# text-id seeds per case, picked once so that every greedy step clears MIN_MARGIN (asserted at run time)
CASE_SEEDS = {"case_a": 3101, "case_b": 3142, "case_c": 3113}


def build_model():
    cfg = Phi3Config(
        **LLM, original_max_position_embeddings=LLM["max_position_embeddings"], tie_word_embeddings=False,
        eos_token_id=32000, pad_token_id=32000, hidden_act="silu", rope_scaling=None, partial_rotary_factor=1.0,
        attention_dropout=0.0, resid_pdrop=0.0, embd_pdrop=0.0, attn_implementation="eager",
    )
    torch.manual_seed(SEED)
    model = Phi3ForCausalLM(cfg).eval().float().requires_grad_(False)
    assert model.config._attn_implementation == "eager"
    D = LLM["hidden_size"]

    def overrides(name, p, gen):
        if name == "model.embed_tokens.weight":
            return torch.randn(p.shape, generator=gen).to(torch.bfloat16).float()
        if name == "lm_head.weight":
            return (0.25 * torch.randn(p.shape, generator=gen)).to(torch.bfloat16).float()
        return None

    perturb_module_params(model, SEED, overrides)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert model.model.embed_tokens.weight.shape == (LLM["vocab_size"], D)
    return cfg, model


def expected_names() -> set:
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(LLM["num_hidden_layers"]):
        for m in ("input_layernorm", "post_attention_layernorm", "self_attn.qkv_proj", "self_attn.o_proj",
                  "mlp.gate_up_proj", "mlp.down_proj"):
            names.add(f"model.layers.{i}.{m}.weight")
    return names


def window_mask(t: int, w: int) -> torch.Tensor:
    """[1,1,t,t] float mask: 0 where 0 <= i - j < w, finfo(f32).min elsewhere."""
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    allowed = (i - j >= 0) & (i - j < w)
    m = torch.zeros(t, t, dtype=torch.float32)
    m[~allowed] = torch.finfo(torch.float32).min
    return m[None, None]


def forward_full(model, embeds: torch.Tensor, explicit_mask: bool = True):
    """Full recompute over embeds [1,T,D]: returns logits [T,V], post-final-norm hidden [T,D], hidden tuple."""
    t = embeds.shape[1]
    out = model(
        inputs_embeds=embeds,
        attention_mask=window_mask(t, LLM["sliding_window"]) if explicit_mask else None,
        position_ids=torch.arange(t)[None],
        use_cache=False,
        output_hidden_states=True,
    )
    return out.logits[0], out.hidden_states[-1][0], out.hidden_states


def spec_phi3(sd: dict, embeds: torch.Tensor):
    """Independent float64 implementation from xsam-architecture.md section 6 + interfaces.md window rule."""
    sd = {k: v.double() for k, v in sd.items()}
    D, nh, I, W = LLM["hidden_size"], LLM["num_attention_heads"], LLM["intermediate_size"], LLM["sliding_window"]
    hd = D // nh
    eps = LLM["rms_norm_eps"]
    x = embeds[0].double()
    T = x.shape[0]

    def rms(t, w):
        return t * torch.rsqrt((t * t).mean(-1, keepdim=True) + eps) * w

    inv = 1.0 / (LLM["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(t):  # t [nh, T, hd], rotate-half
        rot = torch.cat([-t[..., hd // 2:], t[..., : hd // 2]], -1)
        return t * cos + rot * sin

    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    allowed = (i - j >= 0) & (i - j < W)
    for layer in range(LLM["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        qkv = h @ sd[p + "self_attn.qkv_proj.weight"].T  # rows [q | k | v]
        q, k, v = (qkv[:, s * D:(s + 1) * D].reshape(T, nh, hd).transpose(0, 1) for s in range(3))
        q, k = rope(q), rope(k)
        logits = (q @ k.transpose(-1, -2)) / np.sqrt(hd)
        logits = logits.masked_fill(~allowed, float("-inf"))
        a = torch.softmax(logits, -1) @ v
        x = x + a.transpose(0, 1).reshape(T, D) @ sd[p + "self_attn.o_proj.weight"].T
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        gu = h @ sd[p + "mlp.gate_up_proj.weight"].T  # rows [gate | up]
        x = x + (F.silu(gu[:, :I]) * gu[:, I:]) @ sd[p + "mlp.down_proj.weight"].T
    hidden = rms(x, sd["model.norm.weight"])
    return hidden @ sd["lm_head.weight"].T, hidden


def hf_cached_decode(model, prompt_embeds: torch.Tensor, n_steps: int):
    """transformers' own path: default masks + DynamicCache (sliding-window layers), one token per step."""
    cache = DynamicCache(config=model.config)
    emb = model.model.embed_tokens
    out = model(inputs_embeds=prompt_embeds, past_key_values=cache, use_cache=True, output_hidden_states=True)
    ids, hiddens = [], [out.hidden_states[-1][0]]
    nxt = int(out.logits[0, -1].argmax())
    ids.append(nxt)
    for _ in range(n_steps - 1):
        out = model(inputs_embeds=emb(torch.tensor([[nxt]])), past_key_values=cache, use_cache=True,
                    output_hidden_states=True)
        hiddens.append(out.hidden_states[-1][0])
        nxt = int(out.logits[0, -1].argmax())
        ids.append(nxt)
    return ids, torch.cat(hiddens, 0)


def run_case(model, sd, name: str, ids: np.ndarray, injected: dict, report: dict, tensors: dict) -> dict:
    """ids: prompt ids with IMAGE/REGION placeholders at injected positions; injected: pos -> vector [D]."""
    emb = model.model.embed_tokens
    L = len(ids)
    with torch.no_grad():
        safe = torch.tensor(np.where(ids < 0, 0, ids))[None]
        prompt = emb(safe).clone()
        for pos, vec in injected.items():
            assert ids[pos] < 0
            prompt[0, pos] = vec
        # greedy loop: full recompute with the explicit interfaces.md window mask at every step
        seq = prompt
        gen, margins, top2 = [], [], []
        last_logits = None
        for step in range(N_STEPS):
            logits, hidden, _ = forward_full(model, seq)
            if step == 0:
                last_logits = logits[-1].clone()
                prefill_logits, prefill_hidden = logits.clone(), hidden.clone()
            v, ix = logits[-1].topk(2)
            nxt = int(ix[0])
            gen.append(nxt)
            margins.append(float(v[0] - v[1]))
            top2.append([float(v[0]), float(v[1])])
            if step + 1 < N_STEPS:
                seq = torch.cat([seq, emb(torch.tensor([[nxt]]))], 1)
        # `seq` now holds prompt + g0..g30 (L + 31 positions); `hidden` is their post-final-norm states
        full_hidden = hidden.clone()
        T = seq.shape[1]
        assert T == L + N_STEPS - 1 and full_hidden.shape == (T, LLM["hidden_size"])
        assert torch.equal(full_hidden[:L], prefill_hidden) or rel_err(full_hidden[:L], prefill_hidden) < 1e-6

        # checks -------------------------------------------------------------------------------
        chk = {}
        # (1) hidden_states[-1] is the post-final-norm state (the tensor fed to lm_head)
        lg, hs_last, hs_all = forward_full(model, prompt)
        chk["hs_last_is_post_norm_rel_err"] = rel_err(hs_last @ model.lm_head.weight.T, lg)
        assert len(hs_all) == LLM["num_hidden_layers"] + 1
        captured = {}
        hook = model.model.layers[-1].register_forward_hook(lambda m, a, o: captured.setdefault("x", o[0] if isinstance(o, tuple) else o))
        forward_full(model, prompt)
        hook.remove()
        chk["hs_last_equals_norm_of_last_layer"] = bool(torch.equal(model.model.norm(captured["x"])[0], hs_last))
        assert chk["hs_last_equals_norm_of_last_layer"] and chk["hs_last_is_post_norm_rel_err"] < 1e-6
        # (2) transformers' own default mask (attention_mask=None) gives the same prefill
        lg_default, hid_default, _ = forward_full(model, seq, explicit_mask=False)
        lg_explicit, hid_explicit, _ = forward_full(model, seq, explicit_mask=True)
        chk["hf_default_mask_vs_explicit_rel_err"] = rel_err(hid_default, hid_explicit)
        chk["hf_default_mask_bitwise_equal"] = bool(torch.equal(hid_default, hid_explicit))
        assert chk["hf_default_mask_vs_explicit_rel_err"] < 1e-6
        # (3) transformers' KV-cache decode (sliding-window cache layers) gives the same ids and states
        c_ids, c_hidden = hf_cached_decode(model, prompt, N_STEPS)
        chk["hf_cached_decode_same_ids"] = c_ids == gen
        chk["hf_cached_decode_hidden_rel_err"] = rel_err(c_hidden, full_hidden)
        assert chk["hf_cached_decode_same_ids"] and chk["hf_cached_decode_hidden_rel_err"] < 1e-5
        # (4) independent float64 implementation: same greedy ids, small error, safe margins
        ref_logits, ref_hidden = spec_phi3(sd, seq)
        chk["f32_vs_spec_f64_hidden_rel_err"] = rel_err(full_hidden, ref_hidden)
        chk["f32_vs_spec_f64_last_logits_rel_err"] = rel_err(last_logits, ref_logits[L - 1])
        ref_next = ref_logits[L - 1:].argmax(-1).tolist()
        chk["spec_f64_same_greedy_ids"] = ref_next == gen[: len(ref_next)]
        assert chk["spec_f64_same_greedy_ids"], (ref_next, gen)
        assert chk["f32_vs_spec_f64_hidden_rel_err"] < 1e-5
        chk["min_greedy_margin"] = min(margins)
        assert min(margins) >= MIN_MARGIN, (name, margins)
        # (5) the window matters for this case iff the fed length exceeds it: compare against no window
        nowin = model(inputs_embeds=seq, attention_mask=window_mask(T, 10**6), use_cache=False,
                      output_hidden_states=True).hidden_states[-1][0]
        chk["crosses_window"] = T > LLM["sliding_window"]
        chk["rel_diff_vs_no_window"] = rel_err(nowin, full_hidden)

    report[name] = chk
    pre = f"{name}."
    tensors[pre + "input_ids"] = torch.tensor(ids, dtype=torch.int64)
    tensors[pre + "inputs_embeds"] = prompt[0]
    tensors[pre + "last_logits"] = last_logits
    tensors[pre + "prefill_argmax"] = prefill_logits.argmax(-1).to(torch.int64)
    tensors[pre + "prefill_final_hidden"] = prefill_hidden
    tensors[pre + "generated_ids"] = torch.tensor(gen, dtype=torch.int64)
    tensors[pre + "greedy_top2_logits"] = torch.tensor(top2, dtype=torch.float32)
    tensors[pre + "full_ids"] = torch.tensor(list(ids) + gen[:-1], dtype=torch.int64)
    tensors[pre + "final_hidden"] = full_hidden
    if injected:
        pos = sorted(injected)
        tensors[pre + "injected_positions"] = torch.tensor(pos, dtype=torch.int64)
        tensors[pre + "injected_vectors"] = torch.stack([injected[p] for p in pos])
    return {"key_prefix": pre, "prompt_len": L, "fed_len": L + N_STEPS - 1, "n_steps": N_STEPS,
            "injected_positions": sorted(injected), "generated_ids": gen, "checks": chk}


def main() -> None:
    setup_torch()
    cfg, model = build_model()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert set(sd) == expected_names(), sorted(set(sd) ^ expected_names())
    V = LLM["vocab_size"]

    def text_ids(n):  # ordinary (SentencePiece-range) ids from the current case's stream
        return rng.integers(2, 32000, size=n).astype(np.int64)

    cases, report, tensors = [], {}, {}
    rng = np.random.default_rng(CASE_SEEDS["case_a"])
    # (a) 20 ids, shorter than the window: BOS, text, a <p> ... </p> span, <SEG>, text
    a = np.concatenate([[1], text_ids(8), [P_OPEN], text_ids(3), [P_CLOSE], text_ids(2), [SEG], text_ids(3)])
    assert len(a) == 20
    rng = np.random.default_rng(CASE_SEEDS["case_b"])
    # (b) 100 ids crossing the window (48), with special ids in the middle and near the end
    b = np.concatenate([[1], text_ids(60), [32010, P_OPEN], text_ids(4), [P_CLOSE], text_ids(20), [SEG, END],
                        text_ids(10)])
    assert len(b) == 100
    rng = np.random.default_rng(CASE_SEEDS["case_c"])
    # (c) injected vectors: an "image block" at positions 3..18 (16 vectors) and a region vector inside <p> ... </p>
    #     at position 41, prompt of 64 positions (crosses the window)
    c = np.concatenate([[1], text_ids(2), np.full(16, IMAGE_PLACEHOLDER), text_ids(21), [P_OPEN, REGION_PLACEHOLDER,
                        P_CLOSE], text_ids(18), [SEG], text_ids(2)])
    assert len(c) == 64 and c[41] == REGION_PLACEHOLDER and c[3] == IMAGE_PLACEHOLDER and c[18] == IMAGE_PLACEHOLDER
    gen_inj = torch.Generator().manual_seed(SEED + 7)
    injected = {int(p): torch.randn(LLM["hidden_size"], generator=gen_inj) for p in np.nonzero(c < 0)[0]}
    cases.append(run_case(model, sd, "case_a", a, {}, report, tensors))
    cases.append(run_case(model, sd, "case_b", b, {}, report, tensors))
    cases.append(run_case(model, sd, "case_c", c, injected, report, tensors))
    assert max(int(x) for x in np.concatenate([a, b])) < V

    for k, v in sd.items():
        name = f"llm.{k}"
        tensors[name] = v.to(torch.bfloat16) if name in BF16_TENSORS else v
        if name in BF16_TENSORS:
            assert torch.equal(tensors[name].float(), v)  # bf16-exact values
    import PIL
    import safetensors

    meta = {
        "kind": "phi3_llm",
        "config": {"model_type": "xsam", "llm": dict(LLM)},
        "hf_only_config": {"tie_word_embeddings": False, "hidden_act": "silu", "rope_scaling": None,
                           "partial_rotary_factor": 1.0, "eos_token_id": 32000, "pad_token_id": 32000,
                           "attn_implementation": "eager"},
        "weight_seed": SEED,
        "weights_prefix": "llm.",
        "bf16_tensors": list(BF16_TENSORS),
        "window_rule": "query i attends key j iff 0 <= i - j < sliding_window (explicit 4-D mask in every forward)",
        "placeholders": {"image": IMAGE_PLACEHOLDER, "region": REGION_PLACEHOLDER},
        "cases": cases,
        "notes": "input_ids: prompt ids, injected positions hold -200 (image) / -300 (region); inputs_embeds [L,D] = "
                 "embed_tokens(ids) with injected rows replaced. last_logits [V]: logits of the last prompt position. "
                 "prefill_final_hidden [L,D]: post-final-norm states of the prompt. generated_ids [32]: greedy. "
                 "full_ids [L+31] = prompt + generated_ids[:31] (every fed position); final_hidden [L+31,D] = "
                 "post-final-norm states of every fed position (the generated token j is fed at position L+j; the "
                 "last generated id is never fed). greedy_top2_logits [32,2]: top-1 and top-2 logit values at each "
                 "greedy step. prefill_argmax [L]: argmax of the logits at each prompt position.",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "numpy": np.__version__, "pillow": PIL.__version__, "safetensors": safetensors.__version__},
    }
    write_fixture("phi3_tiny", tensors, meta)
    for k, v in report.items():
        print(k, v)
    print("ok")


if __name__ == "__main__":
    main()
