"""Cross-tokenizer alignment against brute-force references, with genuinely different tokenizers built in-process.

Byte-level BPE (GPT-2 style) against SentencePiece-style Unigram (Metaspace) and a Llama-2-style BPE with byte
fallback: every spelling the aligners must normalise. References enumerate tokens one by one (no tries, no
searchsorted), so a vectorisation bug cannot hide behind the same shortcut.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from aligner_reference import first_byte_distribution, spell_with_model, subset_conditional
from opd_lightning.aligners import (
    TokenBytes,
    TokenTrie,
    align_ends,
    bpe_subset_problem,
    keep_merges,
    prefixless_encoder,
    retokenise,
    to_byte_logprobs,
    vocab_pairs,
)
from opd_lightning.aligners.char_level import byte_class_ids
from opd_lightning.aligners.lookahead import Lookahead

TEXTS = ["hello world, café naïve", "x = 1  # code\n\tdef f(y):\n    return y", "日本語のテキスト 😀 emoji",
         "12+34=46 and 99-17=82", "   leading spaces and trailing   ", "distillation moves knowledge"]
CORPUS = TEXTS * 30 + ["the quick brown fox jumps over the lazy dog"] * 30


def _wrap(backend, **special):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


def byte_bpe(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    return _wrap(raw, pad_token="<pad>", eos_token="<eos>")


def unigram(vocab_size: int = 200):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    raw = Tokenizer(models.Unigram())
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    raw.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    raw.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=vocab_size, unk_token="<unk>",
                                                            special_tokens=["<pad>", "<eos>", "<unk>"],
                                                            show_progress=False))
    return _wrap(raw, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def fallback_bpe():
    """Llama-2 style: `▁` for spaces, a dummy prefix, and `<0xNN>` for bytes outside the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    chars = sorted(set("".join(t for t in CORPUS if t.isascii())) - {" "}) + ["\u2581"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    vocab.update({c: len(vocab) + i for i, c in enumerate(chars)})
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("\u2581", "w"), ("o", "r")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    raw = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    raw.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    raw.add_special_tokens(["<unk>", "<s>", "</s>"])
    return _wrap(raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>")


@pytest.fixture(scope="module")
def toks():
    return {"byte_bpe": byte_bpe(), "unigram": unigram(), "fallback_bpe": fallback_bpe()}


@pytest.mark.parametrize("name", ["byte_bpe", "unigram", "fallback_bpe"])
def test_token_bytes_spell_the_text(toks, name):
    tok = toks[name]
    table = TokenBytes.from_tokenizer(tok)
    table.check(tok)
    encoder = prefixless_encoder(tok)
    for text in TEXTS:
        ids = np.array(encoder.encode(text, add_special_tokens=False).ids)
        assert table.join(ids) == text.encode(), (name, text)
        assert table.ends(ids)[-1] == len(text.encode())
    if name == "fallback_bpe":  # CJK is outside its vocabulary: spelled through <0xNN> tokens
        assert any(t.startswith("<0x") for t in tok.convert_ids_to_tokens(encoder.encode("日本").ids))


def _brute_spans(s_ends: list[int], t_ends: list[int], limit: int) -> tuple[list[int], list[int]]:
    """Group two tokenizations with two pointers: a span closes when both sides have reached the same end."""
    s_span, t_span, i, j, span = [-1] * len(s_ends), [-1] * len(t_ends), 0, 0, 0
    while i < len(s_ends) and j < len(t_ends):
        si, tj = i, j
        while s_ends[i] != t_ends[j]:
            if s_ends[i] < t_ends[j]:
                i += 1
            else:
                j += 1
            if i == len(s_ends) or j == len(t_ends):
                return s_span, t_span
        while i + 1 < len(s_ends) and s_ends[i + 1] == s_ends[i]:
            i += 1  # zero-length tokens join the span they end in
        while j + 1 < len(t_ends) and t_ends[j + 1] == t_ends[j]:
            j += 1
        if s_ends[i] > limit:
            return s_span, t_span
        s_span[si : i + 1] = [span] * (i + 1 - si)
        t_span[tj : j + 1] = [span] * (j + 1 - tj)
        i, j, span = i + 1, j + 1, span + 1
    return s_span, t_span


@pytest.mark.parametrize("seed", range(20))
def test_align_ends_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    length = int(rng.integers(1, 40))
    cuts = [np.sort(rng.choice(np.arange(1, length), size=rng.integers(0, length), replace=False)) for _ in range(2)]
    s_ends, t_ends = (np.append(c, length).astype(np.int64) for c in cuts)
    limit = length if seed % 3 else int(rng.integers(0, length + 1))
    got = align_ends(s_ends, t_ends, limit)
    want_s, want_t = _brute_spans(s_ends.tolist(), t_ends.tolist(), limit)
    assert got.student_span.tolist() == want_s and got.teacher_span.tolist() == want_t
    s_starts, t_starts = [0, *s_ends[:-1]], [0, *t_ends[:-1]]
    for i, start in enumerate(s_starts):
        inside = [j for j, ts in enumerate(t_starts) if ts <= start < t_ends[j]] if start < limit else []
        assert got.containing[i] == (inside[0] if inside else -1)
        assert got.teacher_at_start[i] == (inside[0] if inside and t_starts[inside[0]] == start else -1)
        if inside:
            first = [k for k, ss in enumerate(s_starts) if ss == t_starts[inside[0]]]
            assert got.path_start[i] == (first[0] if first else -1)


def _view(student, teacher, texts, eos=True, exact_ends=True):
    s_bytes = TokenBytes.from_tokenizer(student)
    rows = [student(t, add_special_tokens=False)["input_ids"] + ([student.eos_token_id] if eos else []) for t in texts]
    width = max(map(len, rows))
    comp, mask = np.zeros((len(rows), width), np.int64), np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        comp[i, : len(r)], mask[i, : len(r)] = r, 1
    prompt = np.array([student("q:", add_special_tokens=False)["input_ids"]] * len(rows))
    view = retokenise(s_bytes, teacher, prefixless_encoder(teacher), prompt, np.ones_like(prompt), comp, mask,
                      teacher.eos_token_id, TokenBytes.from_tokenizer(teacher) if exact_ends else None)
    return view, rows, s_bytes


@pytest.mark.parametrize("exact_ends", [True, False], ids=["byte_table", "char_offsets"])
@pytest.mark.parametrize(("s_name", "t_name"), [("byte_bpe", "unigram"), ("unigram", "byte_bpe"),
                                                ("byte_bpe", "fallback_bpe")])
def test_spans_cover_the_text_monotonically_with_equal_bytes(toks, s_name, t_name, exact_ends):
    student, teacher = toks[s_name], toks[t_name]
    view, rows, s_bytes = _view(student, teacher, TEXTS, exact_ends=exact_ends)
    t_bytes = TokenBytes.from_tokenizer(teacher)
    for b, row in enumerate(rows):
        s_span, t_span = view.student_span[b, : len(row)].numpy(), view.teacher_span[b].numpy()
        t_ids = view.teacher_ids[b][view.teacher_mask[b]].numpy()
        assert (s_span >= 0).all() and (np.diff(s_span) >= 0).all() and s_span[0] == 0
        assert (np.diff(t_span[: len(t_ids)]) >= 0).all()
        assert s_span[-1] == t_span[len(t_ids) - 1]  # both end on the EOS span
        assert row[-1] == student.eos_token_id and t_ids[-1] == teacher.eos_token_id
        assert (s_span == s_span[-1]).sum() == 1  # EOS is a span of its own
        for span in range(s_span[-1]):
            s_text = s_bytes.join(np.array(row)[s_span == span])
            assert s_text and s_text == t_bytes.join(t_ids[t_span[: len(t_ids)] == span]), (b, span)
        spelled = s_bytes.join(np.array(row))  # the text the student's tokens spell (with its dummy prefix, if any)
        assert spelled.strip() == TEXTS[b].encode().strip()
        assert b"".join(s_bytes.join(np.array(row)[s_span == k]) for k in range(s_span[-1])) == spelled


@pytest.mark.parametrize("where", ["end", "middle", "start"])
def test_invalid_utf8_leaves_only_its_tokens_uncovered(toks, where):
    student, teacher = toks["byte_bpe"], toks["unigram"]
    n_tilde = student("ñ", add_special_tokens=False)["input_ids"]  # not in the corpus: two byte-level tokens
    s_bytes = TokenBytes.from_tokenizer(student)
    assert len(n_tilde) == 2 and s_bytes.join(np.array(n_tilde)) == "ñ".encode()
    word = student("hello world", add_special_tokens=False)["input_ids"]
    stray = n_tilde[:1]  # the lead byte of ñ alone: not UTF-8
    ids = {"end": word + stray, "middle": word + stray + word, "start": stray + word}[where]
    prompt = np.array([student("q", add_special_tokens=False)["input_ids"]])
    comp = np.array([ids])
    view = retokenise(s_bytes, teacher, prefixless_encoder(teacher), prompt, np.ones_like(prompt), comp,
                      np.ones_like(comp), teacher.eos_token_id, TokenBytes.from_tokenizer(teacher))
    assert "\ufffd" in view.texts[0]  # the teacher reads a replacement character
    spans = view.student_span[0].tolist()
    bad = {"end": [len(word)], "middle": [len(word)], "start": [0]}[where]
    assert all(spans[i] == -1 for i in bad)
    good = [i for i in range(len(ids)) if i not in bad]
    # Only the span around the stray byte is lost: the words on either side stay aligned.
    assert sum(spans[i] >= 0 for i in good) >= len(good) - 2


def test_vocab_pairs_match_spellings_across_families(toks):
    byte_level, fallback = toks["byte_bpe"], toks["fallback_bpe"]
    s_ids, t_ids = vocab_pairs(TokenBytes.from_tokenizer(byte_level), TokenBytes.from_tokenizer(fallback))
    pairs = dict(zip(s_ids.tolist(), t_ids.tolist(), strict=True))
    assert len(set(s_ids.tolist())) == len(s_ids) and len(set(t_ids.tolist())) == len(t_ids)
    expect = {"\u010a": "<0x0A>", "he": "he", "<eos>": "</s>"}  # Ċ (newline) = <0x0A>
    for s_tok, t_tok in expect.items():
        assert pairs[byte_level.convert_tokens_to_ids(s_tok)] == fallback.convert_tokens_to_ids(t_tok)
    # A space is Ġ on one side and both ▁ and <0x20> on the other: one pair, never two (no double counting).
    space = pairs[byte_level.convert_tokens_to_ids("\u0120")]
    assert space in {fallback.convert_tokens_to_ids("\u2581"), fallback.convert_tokens_to_ids("<0x20>")}


def _first_student_token(student, text: bytes) -> int:
    ids = prefixless_encoder(student).encode(text.decode(), add_special_tokens=False).ids
    return ids[0]


def test_marginal_matches_per_token_brute_force(toks):
    student, teacher = toks["byte_bpe"], toks["unigram"]
    s_bytes, t_bytes = TokenBytes.from_tokenizer(student), TokenBytes.from_tokenizer(teacher)
    trie = TokenTrie(t_bytes, s_bytes, student, len(student))
    probs = torch.softmax(torch.randn(3, len(teacher), generator=torch.Generator().manual_seed(0)), -1)
    want = torch.zeros(3, len(student))
    for v, data in enumerate(t_bytes.table):
        if v == teacher.eos_token_id:
            want[:, student.eos_token_id] += probs[:, v]
        elif data:
            want[:, _first_student_token(student, data)] += probs[:, v]
    torch.testing.assert_close(trie.marginal(probs), want)
    spelled = [v for v, d in enumerate(t_bytes.table) if d] + [teacher.eos_token_id]
    torch.testing.assert_close(trie.marginal(probs).sum(-1), probs[:, spelled].sum(-1))  # mass conserved


def subset_pair(keep: float):
    """A teacher BPE and a student keeping the first `keep` share of its merges: an ordered BPE subset."""
    teacher = byte_bpe(500)
    return keep_merges(teacher, keep), teacher


def test_bpe_subset_qualifies_only_ordered_subsets(toks):
    student, teacher = subset_pair(0.3)
    assert bpe_subset_problem(student, teacher) is None
    assert "BPE" in bpe_subset_problem(toks["unigram"], teacher)
    assert "merges" in bpe_subset_problem(teacher, student)  # the teacher's extra merges are not the student's


def test_conditional_matches_brute_force_on_a_subset_pair():
    student, teacher = subset_pair(0.3)
    s_bytes, t_bytes = TokenBytes.from_tokenizer(student), TokenBytes.from_tokenizer(teacher)
    trie = TokenTrie(t_bytes, s_bytes, student, len(student))
    spell = spell_with_model(student, teacher, t_bytes)
    long = [v for v, p in spell.items() if len(p) >= 3][:5]
    assert long, "the subset pair should have teacher tokens spelled by several student tokens"
    probs = torch.softmax(torch.randn(len(long) * 2, len(teacher), generator=torch.Generator().manual_seed(1)), -1)
    paths = [spell[v][:k] for v in long for k in (1, 2)]
    got = trie.conditional(probs, paths)
    for r, path in enumerate(paths):
        torch.testing.assert_close(got[r].double(), subset_conditional(probs[r], path, spell, len(student)))


@pytest.mark.parametrize("shift", [0.0, 95.0, -110.0])
def test_bpe_subset_target_is_the_brute_force_conditional_at_every_position(shift):
    """`bpe_subset`'s dense target (each teacher row exponentiated once, its columns summed for the positions at a
    teacher token's start and its children's entries read for those inside one) equals the enumerated conditional of
    the next student token given the path inside the teacher token, at every aligned position, also where a row's
    exp overflows (+95) or underflows (-110) and it is soft-maxed instead."""
    from opd_lightning.aligners import ALIGNERS

    student, teacher = subset_pair(0.3)
    aligner = ALIGNERS.build("bpe_subset")
    aligner.bind(student, teacher, len(student), len(teacher))
    spell = spell_with_model(student, teacher, aligner.teacher_bytes)
    text = student("the quick brown fox jumps over the lazy dog; the dog sleeps", add_special_tokens=False)["input_ids"]
    rollout = _rollout_after(student, "Once ", [text[:12], text[3:15]])
    inputs = aligner.teacher_inputs(rollout)
    view = inputs.alignment
    logits = 4 * torch.randn(2, inputs.completion_length, len(teacher), generator=torch.Generator().manual_seed(5))
    logits[1] += shift
    target = aligner.project(logits, inputs, rollout, frozenset({"teacher_logits"}))
    deep = 0
    for b, i in target.mask.nonzero().tolist():
        start, j = int(view.path_start[b, i]), int(view.containing[b, i])
        path = tuple(rollout.completion_ids[b, start:i].tolist())
        deep += bool(path)
        want = subset_conditional(torch.softmax(logits[b, j].double(), -1), path, spell, len(student))
        torch.testing.assert_close(target.logits[b, i].double().exp(), want, rtol=0, atol=1e-6)
    assert deep and target.mask.sum() > deep  # positions inside teacher tokens and at their starts


def test_lookahead_gives_longer_student_tokens_the_teacher_likelihood_of_their_text(char_tok):
    from opd_lightning.tasks.arithmetic import bpe_tokenizer

    student, teacher = bpe_tokenizer(), char_tok
    s_bytes, t_bytes = TokenBytes.from_tokenizer(student), TokenBytes.from_tokenizer(teacher)
    trie = TokenTrie(t_bytes, s_bytes, student, len(student))
    look = Lookahead(s_bytes, t_bytes, teacher, student, trie.first)
    realised = torch.tensor(teacher("46", add_special_tokens=False)["input_ids"] + [teacher.eos_token_id])
    probs = torch.softmax(torch.randn(3, len(teacher), generator=torch.Generator().manual_seed(2)), -1)
    got = look.project(probs[:1].clone(), [(0, 0)], [realised.tolist()], [3], lambda b, pos, ids: probs[pos, ids],
                       len(student))[0]
    t = teacher.convert_tokens_to_ids
    s = student.convert_tokens_to_ids
    digits = [t(str(d)) for d in range(10)]
    assert s("46") != student.unk_token_id and s("4") >= 0
    # "46" is one student token: p(4) · p(6 | 4); "4" alone: p(4) · p(no further digit of a token | 4).
    torch.testing.assert_close(got[s("46")], probs[0, t("4")] * probs[1, t("6")])
    two_digit = [d for d in digits if s("4" + teacher.convert_ids_to_tokens(d)) is not None
                 and s("4" + teacher.convert_ids_to_tokens(d)) != student.unk_token_id]
    torch.testing.assert_close(got[s("4")], probs[0, t("4")] * (1 - probs[1, two_digit].sum()))
    torch.testing.assert_close(got[s("47")], probs[0, t("4")] * probs[1, t("7")])
    torch.testing.assert_close(got[s("5")], probs[0, t("5")])  # off the realised path: the first token's mass
    spelled = [v for v, d in enumerate(t_bytes.table) if d] + [teacher.eos_token_id]
    torch.testing.assert_close(got.sum(), probs[0, spelled].sum())  # mass conserved


@pytest.mark.parametrize("width, size, lanes", [(4096, 7, 8), (4096, 300, 2), (50, 9, 2), (4096, 3000, 1)])
def test_column_sums_equal_a_float64_scatter_with_and_without_lanes(width, size, lanes):
    """`ColumnSums` (interleaved copies of the columns where they are few beside the width) equals a float64 sum of
    each column's entries, -1 entries in the kept extra column, runs of one column included; into `out`, and with a
    gradient equal to the plain `index_add_`'s."""
    from opd_lightning.aligners.columns import ColumnSums

    g = torch.Generator().manual_seed(0)
    index = torch.randint(-1, size, (width,), generator=g)
    index[: width // 2] = 0  # half the row in one column, one after another (most of a 262k vocabulary's first byte)
    values = torch.rand(3, width, generator=g, requires_grad=True)
    sums = ColumnSums(index, size)
    assert sums.lanes == lanes  # few columns: at least 2 copies, up to 8 as the width allows; many: 1
    want = torch.zeros(3, size + 1, dtype=torch.float64)
    want.index_add_(1, index.where(index >= 0, size), values.detach().double())
    got = sums(values, keep_skipped=True)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)  # fp32 sums of up to 2,048 values
    torch.testing.assert_close(sums(values.detach(), out=torch.full((3, size + 1), float("nan"))).double(),
                               want[:, :size], rtol=1e-6, atol=1e-6)
    weights = torch.randn(size, generator=g)
    (sums(values) * weights).sum().backward()
    torch.testing.assert_close(values.grad, weights[index].masked_fill(index < 0, 0).expand(3, -1))


def test_index_pieces_cut_an_index_into_stretches_and_the_entries_between(monkeypatch):
    """`index_pieces` finds the stretches where an index steps by one (at least `STRETCH` long, no -1 entries) and
    the entries between, in order, covering the index; it declines an index whose stretches hold less than half of
    it, or that would take more than `MAX_PIECES` pieces."""
    from opd_lightning.aligners import rows
    from opd_lightning.aligners.rows import index_pieces

    monkeypatch.setattr(rows, "STRETCH", 3)
    index = torch.tensor([-1, 0, 1, 2, 3, 9, 4, 5, 6, 7, 8, 8, 2, 20, 21])
    assert index_pieces(index) == [(0, 1, -1), (1, 5, 0), (5, 6, -1), (6, 11, 4), (11, 15, -1)]
    assert index_pieces(torch.tensor([-1, 0, 1, 2, 5, 3, 8, 3, 4])) is None  # 3 of 9 entries in a stretch
    assert index_pieces(torch.tensor([-1, -1, -1, 0])) is None
    monkeypatch.setattr(rows, "MAX_PIECES", 4)
    assert index_pieces(index) is None


def test_column_sums_by_stretches_equal_a_float64_scatter():
    """Where the index has long stretches (a student keeping the teacher's ids), `ColumnSums` copies or adds them as
    slices and `index_add_`s the rest: equal to a float64 sum of each column's entries, with a stretch copied (no
    other adds into its columns), one added (another stretch adds into its columns), entries between them mapped
    at random or skipped (-1), into an `out` holding NaN, on rows narrower than the index, and with the gradient of
    the plain `index_add_`."""
    from opd_lightning.aligners.columns import ColumnSums

    g = torch.Generator().manual_seed(0)
    size = 3000
    index = torch.randint(-1, size, (4000,), generator=g)
    index[:2000] = torch.arange(2000)
    index[2500:3100] = torch.arange(100, 700)  # into the first stretch's columns: both added
    index[3200:3600] = torch.arange(2500, 2900)  # columns no other stretch touches: copied
    sums = ColumnSums(index, size)
    assert sums.lanes == 1 and [p[2] for p in sums.pieces] == [0, -1, 100, -1, 2500, -1]
    assert sums.copied == [False, False, False, False, True, False]
    values = torch.rand(5, 4000, generator=g, requires_grad=True)
    for width in (4000, 3300, 1500):
        want = torch.zeros(5, size + 1, dtype=torch.float64)
        want.index_add_(1, index.where(index >= 0, size)[:width], values.detach()[:, :width].double())
        got = sums(values.detach()[:, :width], keep_skipped=True, out=torch.full((5, size + 1), float("nan")))
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sums(values.detach()[:, :width]).double(), want[:, :size], rtol=1e-6, atol=1e-6)
    weights = torch.randn(size, generator=g)
    (sums(values) * weights).sum().backward()
    torch.testing.assert_close(values.grad, weights[index].masked_fill(index < 0, 0).expand(5, -1))


@pytest.mark.parametrize("shift", [0.0, 95.0, -110.0])
@pytest.mark.parametrize("name", ["vocab_map", "byte_spans", "bpe_subset"])
def test_targets_read_by_stretches_equal_the_targets_read_whole(monkeypatch, name, shift):
    """On a student keeping the teacher's ids (a subset of its merges), `vocab_map` reads the matched columns and
    `byte_spans`/`bpe_subset` sum the first level by stretches of consecutive ids (`rows.index_pieces`): the targets
    equal those read through the whole index (stretches switched off), also on rows soft-maxed for overflow (+95)
    or underflow (-110)."""
    from opd_lightning.aligners import ALIGNERS, rows

    student, teacher = subset_pair(0.9)
    text = student("the quick brown fox jumps over the lazy dog; the dog sleeps", add_special_tokens=False)["input_ids"]
    rollout = _rollout_after(student, "Once ", [text[:12], text[3:15]])
    targets = []
    for stretch in (256, 10**9):
        monkeypatch.setattr(rows, "STRETCH", stretch)
        aligner = ALIGNERS.build(name)
        aligner.bind(student, teacher, len(student), len(teacher))
        pieces = aligner.pieces if name == "vocab_map" else (
            aligner.root_sums if name == "byte_spans" else aligner.first_sums).pieces
        assert (pieces is not None) == (stretch == 256)
        inputs = aligner.teacher_inputs(rollout)
        logits = 4 * torch.randn(2, inputs.completion_length, len(teacher), generator=torch.Generator().manual_seed(5))
        logits[1] += shift
        targets.append(aligner.project(logits, inputs, rollout, frozenset({"teacher_logits"})))
    got, want = targets
    assert got.mask.sum() > 8 and torch.equal(got.mask, want.mask)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=2e-5)


def test_char_level_projection_is_the_first_byte_marginal(toks):
    tok = toks["unigram"]
    table = TokenBytes.from_tokenizer(tok)
    classes = byte_class_ids(table)
    logits = torch.randn(2, len(tok), requires_grad=True)
    got = to_byte_logprobs(logits, classes)
    want = first_byte_distribution(torch.softmax(logits.detach(), -1), table, tok.eos_token_id).float()
    present = want[0] > 0
    torch.testing.assert_close(got.exp()[:, present], want[:, present])
    got.exp()[:, present].sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def _levenshtein(a: bytes, b: bytes) -> int:
    """Textbook recursion-free Levenshtein on Python lists (the reference)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def test_edit_distances_match_the_textbook_recursion():
    from opd_lightning.aligners import edit_distances

    rng = np.random.default_rng(0)
    words = [bytes(rng.integers(97, 101, size=rng.integers(0, 7)).astype(np.uint8)) for _ in range(40)]
    matrix = np.zeros((len(words), 8), dtype=np.uint8)
    for i, w in enumerate(words):
        matrix[i, : len(w)] = np.frombuffer(w, dtype=np.uint8)
    lengths = np.array([len(w) for w in words])
    for query in words[:10]:
        assert edit_distances(query, matrix, lengths).tolist() == [_levenshtein(query, w) for w in words]


def test_min_edit_pairs_is_monotone_and_prefers_similar_tokens():
    from opd_lightning.aligners import min_edit_pairs

    pairs = min_edit_pairs([b"he", b"llo", b" wor", b"ld"], [b"hel", b"lo", b" world"])
    assert pairs == sorted(pairs) and pairs[0] == 0 and pairs[-1] == 2
    assert min_edit_pairs([b"a"], [b"x", b"a"]) == [0]  # the first teacher token the path pairs it with


def test_mined_nearest_spelling_is_a_true_nearest_neighbour(toks):
    from opd_lightning.aligners import ALIGNERS

    student, teacher = toks["byte_bpe"], toks["unigram"]
    aligner = ALIGNERS.build("mined")
    aligner.bind(student, teacher, len(student), len(teacher))
    s_table, t_table = aligner.student_bytes.table, aligner.teacher_bytes.table
    for v, data in enumerate(t_table):
        if not data:
            continue
        best = min(_levenshtein(data, b) for b in s_table if b)
        assert _levenshtein(data, s_table[aligner.nearest(v)]) == best, teacher.convert_ids_to_tokens(v)


def test_gather_rows_and_put_rows_equal_advanced_indexing():
    from opd_lightning.aligners.rows import gather_rows, put_rows_

    base = torch.randn(5, 5, 11, generator=torch.Generator().manual_seed(0))
    batch, pos = torch.tensor([2, 0, 0, 1]), torch.tensor([3, 0, 2, 3])
    cases = {"contiguous": base, "sliced like completion logits": base[:, :-1], "offset slice": base[:, 1:],
             "bf16": base[:, :-1].bfloat16(), "transposed": base.transpose(0, 1)}
    for name, values in cases.items():
        want = values[batch, pos].float()
        torch.testing.assert_close(gather_rows(values, batch, pos), want, msg=name)
        buffer = torch.full((6, 11), float("nan"))
        got = gather_rows(values, batch, pos, buffer)
        torch.testing.assert_close(got, want, msg=name)
        assert got.data_ptr() == buffer.data_ptr(), name  # written into the buffer, not a fresh tensor
    out, want = torch.zeros(3, 4, 11), torch.zeros(3, 4, 11)
    rows = torch.randn(4, 11)
    put_rows_(out, batch, pos, rows)
    want[batch, pos] = rows
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("wide_row", [2**15, 4])
@pytest.mark.parametrize("run_elements", [0, 2**16])
def test_row_helpers_equal_advanced_indexing_on_runs_and_scattered_rows(monkeypatch, run_elements, wide_row):
    """`softmax_rows`, `exp_blocks` and `gather_columns` read runs of consecutive rows straight from the logits, or
    from a copy where the runs are short and narrow (`RUN_ELEMENTS`: 0 reads every run in place, 2**16 copies these
    13-wide rows), with the same values; `exp_blocks` yields blocks of at most `BLOCK_ELEMENTS` values, in order,
    filled across runs (`gather_columns` also by stretches of columns); `copy_rows_` writes runs as slices, or short
    runs of rows narrower than `WIDE_ROW` (4: these rows are not) through one buffer, with or without an op;
    `exp_safe` flags the rows whose sum overflowed or whose logits are all too small for exp without the max."""
    from opd_lightning.aligners import rows
    from opd_lightning.aligners.rows import _row_runs, copy_rows_, exp_blocks, exp_safe, gather_columns, softmax_rows

    monkeypatch.setattr(rows, "RUN_ELEMENTS", run_elements)
    monkeypatch.setattr(rows, "WIDE_ROW", wide_row)
    monkeypatch.setattr(rows, "BLOCK_ELEMENTS", 4 * 13)  # blocks of 4 rows: across the runs of 3, 2 and 1 rows
    base = torch.randn(3, 9, 13, generator=torch.Generator().manual_seed(0))
    values = base[:, 2:]  # sliced like completion logits
    cases = {"runs": (torch.tensor([0, 0, 0, 1, 1, 2]), torch.tensor([4, 5, 6, 0, 1, 6])),
             "scattered": (torch.arange(21) % 3, torch.arange(21) % 7)}
    for name, (batch, pos) in cases.items():
        assert (_row_runs(values, batch, pos) is None) == bool(run_elements), name
        buffer = torch.full((len(batch) + 2, 13), float("nan"))
        torch.testing.assert_close(softmax_rows(values, batch, pos, buffer), values[batch, pos].softmax(-1), msg=name)
        blocks = [(lo, hi, block.clone()) for lo, hi, block in exp_blocks(values, batch, pos)]
        assert [(lo, hi) for lo, hi, _ in blocks] == [(lo, min(lo + 4, len(batch))) for lo in range(0, len(batch), 4)]
        torch.testing.assert_close(torch.cat([b for *_, b in blocks]), values[batch, pos].exp(), msg=name)
        columns = torch.tensor([7, 0, 12, 3])
        torch.testing.assert_close(gather_columns(values, batch, pos, columns, buffer[:, :4].contiguous()),
                                   values[batch, pos][:, columns], msg=name)
        columns = torch.tensor([3, 4, 5, 6, 0, 12, 1, 2, 3])  # two stretches (3-6, 1-3) copied, two gathered
        pieces = [(0, 4, 3), (4, 6, -1), (6, 9, 1)]
        torch.testing.assert_close(gather_columns(values, batch, pos, columns, buffer[:, :9].contiguous(), pieces),
                                   values[batch, pos][:, columns], msg=name)
    dst, src = torch.zeros(10, 4), torch.randn(6, 4)
    dst_rows, src_rows = np.array([1, 2, 3, 7, 8, 9]), np.array([0, 1, 3, 4, 5, 2])
    copy_rows_(dst, dst_rows, src, src_rows)  # by runs (RUN_ELEMENTS 0, WIDE_ROW 4), or through one buffer
    want = torch.zeros(10, 4)
    want[torch.from_numpy(dst_rows)] = src[torch.from_numpy(src_rows)]
    assert torch.equal(dst, want)
    copy_rows_(dst, dst_rows, src, src_rows, op=torch.exp)
    want[torch.from_numpy(dst_rows)] = src[torch.from_numpy(src_rows)].exp()
    assert torch.equal(dst, want)
    logits = torch.stack([torch.zeros(13), torch.full((13,), 100.0), torch.full((13,), -30.0), torch.full((13,), -7.0)])
    assert exp_safe(logits.exp().sum(-1), 13).tolist() == [True, False, False, True]


def _rollout_after(student, prompt: str, completions: list[list[int]]):
    """A rollout of equally long `completions` (student ids, every token valid) after one `prompt`."""
    from opd_lightning.rollout import Rollout

    completion = torch.tensor(completions)
    ids = torch.tensor([student(prompt, add_special_tokens=False)["input_ids"]] * len(completions))
    sequences = torch.cat([ids, completion], 1)
    return Rollout(sequences, torch.ones_like(sequences), torch.ones_like(completion, dtype=torch.bool), ids.shape[1],
                   torch.ones(len(completions), dtype=torch.bool), True)


@pytest.mark.parametrize("shift", [0.0, 95.0, -110.0])
def test_log_totals_equal_float64_logsumexp_on_runs_scattered_and_unsafe_rows(shift):
    """`log_totals` (exp straight from the logits a block at a time, then a sum) equals a float64 `logsumexp` of the
    same rows, also where a row's exp overflows (+95) or underflows (-110) and it is redone with its max subtracted."""
    from opd_lightning.aligners.rows import log_totals

    base = 4 * torch.randn(3, 9, 50, generator=torch.Generator().manual_seed(1))
    values = base[:, 2:] + shift
    values[1, 3] += 95.0 - shift  # one row overflows whatever the shift
    for batch, pos in ((torch.tensor([0, 0, 0, 1, 1, 2]), torch.tensor([4, 5, 6, 2, 3, 6])),
                       (torch.arange(21) % 3, torch.arange(21) % 7)):
        got = log_totals(values, batch, pos)
        want = torch.logsumexp(values[batch, pos].double(), -1)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shift", [0.0, 95.0, -110.0])
@pytest.mark.parametrize("name", ["byte_spans", "char_level", "vocab_map"])
def test_targets_from_exp_are_invariant_to_a_shift_of_the_teachers_logits(char_tok, shift, name):
    """A softmax ignores a constant added to a row's logits, so must the target: rows too large for exp (their
    sum overflows) or too small (probabilities would underflow without the max) are soft-maxed instead."""
    from opd_lightning.aligners import ALIGNERS

    from opd_lightning.tasks.arithmetic import bpe_tokenizer

    student = bpe_tokenizer()
    aligner = ALIGNERS.build(name)
    aligner.bind(student, char_tok, len(student), len(char_tok))
    text = student("12+34=46, 7-3=4, 81-9=72, 5+5=10", add_special_tokens=False)["input_ids"]
    rollout = _rollout_after(student, "12+", [text[:8], text[4:12]])
    inputs = aligner.teacher_inputs(rollout)
    logits = 5 * torch.randn(2, inputs.completion_length, len(char_tok), generator=torch.Generator().manual_seed(3))
    want = aligner.project(logits, inputs, rollout, frozenset({"teacher_logits"}))
    got = aligner.project(logits + shift, inputs, rollout, frozenset({"teacher_logits"}))
    assert want.mask.any() and torch.equal(got.mask, want.mask)
    torch.testing.assert_close(got.logits[got.mask], want.logits[want.mask], rtol=1e-4, atol=1e-4)
    if want.mass_coverage is not None:  # vocab_map's share of the row, from the same exp-and-sum
        assert got.mass_coverage == pytest.approx(want.mass_coverage, rel=1e-5)


def test_scratch_is_one_buffer_per_device_and_dtype_that_grows():
    from opd_lightning.buffers import scratch

    a = scratch(3, 7, torch.device("cpu"))
    assert a.shape == (3, 7) and a.dtype == torch.float32 and a.is_contiguous()
    b = scratch(2, 5, "cpu")  # smaller: the same memory again
    assert b.shape == (2, 5) and b.data_ptr() == a.data_ptr()
    big = scratch(40, 50, "cpu")  # larger than what is held: a new buffer, kept for the next call
    assert big.shape == (40, 50) and scratch(1, 2, "cpu").data_ptr() == big.data_ptr()
    other = scratch(2, 5, "cpu", torch.float64)
    assert other.dtype == torch.float64 and other.data_ptr() != big.data_ptr()


def test_target_buffer_is_reused_only_when_nothing_else_holds_it():
    """A projection's target memory is kept between calls on the CPU, and handed out again only once every tensor
    reading it is gone: while a caller, a view of it or autograd's saved tensors hold it, a call gets fresh memory and
    the held values stay as they were."""
    from opd_lightning.buffers import release, target_buffer

    release()
    first = target_buffer((2, 3, 5), "cpu", slot="test")
    ptr = first.data_ptr()
    first.fill_(1.0)
    held = target_buffer((2, 3, 5), "cpu", slot="test")  # `first` is alive: fresh memory
    assert held.data_ptr() != ptr
    held.fill_(2.0)
    assert torch.equal(first, torch.ones(2, 3, 5))
    view = first[1]
    del first, held
    assert target_buffer((2, 3, 5), "cpu", slot="test").data_ptr() != ptr  # a view still reads it
    del view
    again = target_buffer((2, 3, 5), "cpu", slot="test")
    assert again.data_ptr() == ptr  # dropped: the kept memory
    weight = torch.ones(2, 3, 5, requires_grad=True)
    loss = (weight * again).sum()  # autograd saves `again` for the backward pass
    del again
    assert target_buffer((2, 3, 5), "cpu", slot="test").data_ptr() != ptr
    loss.backward()
    del loss
    assert target_buffer((1, 4), "cpu", slot="test").data_ptr() == ptr  # smaller: the same memory
    bigger = target_buffer((7, 11), "cpu", slot="test")
    assert bigger.shape == (7, 11) and bigger.is_contiguous()
    release()


def test_conditional_gives_no_mass_to_a_path_longer_than_every_decomposition():
    """A student may spell a teacher token in more pieces than its own tokenizer does (sampled single bytes): such a
    path continues no decomposition, so its row keeps no mass (the aligner masks it), beside rows that do."""
    student, teacher = subset_pair(0.9)
    s_bytes, t_bytes = TokenBytes.from_tokenizer(student), TokenBytes.from_tokenizer(teacher)
    trie = TokenTrie(t_bytes, s_bytes, student, len(student))
    spell = spell_with_model(student, teacher, t_bytes)
    width = max(len(p) for p in spell.values())
    longest = next(p for p in spell.values() if len(p) == width)
    byte_ids = [i for i in range(len(student)) if s_bytes.table[i] and len(s_bytes.table[i]) == 1][: width + 2]
    paths = [longest[:1], tuple(byte_ids[: width + 1]), tuple(byte_ids), longest]
    probs = torch.softmax(torch.randn(len(paths), len(teacher), generator=torch.Generator().manual_seed(3)), -1)
    got = trie.conditional(probs, paths)
    torch.testing.assert_close(got[0].double(), subset_conditional(probs[0], paths[0], spell, len(student)))
    assert got[1:].sum() == 0  # too long (two lengths past the table), and a whole decomposition: no next token


def test_topk_to_logits_equals_the_dense_scatter_it_replaces(monkeypatch):
    """`topk_to_logits` (mined's target) equals `mass_to_logits` of the masses scattered into full rows: repeated ids
    summed, -1 dropped, a row that keeps nothing all zeros; `top_logprobs` equals softmax then top-k, read from a slice
    of a larger tensor (run by run, and from a copy), a bf16 one, rows in any order, and rows whose exp overflows or
    underflows."""
    from opd_lightning.aligners import rows
    from opd_lightning.aligners.rows import top_logprobs
    from opd_lightning.aligners.text import mass_to_logits, topk_to_logits

    values = torch.tensor([[0.5, 0.2, 0.1, 0.05], [0.3, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1]])
    ids = torch.tensor([[3, 1, 3, -1], [0, 2, 5, 2], [-1, -1, -1, -1]])
    dense = torch.zeros(3, 7)
    dense.scatter_add_(1, ids.clamp_min(0), values * (ids >= 0))
    want_logp, want_kept = mass_to_logits(dense.clone())
    logp, kept = topk_to_logits(values, ids, 7)
    assert torch.allclose(logp, want_logp, atol=1e-6) and torch.allclose(kept, want_kept)
    assert torch.equal(logp[2], torch.zeros(7)) and logp[0, 3] == pytest.approx(np.log(0.6 / 0.8), abs=1e-6)

    g = torch.Generator().manual_seed(0)
    full = torch.randn(3, 9, 50, generator=g) * 3
    batch, pos = torch.tensor([0, 0, 2, 1, 1]), torch.tensor([1, 2, 0, 5, 3])
    full[0, 3] += 100.0  # a row whose exp overflows, and one whose exp underflows: both soft-maxed instead
    full[1, 5] -= 120.0
    monkeypatch.setattr(rows, "BLOCK_ELEMENTS", 2 * 50)  # blocks of two rows
    for logits, run_elements in ((full[:, 2:], 0), (full[:, 2:], 2**16), (full[:, 2:].bfloat16(), 0)):
        monkeypatch.setattr(rows, "RUN_ELEMENTS", run_elements)
        top, idx = top_logprobs(logits, batch, pos, 4)
        ref = torch.softmax(logits[batch, pos].float(), -1).topk(4, -1)
        assert torch.equal(idx, ref.indices) and torch.allclose(top, ref.values, atol=1e-6)


@pytest.mark.parametrize("direct_width", [2**16, 0])
@pytest.mark.parametrize("pair", ["char_to_bpe", "subset"])
def test_vocab_map_target_equals_a_float64_softmax_over_the_matched_columns(char_tok, pair, direct_width, monkeypatch):
    """At every position with a target, `vocab_map`'s log-probs are the teacher's log-softmax over the tokens both
    vocabularies spell (float64 reference), placed at the student's ids, `LOG_FLOOR` at every other student id; its
    `mass_coverage` (measured at every position) is the mean share of the teacher's row those tokens hold. Both ways
    of reading the rows: straight into the student's order, and (as for a teacher wider than `DIRECT_WIDTH`) in the
    teacher's order, then permuted."""
    from opd_lightning.aligners import ALIGNERS
    from opd_lightning.aligners.rows import LOG_FLOOR

    from opd_lightning.tasks.arithmetic import bpe_tokenizer

    monkeypatch.setattr("opd_lightning.aligners.vocab_map.DIRECT_WIDTH", direct_width)

    student, teacher = (bpe_tokenizer(), char_tok) if pair == "char_to_bpe" else subset_pair(0.5)
    aligner = ALIGNERS.build("vocab_map", coverage_every=1)
    aligner.bind(student, teacher, len(student), len(teacher))
    text = "12+34=46, 7-3=4, 81-9=72, 5+5=10" if pair == "char_to_bpe" else TEXTS[0] + " " + TEXTS[1]
    ids = student(text, add_special_tokens=False)["input_ids"]
    rollout = _rollout_after(student, "12+", [ids[:10], ids[3:13]])
    inputs = aligner.teacher_inputs(rollout)
    logits = 4 * torch.randn(2, inputs.completion_length, len(teacher), generator=torch.Generator().manual_seed(5))
    got = aligner.project(logits, inputs, rollout, frozenset({"teacher_logits"}))
    s_ids, t_ids = aligner.matched
    at = inputs.alignment.teacher_at_start
    assert got.mask.any() and torch.equal(got.mask, (at >= 0) & rollout.completion_mask)
    shares = []
    for b, i in got.mask.nonzero().tolist():
        row = logits[b, at[b, i]].double()
        want = torch.full((len(student),), LOG_FLOOR, dtype=torch.float64)
        want[s_ids] = (row[t_ids] - torch.logsumexp(row[t_ids], -1)).clamp_min(LOG_FLOOR)
        torch.testing.assert_close(got.logits[b, i].double(), want, rtol=0, atol=2e-5)
        shares.append(float((torch.logsumexp(row[t_ids], -1) - torch.logsumexp(row, -1)).exp()))
    assert got.mass_coverage == pytest.approx(np.mean(shares), rel=1e-5)
    assert torch.equal(got.logits[~got.mask], torch.zeros_like(got.logits[~got.mask]))


@pytest.mark.parametrize("width", [8 * 40, 8 * 40 + 5, 8 * 39 + 7, 50])
def test_block_topk_equals_torch_topk(width):
    """`block_topk` (the k best blocks by their max, then the k best of their columns) gives `torch.topk`'s values
    and ids: whole blocks, a partial last block, and rows too narrow for blocks; here also on rows whose largest
    values crowd into one block and rows with a tied k-th value (the values then agree, the ids may not)."""
    from opd_lightning.aligners.rows import block_topk

    g = torch.Generator().manual_seed(width)
    rows = torch.randn(6, width, generator=g)
    rows[1, :10] += 20.0  # the k largest all in the first block
    rows[2, -3:] += 20.0  # in the last (partial) block
    values, ids = block_topk(rows, 5, block=8)
    want = torch.topk(rows, 5, -1)
    assert torch.equal(values, want.values) and torch.equal(ids, want.indices)
    tied = torch.zeros(2, width)
    tied[:, ::7] = 1.0  # many columns share the largest value
    values, ids = block_topk(tied, 5, block=8)
    assert torch.equal(values, torch.topk(tied, 5, -1).values) and bool((tied.gather(1, ids) == 1.0).all())


def test_mined_target_is_each_positions_teacher_topk_carried_to_the_nearest_spellings():
    """At every position with a target, `mined`'s log-probs are the teacher's top-k (float64 softmax of the row its
    edit-distance path pairs the position with) carried to each token's nearest student spelling, repeats summed,
    renormalised over the mass kept and floored at `LOG_FLOOR`; every other student id is `LOG_FLOOR`. On a subset
    pair the student tokens of one teacher token share its row, which is read once for them all."""
    from opd_lightning.aligners import ALIGNERS
    from opd_lightning.aligners.rows import LOG_FLOOR

    student, teacher = subset_pair(0.3)
    aligner = ALIGNERS.build("mined", topk=4)
    aligner.bind(student, teacher, len(student), len(teacher))
    ids = student(TEXTS[0] + " " + TEXTS[1], add_special_tokens=False)["input_ids"]
    rollout = _rollout_after(student, "Once ", [ids[:14], ids[5:19]])
    inputs = aligner.teacher_inputs(rollout)
    logits = 4 * torch.randn(2, inputs.completion_length, len(teacher), generator=torch.Generator().manual_seed(7))
    got = aligner.project(logits, inputs, rollout, frozenset({"teacher_logits"}))
    paired = aligner._aligned_positions(inputs.alignment, rollout)
    assert got.mask.any() and torch.equal(got.mask, (paired >= 0) & rollout.completion_mask)
    rows = [(b, int(paired[b, i])) for b, i in got.mask.nonzero().tolist()]
    assert len(set(rows)) < len(rows)  # some teacher rows serve several student positions
    for b, i in got.mask.nonzero().tolist():
        top = torch.softmax(logits[b, paired[b, i]].double(), -1).topk(4)
        mass = torch.zeros(len(student), dtype=torch.float64)
        for p, v in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            if aligner.nearest(v) >= 0:
                mass[aligner.nearest(v)] += p
        want = (mass / mass.sum()).clamp_min(torch.finfo(torch.float32).tiny).log().clamp_min(LOG_FLOOR)
        torch.testing.assert_close(got.logits[b, i].double(), want, rtol=0, atol=2e-5)
    assert torch.equal(got.logits[~got.mask], torch.zeros_like(got.logits[~got.mask]))
