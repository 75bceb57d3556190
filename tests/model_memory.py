"""Peak memory of one job on a Llama-shaped Hugging Face model, measured in a process of its own.

    python tests/model_memory.py {forward|scan_model|scan_model_recompute|eager} N [LAYERS]
    python tests/model_memory.py {razor|razor_eager} PERIOD [LAYERS]

prints JSON: the growth of peak resident memory (bytes) over the resident memory just before the
job, and its time. The razor modes score RazorAttention's probe (BOS + PERIOD random tokens x 4,
echo = duplicate_token and induction heads on the repeats) through scan_model, or the way the
method itself does it: eager attention, each layer's full pattern scored as it is made (a forward
hook), and add the scores (``"scores"``) so the two can be compared. The peak is reset first (writing 5 to /proc/self/clear_refs resets VmHWM, the
kernel's record of peak RSS, to the current RSS), so building the model does not count.
Used by tests/test_models_memory.py and benches/bench_models.py.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import induct_fast as inf
from peak_memory import measure


def llama_shaped(layers: int = 4, attn: str = "sdpa") -> LlamaForCausalLM:
    """4 layers, d_model 256, 8 heads of 32, 2 kv heads (the shape of the live-models issue)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=layers, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=65536, attn_implementation=attn,
    )
    return LlamaForCausalLM(config).eval()


def main() -> None:
    mode, n = sys.argv[1], int(sys.argv[2])
    layers = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    model = llama_shaped(layers, "eager" if mode in ("eager", "razor_eager") else "sdpa")
    if mode.startswith("razor"):
        return razor(model, mode, n)
    ids = torch.as_tensor(np.random.default_rng(0).integers(1, 1024, size=(1, n)))
    if mode == "forward":
        def job(ids):
            with torch.no_grad():
                model(ids, use_cache=False)
    elif mode == "scan_model":
        def job(ids):
            inf.scan_model(model, ids)
    elif mode == "scan_model_recompute":  # every row's normaliser recomputed by the fused kernel
        def job(ids):
            inf.scan_model(model, ids, via="recompute")
    elif mode == "eager":  # the route without us: every pattern materialised, then scan
        def job(ids):
            with torch.no_grad():
                out = model(ids, use_cache=False, output_attentions=True)
            inf.scan(out, ids)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    job(ids[:, :64])  # warm up: first-call costs (imports, thread pools, torch's kernels) are not timed
    print(json.dumps(measure(job, ids)))


RAZOR_KINDS = ("duplicate_token", "induction")


def razor(model: LlamaForCausalLM, mode: str, period: int) -> None:
    probe = inf.probes.repeated(1, period, 4, 1024, seed=0)
    small = inf.probes.repeated(1, 8, 4, 1024, seed=0)
    scores: dict = {}
    if mode == "razor":
        def job(p):
            scores.update(inf.scan_model(model, p.tokens, kinds=RAZOR_KINDS, queries=p.queries, keys=p.keys).per_prompt)
    else:
        def job(p):
            per_layer = []

            def score_layer(module, args, output):  # output[1]: this layer's [batch, head, n, n] pattern
                per_layer.append(inf.head_scores(output[1], p.tokens, kinds=RAZOR_KINDS, queries=p.queries, keys=p.keys))
                return (output[0], None)  # the pattern is dropped here, as the method drops it

            hooks = [layer.self_attn.register_forward_hook(score_layer) for layer in model.model.layers]
            try:
                with torch.no_grad():
                    model(torch.as_tensor(p.tokens), use_cache=False)
            finally:
                for hook in hooks:
                    hook.remove()
            scores.update({k: np.stack([s[k] for s in per_layer], axis=1) for k in RAZOR_KINDS})
    job(small)  # warm up
    result = measure(job, probe)
    result["scores"] = {k: np.asarray(v).tolist() for k, v in scores.items()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
