"""The E2E metrics agree with the official scorer's numbers, with and without Java."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from hsplitlora.eval.metrics import (
    METRIC_NAMES,
    Scores,
    _ptb_tokens_java,
    _ptb_tokens_python,
    load_fixture,
    score,
)
from hsplitlora.eval.nist import corpus_nist, length_penalty

_REPO = Path(__file__).resolve().parents[2]
_FIXTURE = next(
    (
        d
        for d in (_REPO / "data/e2e/metrics-fixture", Path("/work/shared/data/e2e/metrics-fixture"))
        if (d / "expected.json").is_file()
    ),
    None,
)
needs_fixture = pytest.mark.skipif(_FIXTURE is None, reason="E2E metrics fixture not found")
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="no java on PATH")
TOLERANCE = 5e-5  # expected.json's printed values are '%.4f'


def _expected(name: str) -> dict:
    assert _FIXTURE is not None
    return json.loads((_FIXTURE / "expected.json").read_text())["fixtures"][name]


def _load(name: str) -> tuple[list[str], list[list[str]]]:
    assert _FIXTURE is not None
    fixture = _expected(name)
    return load_fixture(_FIXTURE / fixture["hyps"], _FIXTURE / fixture["refs"])


def _assert_matches(scores: Scores, name: str, skip: tuple[str, ...] = ()) -> None:
    got = scores.as_dict()
    for metric in METRIC_NAMES:
        if metric in skip:
            continue
        want = float(_expected(name)["printed"][metric])
        assert got[metric] == pytest.approx(want, abs=TOLERANCE), metric


@pytest.fixture
def no_java(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PATH on which there is no java (and nothing else)."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))


# --- the official numbers ---------------------------------------------------------------
@pytest.fixture(scope="module")
def java_scores() -> dict[str, Scores]:
    """Each fixture scored once with Java (METEOR's JVM takes ~5 s to start)."""
    return {name: score(*_load(name)) for name in ("a100", "a")}


@needs_fixture
@needs_java
@pytest.mark.parametrize("name", ["a100", "a"])
def test_all_five_match_official_scorer(java_scores: dict[str, Scores], name: str) -> None:
    scores = java_scores[name]
    assert scores.unavailable == {} and scores.notes == {}
    _assert_matches(scores, name)


@needs_fixture
@needs_java
def test_subset_has_its_own_cider_and_nist(java_scores: dict[str, Scores]) -> None:
    # idf (CIDEr) and information weights (NIST) come from the evaluated references only
    assert java_scores["a100"].cider == pytest.approx(2.8858, abs=TOLERANCE)
    assert java_scores["a"].cider == pytest.approx(2.0372, abs=TOLERANCE)
    assert java_scores["a100"].nist != pytest.approx(java_scores["a"].nist, abs=0.1)


@needs_fixture
def test_without_java_meteor_is_unavailable_and_the_rest_still_match(no_java: None) -> None:
    scores = score(*_load("a100"))
    assert scores.meteor is None
    assert "java" in scores.unavailable["METEOR"]
    assert "pure-Python" in scores.notes["PTB"]
    _assert_matches(scores, "a100", skip=("METEOR",))
    assert scores.as_dict()["METEOR"] is None


def test_broken_java_reports_its_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "java"
    fake.write_text("#!/bin/sh\necho 'JVM refused to start' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    scores = score(["the cat sat on the mat ."], [["the cat sat on the mat ."]])
    assert scores.meteor is None
    assert "JVM refused to start" in scores.unavailable["METEOR"]
    assert "JVM refused to start" in scores.notes["PTB"]
    assert scores.bleu == pytest.approx(1.0) and scores.rouge_l == pytest.approx(1.0)


# --- BLEU / NIST details ----------------------------------------------------------------
def test_bleu_and_nist_ignore_case_and_split_punctuation(no_java: None) -> None:
    hyp = "The Cat sat on the mat, didn't it?"
    ref = "the cat sat on the mat , didn't it ?"  # mteval-v13a keeps the apostrophe
    same = score([hyp], [[ref]])
    assert same.bleu == pytest.approx(1.0)
    assert same.nist == pytest.approx(score([ref], [[ref]]).nist)
    assert same.rouge_l == pytest.approx(1.0)


def test_bleu_brevity_penalty_uses_closest_reference(no_java: None) -> None:
    hyp = "a b c d e f"
    # the 6-token reference is closest, so no brevity penalty despite a longer one
    assert score([hyp], [["a b c d e f", "a b c d e f g h i j"]]).bleu == pytest.approx(1.0)
    # half as long as the only reference: BLEU = exp(1 - 12/6) * precision(=1)
    long_ref = "a b c d e f g h i j k l"
    assert score([hyp], [[long_ref]]).bleu == pytest.approx(math.exp(-1.0))


def test_nist_hand_computed() -> None:
    # ref counts: 6 tokens; a:2 b:2 c:1 d:1; ab:2 bc:1 bd:1; abc:1 abd:1
    hyp = [["a", "b", "c"]]
    refs = [[["a", "b", "c"], ["a", "b", "d"]]]
    unigram = (2 * math.log2(6 / 2) + math.log2(6 / 1)) / 3
    bigram = (math.log2(2 / 2) + math.log2(2 / 1)) / 2
    trigram = math.log2(2 / 1) / 1
    assert corpus_nist(hyp, refs) == pytest.approx(unigram + bigram + trigram)


def test_nist_length_penalty_follows_mteval_beta() -> None:
    assert length_penalty(2.0, 3.0) == pytest.approx(0.5)  # beta is defined by this point
    assert length_penalty(3.0, 3.0) == 1.0
    assert length_penalty(9.0, 3.0) == 1.0
    assert length_penalty(0.0, 3.0) == 0.0
    assert length_penalty(1.0, 3.0) < length_penalty(2.0, 3.0)


def test_nist_penalises_by_mean_reference_length() -> None:
    # the output matches the 2-token reference exactly, but NIST compares with the mean
    # reference length (2 + 4) / 2 = 3, so the penalty is 0.5; counts: 6 tokens, a:2, ab:2
    refs = [[["a", "b"], ["a", "b", "c", "d"]]]
    info = (2 * math.log2(6 / 2)) / 2 + math.log2(2 / 2) / 1
    assert corpus_nist([["a", "b"]], refs) == pytest.approx(0.5 * info)


# --- PTB tokens -------------------------------------------------------------------------
PTB_CASES = [
    ("Eagle's isn't £20-25. Café", ["eagle", "'s", "is", "n't", "#", "20-25", "café"]),
    (
        "in the city center., near Burger King.",
        ["in", "the", "city", "center.", "near", "burger", "king"],
    ),
    ("A (good) place -- really", ["a", "-lrb-", "good", "-rrb-", "place", "really"]),
    ("cannot GONNA Don't", ["can", "not", "gon", "na", "do", "n't"]),
    ("Known as 'average' and \"The Punter\"", ["known", "as", "average", "and", "the", "punter"]),
    ("price range of 20£-25", ["price", "range", "of", "20", "#", "-25"]),
    (
        "Mr. Smith etc. U.K. e.g. 30.99 5:30",
        ["mr.", "smith", "etc.", "u.k.", "e.g.", "30.99", "5:30"],
    ),
    ("It\u2019s \u201cquoted\u201d", ["it", "'s", "quoted"]),
    ("multi\nline\r\ntext", ["multi", "line", "text"]),
    ("  ", []),
]


@pytest.mark.parametrize(("text", "tokens"), PTB_CASES)
def test_python_ptb_tokens(text: str, tokens: list[str]) -> None:
    assert _ptb_tokens_python(text) == tokens


@needs_java
def test_java_ptb_agrees_on_the_cases() -> None:
    java = shutil.which("java")
    assert java is not None
    assert _ptb_tokens_java([text for text, _ in PTB_CASES], java) == [t for _, t in PTB_CASES]


@needs_fixture
@needs_java
def test_python_ptb_equals_java_on_every_fixture_line() -> None:
    hyps, refs = _load("a")
    texts = hyps + [ref for group in refs for ref in group]
    java = shutil.which("java")
    assert java is not None
    assert _ptb_tokens_java(texts, java) == [_ptb_tokens_python(text) for text in texts]


# --- inputs, files, output --------------------------------------------------------------
def test_load_fixture_groups_references(tmp_path: Path) -> None:
    (tmp_path / "h.txt").write_text("first hyp\n second hyp \n")
    (tmp_path / "r.txt").write_text("r1a\nr1b  \n\nr2a\n\n")  # one trailing empty line is fine
    hyps, refs = load_fixture(tmp_path / "h.txt", tmp_path / "r.txt")
    assert hyps == ["first hyp", "second hyp"]
    assert refs == [["r1a", "r1b"], ["r2a"]]


def test_load_fixture_without_empty_lines_is_single_reference(tmp_path: Path) -> None:
    (tmp_path / "h.txt").write_text("x\ny\n")
    (tmp_path / "r.txt").write_text("rx\nry\n")
    assert load_fixture(tmp_path / "h.txt", tmp_path / "r.txt")[1] == [["rx"], ["ry"]]


def test_load_fixture_errors_name_the_problem(tmp_path: Path) -> None:
    (tmp_path / "h.txt").write_text("x\ny\n")
    (tmp_path / "r.txt").write_text("rx\n\n\nry\n")
    with pytest.raises(ValueError, match=r"r\.txt:3: empty reference group"):
        load_fixture(tmp_path / "h.txt", tmp_path / "r.txt")
    (tmp_path / "r.txt").write_text("a\n\nb\n\nc\n")
    with pytest.raises(ValueError, match="3 reference groups but .* has 2 hypotheses"):
        load_fixture(tmp_path / "h.txt", tmp_path / "r.txt")


@needs_fixture
def test_load_fixture_reads_the_official_files() -> None:
    for name in ("a100", "a"):
        hyps, refs = _load(name)
        assert len(hyps) == len(refs) == _expected(name)["n_instances"]
        assert sum(len(group) for group in refs) == _expected(name)["n_references"]
    assert _load("a")[0][0] == "Spice blue is a coffee shop city centre."


def test_score_rejects_malformed_input() -> None:
    with pytest.raises(ValueError, match="2 hypotheses but 1 reference groups"):
        score(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match=r"references\[1\] must be a non-empty list"):
        score(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match=r"references\[0\] must be a non-empty list"):
        score(["a"], ["a"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"references\[0\]\[1\] is int"):
        score(["a"], [["a", 3]])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="no hypotheses"):
        score([], [])


def test_as_dict_uses_the_scorer_names() -> None:
    scores = Scores(0.7, 9.3, None, 0.89, 2.9, unavailable={"METEOR": "no java"})
    assert scores.as_dict() == {
        "BLEU": 0.7,
        "NIST": 9.3,
        "METEOR": None,
        "ROUGE_L": 0.89,
        "CIDEr": 2.9,
        "unavailable": {"METEOR": "no java"},
        "notes": {},
    }
    assert list(scores.as_dict())[:5] == list(METRIC_NAMES)
