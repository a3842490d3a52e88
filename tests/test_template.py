"""Templates: parsing, placement, soft tokens, truncation, answer modes, leading spaces, and a property test."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from ptune.errors import PtuneError
from ptune.template import SOFT_ID, TemplateRenderer, parse_template

from .helpers import LABELS, make_cfg, make_task

LONG = " ".join(f"word{i}" for i in range(40))


@pytest.fixture(scope="module")
def tok(tiny_models):
    return AutoTokenizer.from_pretrained(tiny_models["bert"])


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def renderer(tok, text: str, mode="mask", max_length=64, prepend=0, side="tail") -> TemplateRenderer:
    return TemplateRenderer(parse_template(text), tok, mode, max_length, prepend, side)


# ------------------------------------------------------------------------------------------------ parsing


def test_parse_segments_in_order():
    t = parse_template('Q: {text_a} {soft:2}{mask} and {text_b}{soft:"it was"}{ soft }')
    kinds = [(s.kind, s.value, s.count) for s in t.segments]
    assert kinds == [
        ("text", "Q: ", 0),
        ("field", "text_a", 0),
        ("text", " ", 0),
        ("soft", "", 2),
        ("mask", "", 0),
        ("text", " and ", 0),
        ("field", "text_b", 0),
        ("soft", "it was", 0),
        ("soft", "", 1),
    ]
    assert t.fields == ["text_a", "text_b"] and t.has_mask


@pytest.mark.parametrize(
    "text,needle",
    [
        ("", "empty"),
        ("{text_a} {mask} {mask}", "more than one"),
        ("{text_a} }", "unbalanced"),
        ("{text_a} {", "unbalanced"),
        ("It was {mask}.", "no input field"),
        ("{text_a} {soft:0}", ">= 1"),
        ('{text_a} {soft:" "}', "empty init words"),
        ("{text a} {mask}", "not valid"),
        ("{text_a} {soft:x}", "not valid"),
    ],
)
def test_parse_errors(text, needle):
    with pytest.raises(PtuneError, match=needle):
        parse_template(text)


# ---------------------------------------------------------------------------------------------- placement


def test_placement_of_fields_literals_mask_and_soft(tok):
    r = renderer(tok, "Premise: {text_a} {soft:2} Hypothesis: {text_b}? {mask}.")
    out = r.render({"text_a": "a fine film", "text_b": "it is good"})
    cls, sep, mask = tok.cls_token_id, tok.sep_token_id, tok.mask_token_id
    expected = (
        [cls]
        + enc(tok, "Premise:")
        + enc(tok, "a fine film")
        + [SOFT_ID, SOFT_ID]
        + enc(tok, "Hypothesis:")
        + enc(tok, "it is good")
        + enc(tok, "?")
        + [mask]
        + enc(tok, ".")
        + [sep]
    )
    assert out.input_ids == expected
    assert out.answer_pos == expected.index(mask) and out.truncated == 0


def test_missing_field_is_a_clear_error(tok):
    with pytest.raises(PtuneError, match=r"\{text_b\} is not in the data"):
        renderer(tok, "{text_a} {text_b} {mask}").render({"text_a": "x"})


# -------------------------------------------------------------------------------------------- soft tokens


def test_soft_token_counts(tok):
    words = "two words"
    assert len(enc(tok, words)) == 2
    r = renderer(tok, '{soft:3} {text_a} {soft:"two words"} {mask} {soft}', prepend=4)
    assert r.num_soft == 4 + 3 + 2 + 1
    assert r.soft_init_ids == [None] * 7 + enc(tok, words) + [None]
    out = r.render({"text_a": "fine"})
    assert out.input_ids.count(SOFT_ID) == r.num_soft
    # prepended soft tokens come right after [CLS], before the template
    assert out.input_ids[:8] == [tok.cls_token_id] + [SOFT_ID] * 7


def test_soft_init_words_count_from_the_tokenizer(tok):
    text = "unwatchable"  # un ##watch ##able
    r = renderer(tok, '{text_a} {soft:"unwatchable"} {mask}')
    assert r.num_soft == len(enc(tok, text)) == 3


# --------------------------------------------------------------------------------------------- truncation


@pytest.mark.parametrize("side", ["tail", "head"])
def test_truncation_cuts_the_field_and_keeps_template_and_mask(tok, side):
    r = renderer(tok, "{text_a} It was {mask}.", max_length=12, side=side)
    field = enc(tok, LONG)
    out = r.render({"text_a": LONG})
    fixed = [tok.cls_token_id] + enc(tok, "It was") + [tok.mask_token_id] + enc(tok, ".") + [tok.sep_token_id]
    keep = 12 - len(fixed)
    kept = field[:keep] if side == "tail" else field[-keep:]
    assert out.input_ids == [tok.cls_token_id] + kept + fixed[1:]
    assert len(out.input_ids) == 12 and out.truncated == len(field) - keep
    assert out.input_ids[out.answer_pos] == tok.mask_token_id


def test_multi_field_truncation_is_longest_first(tok):
    a, b = enc(tok, LONG), enc(tok, "a short one here")  # 4 tokens
    r = renderer(tok, "{text_a} [SEP] {text_b} {mask}", max_length=16)
    fixed = r.fixed_length()  # [CLS] [SEP] [MASK] [SEP]
    out = r.render({"text_a": LONG, "text_b": "a short one here"})
    budget = 16 - fixed
    assert out.input_ids[1 : 1 + budget - len(b)] == a[: budget - len(b)]  # only the long field was cut
    assert b == out.input_ids[-2 - len(b) : -2]
    # a tighter budget cuts both to (about) the same length
    r = renderer(tok, "{text_a} [SEP] {text_b} {mask}", max_length=fixed + 5)
    out = r.render({"text_a": LONG, "text_b": "a short one here"})
    sep = out.input_ids.index(tok.sep_token_id)
    kept_a, kept_b = out.input_ids[1:sep], out.input_ids[sep + 1 : -2]
    assert len(kept_a) + len(kept_b) == 5 and abs(len(kept_a) - len(kept_b)) <= 1
    assert kept_a == a[: len(kept_a)] and kept_b == b[: len(kept_b)]
    assert out.truncated == len(a) + len(b) - 5


def test_no_room_for_the_input_is_an_error(tok):
    with pytest.raises(PtuneError, match="leaving no room"):
        renderer(tok, "{text_a} It was {mask}.", max_length=6).render({"text_a": "fine"})


# ------------------------------------------------------------------------------------------- answer modes


@pytest.mark.parametrize("text", ["{mask} {text_a}", "{text_a} It was {mask}.", "{text_a} is good"])
def test_answer_mode_end_requires_mask_at_the_end(tok, text):
    with pytest.raises(PtuneError, match="must end with"):
        renderer(tok, text, mode="end")


def test_answer_mode_end_reads_the_last_template_token(tok):
    r = renderer(tok, "{text_a} It was {mask} \n", mode="end")  # trailing whitespace is fine
    out = r.render({"text_a": "fine"})
    assert out.input_ids == [tok.cls_token_id] + enc(tok, "fine") + enc(tok, "It was") + [tok.sep_token_id]
    assert out.answer_pos == len(out.input_ids) - 2  # 'was': its next-token logits give the answer


def test_answer_mode_mask_needs_a_mask_slot_and_token(tok):
    with pytest.raises(PtuneError, match="no \\{mask\\} slot"):
        renderer(tok, "{text_a} was good.")


def test_answer_mode_drop_and_none_have_no_slot_token(tok):
    for mode in ("drop", "none"):
        out = renderer(tok, "{text_a} It was {mask}.", mode=mode).render({"text_a": "fine"})
        assert tok.mask_token_id not in out.input_ids and out.answer_pos == -1


# ------------------------------------------------------------------------------- causal LM leading spaces


def _words(task) -> list[list[int]]:
    v = task.verbalizer
    return [v.token_ids[c, 0][v.token_mask[c, 0]].tolist() for c in range(len(LABELS))]


def test_causal_label_words_get_the_space_before_the_mask(tiny_bpe_gpt2):
    task = make_task(make_cfg(tiny_bpe_gpt2, "soft_prompt", family="causal", template="{text_a} It was {mask}"))
    tok = task.backbone.tokenizer
    assert enc(tok, " great") != enc(tok, "great")
    assert _words(task) == [enc(tok, " terrible"), enc(tok, " great")]
    # ... and the space moves from the template into the answer: the input ends with ' was', not ' '
    out = task.renderer.render({"text_a": "fine"})
    assert out.input_ids[-len(enc(tok, " It was")) :] == enc(tok, " It was")
    assert out.answer_pos == len(out.input_ids) - 1


def test_causal_label_words_without_space_before_the_mask(tiny_bpe_gpt2):
    task = make_task(make_cfg(tiny_bpe_gpt2, "soft_prompt", family="causal", template="{text_a} It was:{mask}"))
    tok = task.backbone.tokenizer
    assert _words(task) == [enc(tok, "terrible"), enc(tok, "great")]


# ------------------------------------------------------------------- literal spaces before a field (BPE)

REVIEW = "Review: {text_a}\nSentiment: {mask}"


def test_bpe_literal_before_a_field_has_no_standalone_space(tiny_bpe_gpt2):
    """'Review: ' + ' good' used to read 'Review:  good' (a lone space token); now it is plain tokenisation."""
    task = make_task(make_cfg(tiny_bpe_gpt2, "soft_prompt", family="causal", prompt_length=0, template=REVIEW))
    tok = task.backbone.tokenizer
    space = enc(tok, " ")
    assert len(space) == 1 and enc(tok, "Review: ")[-1:] == space  # the bug's precondition on this tokenizer
    out = task.renderer.render({"text_a": "great fun"})  # ' great' and ' fun' are single tokens here
    r = task.renderer
    assert out.input_ids == r.prefix_ids + enc(tok, "Review: great fun\nSentiment:") + r.suffix_ids
    assert space[0] not in out.input_ids
    assert out.answer_pos == len(out.input_ids) - len(r.suffix_ids) - 1


@pytest.mark.parametrize("mode", ["end", "drop"])
def test_sentencepiece_literal_before_a_field_has_no_standalone_space(metaspace_tok, mode):
    tok = metaspace_tok
    assert enc(tok, "Review: ")[-1:] == enc(tok, " ")  # a trailing '▁' piece: the bug's precondition
    r = renderer(tok, REVIEW, mode=mode)
    out = r.render({"text_a": "good movie"})
    plain = enc(tok, "Review: good movie")  # (this toy vocab merges across '\n', so compare up to the field's end)
    assert out.input_ids[: len(r.prefix_ids) + len(plain)] == r.prefix_ids + plain
    if mode == "end":  # ("drop" keeps the literal's space before the dropped slot, as before)
        assert enc(tok, " ")[0] not in out.input_ids


def test_field_space_is_decided_on_the_original_template(tiny_bpe_gpt2):
    """A field used twice gets its space from its first placeholder; the second literal keeps its own space."""
    tok = AutoTokenizer.from_pretrained(tiny_bpe_gpt2)
    r = renderer(tok, "{text_a} vs: {text_a}", mode="none")
    assert r.field_text({"text_a": " good "}, "text_a") == "good"
    assert tok.decode(r.render({"text_a": "good"}).input_ids) == "good vs: good"
    # the literal before a spaced field drops its space, but the field still carries one
    r = renderer(tok, "A: {text_a} B: {text_b}", mode="none")
    assert r.field_text({"text_a": "x", "text_b": "y"}, "text_b") == " y"
    ids = r.render({"text_a": "It was", "text_b": "great fun"}).input_ids
    assert ids == enc(tok, "A: It was B: great fun") and tok.decode(ids) == "A: It was B: great fun"
    # an empty field adds no lone space token either
    assert r.render({"text_a": "", "text_b": "fun"}).input_ids == enc(tok, "A: B: fun")


# ------------------------------------------------------------------ special-token strings in user text


def test_special_token_strings_in_a_field_are_plain_text(tok):
    r = renderer(tok, "{text_a} It was {mask}.")
    out = r.render({"text_a": "a [MASK] of a film [SEP] [CLS] <s>"})
    ids = out.input_ids
    assert ids.count(tok.mask_token_id) == 1 and ids[out.answer_pos] == tok.mask_token_id
    assert out.answer_pos == len(ids) - 3  # the template's own slot, before '.' and [SEP]
    assert ids.count(tok.sep_token_id) == 1 and ids.count(tok.cls_token_id) == 1  # only the frame's
    assert enc(tok, "[ mask ]") == ids[2:5]  # read as the characters '[', 'mask', ']'
    # template literals may still name special tokens on purpose
    r2 = renderer(tok, "{text_a} [SEP] {text_b} {mask}")
    ids2 = r2.render({"text_a": "x [SEP]", "text_b": "y"}).input_ids
    assert ids2.count(tok.sep_token_id) == 2  # the template's and the frame's, not the field's


# ---------------------------------------------------------------------------------------- property test

PIECES = st.one_of(
    st.text(max_size=6),
    st.sampled_from(
        [
            "{text_a}",
            "{text_b}",
            "{other}",
            "{mask}",
            "{soft}",
            "{soft:2}",
            '{soft:"it was"}',
            "{soft:0}",
            "{ mask }",
            " It was ",
            ":",
            "\n",
            "[SEP]",
            "{",
            "}",
        ]
    ),
)
ATOMS = st.one_of(
    st.sampled_from(["{text_b}", "{soft}", "{soft:2}", '{soft:"it was"}', " It was ", ":", "\n", "[SEP]", " ", "?"]),
    st.text(max_size=4).filter(lambda t: "{" not in t and "}" not in t),
)


@st.composite
def templates(draw) -> str:
    """Mostly well-formed templates (a field, maybe a mask, at the end or anywhere), sometimes garbage."""
    if draw(st.integers(0, 4)) == 0:
        return "".join(draw(st.lists(PIECES, max_size=7)))
    parts = draw(st.lists(ATOMS, max_size=6))
    parts.insert(draw(st.integers(0, len(parts))), "{text_a}")
    if draw(st.integers(0, 5)):
        parts.insert(len(parts) if draw(st.booleans()) else draw(st.integers(0, len(parts))), "{mask}")
    return "".join(parts)


VALUES = st.one_of(
    st.text(max_size=60),
    st.sampled_from(["", "   ", LONG, "[MASK]", "[CLS] x [SEP]", "N/A", "😀" * 5, "\u2603 \u0000"]),
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    source=templates(),
    a=VALUES,
    b=VALUES,
    mode=st.sampled_from(["mask", "end", "drop", "none"]),
    max_length=st.integers(1, 64),
    prepend=st.integers(0, 4),
    side=st.sampled_from(["tail", "head"]),
)
def test_renderer_property(tok, source, a, b, mode, max_length, prepend, side):
    try:
        r = TemplateRenderer(parse_template(source), tok, mode, max_length, prepend, side)
        out = r.render({"text_a": a, "text_b": b})
    except PtuneError as exc:
        assert str(exc) and "\n" not in str(exc).strip()  # one-line user error
        return
    _check_rendered(tok, source, r, out, mode, max_length)


@st.composite
def valid_templates(draw) -> str:
    """Templates every renderer must accept: a field and the answer slot at the end, few template tokens."""
    parts = draw(st.lists(ATOMS, max_size=6))
    parts.insert(draw(st.integers(0, len(parts))), "{text_a}")
    return "".join(parts) + "{mask}"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    source=valid_templates(),
    a=VALUES,
    b=VALUES,
    mode=st.sampled_from(["mask", "end", "drop", "none"]),
    prepend=st.integers(0, 4),
    side=st.sampled_from(["tail", "head"]),
)
def test_valid_templates_always_render(tok, source, a, b, mode, prepend, side):
    """The property above accepts any one-line error; here nothing may be refused (a renderer that rejected every
    template would pass the property above, not this one). 64 tokens leave room for the longest template drawn."""
    r = TemplateRenderer(parse_template(source), tok, mode, 64, prepend, side)
    _check_rendered(tok, source, r, r.render({"text_a": a, "text_b": b}), mode, 64)


def _check_rendered(tok, source, r, out, mode, max_length):
    assert len(out.input_ids) <= max_length
    assert out.input_ids.count(SOFT_ID) == r.num_soft
    assert all(isinstance(i, int) and (i == SOFT_ID or 0 <= i < len(tok)) for i in out.input_ids)
    if mode == "mask":
        assert 0 <= out.answer_pos < len(out.input_ids)
        assert out.input_ids[out.answer_pos] == tok.mask_token_id
        if "[MASK]" not in source:  # field values (VALUES has "[MASK]") never add a mask token
            assert out.input_ids.count(tok.mask_token_id) == 1
    elif mode == "end":
        assert out.answer_pos == len(out.input_ids) - len(r.suffix_ids) - 1
    else:
        assert out.answer_pos == -1
