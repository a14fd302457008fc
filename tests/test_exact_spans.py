"""`exact_spans`: the teacher's likelihood of each student token's text off the realised path, by branch queries.

With its bounds at their maximum the target must equal the brute-force enumeration of `aligner_reference` (one full
teacher forward per tree node, no cache, no attention mask) at every position it covers, on the char -> BPE pair, the
BPE -> char pair and a BPE-subset pair; with bounds it must approach that target as they grow; and the tree queries
must equal one full forward per branch.
"""

from __future__ import annotations

import pytest
import torch
from aligner_reference import brute_force_next_token
from opd_lightning.aligners import ALIGNERS
from opd_lightning.aligners.branches import Branch, BranchQueries
from opd_lightning.aligners.bytes import byte_level_alphabet
from opd_lightning.aligners.trie import prefixless_encoder
from test_cross_tokenizer import BATCH, cross_module

from opd_lightning.target import TEACHER_LOGITS, TEACHER_TOKEN_LOGPROBS


def _pair(name, teacher_dir, bpe_teacher_dir, subset_dirs):
    return {"char_to_bpe": (teacher_dir, "builtin:arithmetic_bpe"), "bpe_to_char": (bpe_teacher_dir, "builtin:char"),
            "subset": (subset_dirs["teacher"], subset_dirs["student"])}[name]


def _module(pair, aligner, **options):
    teacher, student = pair
    return cross_module(teacher, student, "forward_kl", ALIGNERS.build(aligner, **options), on_policy_fraction=0.0)


def _brute(module, rollout, inputs, b, i, lead_topk=None):
    """The reference target at student position (b, i), from the view's teacher tokens and byte offsets."""
    aligner, view = module.aligner, inputs.alignment
    prompt = view.input_ids.shape[1] - view.teacher_ids.shape[1]
    keep = inputs.attention_mask[b].bool()
    ids = inputs.input_ids[b][keep].tolist()
    n_prompt = int(inputs.attention_mask[b, :prompt].sum())
    c, need = int(view.teacher_at_start[b, i]), b""
    if c < 0:
        c = int(view.containing[b, i])
        written = aligner.student_bytes.join(rollout.completion_ids[b, :i].numpy())
        need = written[len(aligner.teacher_bytes.join(view.teacher_ids[b, :c].numpy())):]
    encoder = prefixless_encoder(aligner.student_tokenizer)
    alphabet = {b: ch for ch, b in byte_level_alphabet().items()}

    def encode(text: bytes) -> list[int]:  # a lone byte of a character: only a byte-level student spells it
        try:
            return encoder.encode(text.decode()).ids
        except UnicodeDecodeError:
            if aligner.student_bytes.spelling != "byte_level":
                return []
            return [encoder.model.token_to_id(t.value) for t in encoder.model.tokenize("".join(alphabet[b] for b in text))]

    return brute_force_next_token(module.teacher, ids[: n_prompt + c], need, aligner.teacher_bytes,
                                  aligner.student_bytes, encode, aligner.student_vocab_size, lead_topk)


@pytest.mark.parametrize("pair", ["char_to_bpe", "bpe_to_char", "subset"])
def test_unbounded_exact_spans_equal_the_brute_force_target(teacher_dir, bpe_teacher_dir, subset_dirs, pair):
    module = _module(_pair(pair, teacher_dir, bpe_teacher_dir, subset_dirs), "exact_spans", branches=None, depth=None, min_mass=0.0)
    completions = {"char_to_bpe": ["46", "136", "10", "7"], "bpe_to_char": ["46 and", "the", "world", "12+34"],
                   "subset": [" distillation", " hello world", " the teacher", " student"]}
    batch = {"prompt": BATCH["prompt"], "completion": completions[pair]}
    rollout = module.rollouts(batch, train=True)["rollout"]
    target = module.scorer.teacher_target(rollout, frozenset({TEACHER_LOGITS, TEACHER_TOKEN_LOGPROBS}),
                                          module.student)
    inputs = module.aligner.teacher_inputs(rollout)
    covered = (target.mask & rollout.completion_mask).nonzero().tolist()
    assert len(covered) >= 0.75 * int(rollout.completion_mask.sum())
    inside = sum(int(inputs.alignment.teacher_at_start[b, i]) < 0 for b, i in covered)
    if pair == "subset":
        assert inside > 0, "the pair should have student tokens starting inside teacher tokens"
    for b, i in covered:
        want = _brute(module, rollout, inputs, b, i)
        got = target.logits[b, i].double().exp()
        torch.testing.assert_close(got[want > 1e-12], want[want > 1e-12], rtol=2e-4, atol=1e-7)
        assert float(got[want <= 1e-12].sum()) < 1e-5
        token = int(rollout.completion_ids[b, i])
        torch.testing.assert_close(target.token_logprobs[b, i].double(), want[token].log(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lead_topk", [1, 2])
def test_lead_topk_equals_the_brute_force_target_on_the_teachers_top_first_tokens(teacher_dir, lead_topk):
    """`lead_topk`: the tree below the teacher's k most likely first tokens only, exact below them."""
    module = _module((teacher_dir, "builtin:arithmetic_bpe"), "exact_spans", branches=None, depth=None, min_mass=0.0,
                     lead_topk=lead_topk)
    exact = _module((teacher_dir, "builtin:arithmetic_bpe"), "exact_spans", branches=None, depth=None, min_mass=0.0)
    batch = {"prompt": BATCH["prompt"], "completion": ["46", "136", "10", "7"]}
    rollout = module.rollouts(batch, train=True)["rollout"]
    needs = frozenset({TEACHER_LOGITS, TEACHER_TOKEN_LOGPROBS})
    target = module.scorer.teacher_target(rollout, needs, module.student)
    full = exact.scorer.teacher_target(rollout, needs, exact.student)
    inputs = module.aligner.teacher_inputs(rollout)
    covered = (target.mask & rollout.completion_mask).nonzero().tolist()
    assert covered and torch.equal(target.mask, full.mask)
    for b, i in covered:
        want = _brute(module, rollout, inputs, b, i, lead_topk=lead_topk)
        got = target.logits[b, i].double().exp()
        torch.testing.assert_close(got[want > 1e-12], want[want > 1e-12], rtol=2e-4, atol=1e-7)
        assert float(got[want <= 1e-12].sum()) < 1e-5
    # fewer first tokens: fewer student tokens with mass than the exact target somewhere
    support = (target.logits.exp() > 1e-9).sum(-1)[target.mask]
    assert bool((support <= (full.logits.exp() > 1e-9).sum(-1)[target.mask]).all())
    assert bool((support < (full.logits.exp() > 1e-9).sum(-1)[target.mask]).any())
    with pytest.raises(ValueError, match="lead_topk must be >= 1"):
        ALIGNERS.build("exact_spans", lead_topk=0)


def test_byte_spans_differs_from_the_exact_target_off_the_realised_path(teacher_dir):
    pair = (teacher_dir, "builtin:arithmetic_bpe")
    exact, spans = _module(pair, "exact_spans", branches=None, depth=None, min_mass=0.0), _module(pair, "byte_spans")
    batch = {"prompt": ["12+34="], "completion": ["46"]}
    want = exact.scorer.teacher_target(exact.rollouts(batch, train=True)["rollout"], frozenset({TEACHER_LOGITS}),
                                       exact.student).logits[0, 0].exp()
    got = spans.scorer.teacher_target(spans.rollouts(batch, train=True)["rollout"], frozenset({TEACHER_LOGITS}),
                                      spans.student).logits[0, 0].exp()
    tok = exact.student_tokenizer
    s57, s5 = tok.convert_tokens_to_ids("57"), tok.convert_tokens_to_ids("5")
    assert float(got[s57]) < 1e-20 < float(want[s57])  # byte_spans puts "57" on "5"; the exact target does not
    assert float(got[s5]) > float(want[s5])
    torch.testing.assert_close(got[tok.convert_tokens_to_ids("46")], want[tok.convert_tokens_to_ids("46")])


def test_bounded_trees_approach_the_exact_target(teacher_dir):
    pair = (teacher_dir, "builtin:arithmetic_bpe")
    batch = {"prompt": BATCH["prompt"], "completion": ["46", "136", "10", "7"]}

    def target(**options):
        module = _module(pair, "exact_spans", **options)
        rollout = module.rollouts(batch, train=True)["rollout"]
        got = module.scorer.teacher_target(rollout, frozenset({TEACHER_LOGITS}), module.student)
        return got.logits.double().log_softmax(-1), got.mask & rollout.completion_mask, module.aligner

    exact, mask, _ = target(branches=None, depth=None, min_mass=0.0)

    def kl(logp):
        return float((exact.exp() * (exact - logp)).sum(-1)[mask].mean())

    gaps = []
    for options in ({"branches": 0, "depth": 0}, {"branches": 2, "depth": 1}, {"branches": 4, "depth": 2},
                    {"branches": None, "depth": None, "min_mass": 0.0}):
        logp, covered, aligner = target(**options)
        assert torch.equal(covered, mask)
        gaps.append(kl(logp))
        if options["depth"] == 0:
            assert aligner.last_query_tokens == 0
    assert gaps[0] > gaps[1] > gaps[2] > gaps[3] == pytest.approx(0.0, abs=1e-9)


def test_min_mass_moves_at_most_the_mass_it_leaves_out(teacher_dir):
    """Off-path children below `min_mass` are not queried: their mass goes to the first student token of their text,
    so the target moves from the exact one by at most what was left out (total variation ≤ min_mass · children per
    node · tree levels), with fewer teacher tokens queried; `min_mass` 0 is the exact target itself."""
    pair = (teacher_dir, "builtin:arithmetic_bpe")
    batch = {"prompt": BATCH["prompt"], "completion": ["46", "136", "10", "7"]}

    def target(**options):
        module = _module(pair, "exact_spans", branches=None, depth=None, **{"min_mass": 0.0, **options})
        rollout = module.rollouts(batch, train=True)["rollout"]
        got = module.scorer.teacher_target(rollout, frozenset({TEACHER_LOGITS}), module.student)
        return got.logits.double().exp(), got.mask & rollout.completion_mask, module.aligner.last_query_tokens

    exact, mask, exact_tokens = target()
    same, _, same_tokens = target(min_mass=0.0)
    torch.testing.assert_close(same, exact)
    assert same_tokens == exact_tokens
    pruned, pruned_mask, pruned_tokens = target(min_mass=1e-2)
    assert torch.equal(pruned_mask, mask) and pruned_tokens < exact_tokens
    tv = 0.5 * (pruned - exact).abs().sum(-1)[mask]
    assert 0 < float(tv.max()) <= 1e-2 * 10 * 2  # ten digits per node, two levels below a position on this pair
    with pytest.raises(ValueError, match="min_mass must be in"):
        ALIGNERS.build("exact_spans", min_mass=1.0)


def test_tree_queries_equal_one_full_forward_per_branch(teacher_dir, char_tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    enc = char_tok(["12+34=4", "7-3="], return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        cache = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True).cache
    queries = BranchQueries(model, cache, mask, pos)
    t = char_tok.convert_tokens_to_ids
    k = ids.shape[1]
    # row 0: after "12+34=" (its last token, "4", replaced) try "5", then "5" -> "7"; row 1: after "7-3=" try "9"
    level1, slots = queries.query([Branch(0, k - 1, (), t("5"), 6), Branch(1, k, (), t("9"), 4)])
    level2, _ = queries.query([Branch(0, k - 1, (slots[0],), t("7"), 7)])
    with torch.no_grad():
        full = [model(input_ids=char_tok(text, return_tensors="pt")["input_ids"]).logits[0, -1]
                for text in ("12+34=5", "7-3=9", "12+34=57")]
    torch.testing.assert_close(level1[0], full[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(level1[1], full[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(level2[0], full[2], rtol=1e-4, atol=1e-5)
    assert queries.tokens == 3


def test_exact_spans_trains_end_to_end_and_refuses_bad_bounds(teacher_dir):
    from test_cross_tokenizer import run_step

    module = cross_module(teacher_dir, "builtin:arithmetic_bpe", "forward_kl", "exact_spans", on_policy_fraction=1.0)
    loss, _ = run_step(module)
    assert torch.isfinite(loss) and float(loss) > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.student.parameters())
    with pytest.raises(ValueError, match="branches must be >= 0"):
        ALIGNERS.build("exact_spans", branches=-1)
