"""Find the induction circuit of the hand-built demo model, the way you would in a real model.

1. Run the model on repeated random tokens and score every head from its attention patterns.
2. Confirm the two heads from the weights alone: K-composition between them against the random
   baseline, and the copying score of the induction head's OV circuit.
3. Measure the in-context learning it buys: per-token loss on the first vs the repeated half.

It uses the same model, tokens, baseline and loss windows as `induct-fast demo`, so the two
print the same numbers (tests/test_examples.py checks it).

Run:  python examples/find_induction_heads.py
"""

import numpy as np

import induct_fast as ift
from induct_fast.demo import block_losses, build_demo_model

SEED, PERIOD = 0, 18
model = build_demo_model(seed=SEED)
tokens = ift.repeated_tokens(batch=8, period=PERIOD, vocab_size=model.vocab_size, seed=SEED)
logits, patterns = model.run(tokens)  # patterns: [batch, layer, head, n, n]

scores = ift.scan(patterns, tokens)  # a HeadScores: mean over the batch per (layer, head)
print(scores)
(prev_layer, prev_head, _), = scores.top("previous_token", 1)
(ind_layer, ind_head, _), = scores.top("induction", 1)

k_comp = ift.composition_scores(model.W_Q, model.W_K, model.W_V, model.W_O, mode="K")
baseline = ift.composition_baseline(model.W_Q.shape[2], model.d_head, seed=SEED)  # 500 random pairs
circuit = k_comp[prev_layer, prev_head, ind_layer, ind_head]
print(f"K-composition L{prev_layer}H{prev_head} -> L{ind_layer}H{ind_head}: {circuit:.3f} "
      f"(random heads: {baseline.mean:.3f} +- {baseline.std:.3f}, z = {baseline.zscore(circuit):.0f})")

copying = ift.copying_scores(model.W_E, model.W_V, model.W_O, model.W_U)
print(f"copying score of the induction head: {copying[ind_layer, ind_head]:.3f}")

losses = ift.token_losses(logits, tokens)  # [batch, n - 1]; losses[:, i] predicts token i + 1
# The same block positions the first time and on the repeat (see block_losses for why the
# block's first token is left out of both).
first, repeat = block_losses(losses, PERIOD)
print(f"mean loss: first half {first:.3f}, repeated half {repeat:.3f}, in-context drop {first - repeat:.3f} nats")
assert (ind_layer, ind_head) != (prev_layer, prev_head) and repeat < first
