"""detection_scores with several kinds at once: one pass, and every value bit for bit the one a
call with that kind alone gives (so TransformerLens parity carries over), plus the fixture and
TransformerLens's own head_detector on the dict form."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import induct_fast as inf
from helpers import FLOAT_DTYPES, layouts, lead_shapes, random_patterns, random_tokens, sequence_lengths, strided_view
from test_parity_tl import KEY, TOLERANCE, _tl_keys

KIND_POOL = ("previous_token", "duplicate_token", "induction", "bos", "self")


def same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@settings(max_examples=150)
@given(
    lead=lead_shapes(),
    n=sequence_lengths,
    dtype=st.sampled_from(FLOAT_DTYPES),
    kinds=st.lists(st.sampled_from(KIND_POOL + ("offset_1", "offset_2", "offset_3")), min_size=1, max_size=6),
    measure=st.sampled_from(("mul", "abs")),
    exclude_bos=st.booleans(),
    exclude_current_token=st.booleans(),
    per_batch_tokens=st.booleans(),
    layout=layouts(2),
    seed=st.integers(0, 2**32 - 1),
)
def test_dict_equals_one_call_per_kind(lead, n, dtype, kinds, measure, exclude_bos, exclude_current_token, per_batch_tokens, layout, seed):
    kinds = [k for k in kinds if not k.startswith("offset_") or int(k[7:]) < n] or ["bos"]
    rng = np.random.default_rng(seed)
    patterns = random_patterns(rng, lead + (n, n), dtype=dtype)
    steps, perm, readonly = layout
    full = (1,) * len(lead) + steps
    patterns = strided_view(patterns, full, tuple(range(len(lead))) + tuple(len(lead) + p for p in perm), readonly=readonly)
    t_shape = (lead[0], n) if per_batch_tokens and lead else (n,)
    tokens = random_tokens(rng, t_shape, alphabet=3)
    options = dict(tokens=tokens, measure=measure, exclude_bos=exclude_bos, exclude_current_token=exclude_current_token)
    got = inf.detection_scores(patterns, kinds, **options)
    assert list(got) == list(dict.fromkeys(kinds))
    for kind, value in got.items():
        alone = inf.detection_scores(patterns, kind, **options)
        assert same_bits(value, alone), (kind, value, alone)
    # a tuple is the same request as a list
    again = inf.detection_scores(patterns, tuple(kinds), **options)
    assert all(same_bits(again[k], got[k]) for k in got)


def test_dict_form_matches_the_transformer_lens_fixture(fixture):
    """Every fixture key, scored with all three kinds of its options in one call."""
    failures = []
    groups: dict[tuple, list[str]] = {}
    for key in _tl_keys(fixture):
        m = KEY.match(key)
        groups.setdefault((m["model"], m["prompt"], m["measure"], m["bos"], m["cur"]), []).append(key)
    assert groups
    for (model, prompt, measure, bos, cur), keys in groups.items():
        prefix = f"{model}_{prompt}"
        kinds = [KEY.match(k)["kind"] for k in keys]
        got = inf.detection_scores(
            fixture[f"{prefix}_patterns"],
            kinds,
            tokens=fixture[f"{prefix}_tokens"],
            measure=measure,
            exclude_bos=bos == "1",
            exclude_current_token=cur == "1",
        )
        for key, kind in zip(keys, kinds):
            err = np.max(np.abs(got[kind] - fixture[key]))
            if not err <= TOLERANCE[measure]:
                failures.append(f"{key}: max abs error {err:.3g}")
    assert failures == []


def test_dict_form_matches_transformer_lens_head_detector():
    """TransformerLens's own similarity score and detection patterns, head by head."""
    torch = pytest.importorskip("torch")
    hd = pytest.importorskip("transformer_lens.head_detector")
    rng = np.random.default_rng(7)
    n = 24
    tokens = random_tokens(rng, (n,), alphabet=5)
    patterns = random_patterns(rng, (2, 3, n, n), dtype=np.float32)
    t = torch.as_tensor(tokens)[None]
    tl_patterns = {
        "previous_token": hd.get_previous_token_head_detection_pattern(t),
        "duplicate_token": hd.get_duplicate_token_head_detection_pattern(t),
        "induction": hd.get_induction_head_detection_pattern(t),
    }
    for measure in ("mul", "abs"):
        for bos in (False, True):
            for cur in (False, True):
                got = inf.detection_scores(patterns, list(tl_patterns), tokens=tokens, measure=measure, exclude_bos=bos, exclude_current_token=cur)
                for kind, d in tl_patterns.items():
                    want = np.array([
                        [
                            hd.compute_head_attention_similarity_score(
                                torch.as_tensor(patterns[a, b]), d, exclude_bos=bos, exclude_current_token=cur, error_measure=measure
                            )
                            for b in range(3)
                        ]
                        for a in range(2)
                    ])
                    np.testing.assert_allclose(got[kind], want, rtol=0, atol=TOLERANCE[measure], err_msg=f"{kind} {measure} {bos} {cur}")


def test_one_pattern_gives_numpy_scalars():
    rng = np.random.default_rng(1)
    a = random_patterns(rng, (6, 6))
    got = inf.detection_scores(a, ("bos", "self"))
    assert all(isinstance(v, np.float64) for v in got.values())
    assert got["bos"] == inf.detection_scores(a, "bos")


@pytest.mark.parametrize(
    "detection, error, words",
    [
        (["bos", np.eye(6)], TypeError, ("detection", "ndarray")),
        (["bos", 3], TypeError, ("detection", "int")),
        (["bos", "entropy"], ValueError, ("detection", "entropy")),
        (["bos", "inducton"], ValueError, ("detection", "inducton")),
        (["induction"], ValueError, ("tokens",)),
        (["offset_6"], ValueError, ("offset",)),
        ([], ValueError, ("detection",)),
    ],
)
def test_bad_kind_lists_are_named_errors(detection, error, words):
    a = random_patterns(np.random.default_rng(2), (2, 6, 6))
    with pytest.raises(error) as info:
        inf.detection_scores(a, detection)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_nan_in_a_shared_pass_names_its_index():
    a = random_patterns(np.random.default_rng(3), (2, 6, 6))
    a[1, 4, 2] = np.nan
    with pytest.raises(ValueError, match=r"patterns: .*NaN at index \(1, 4, 2\)"):
        inf.detection_scores(a, ["previous_token", "bos"])
