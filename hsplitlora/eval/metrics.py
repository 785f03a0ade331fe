"""The five E2E NLG challenge metrics (BLEU, NIST, METEOR, ROUGE-L, CIDEr), as its scorer has them.

The reference is ``measure_scores.py -p`` of tuetschek/e2e-metrics: BLEU and NIST on lowercased
mteval-v13a tokens of the raw text; METEOR 1.5, ROUGE-L and CIDEr-D (the MS-COCO caption code,
here pycocoevalcap) on lowercased Stanford PTB tokens with punctuation removed. All five are
corpus-level over multi-reference segments; BLEU, METEOR and ROUGE-L are in [0, 1].

Java runs the PTB tokenizer and METEOR. Without it, METEOR is reported unavailable (with the
reason) and ROUGE-L / CIDEr use a pure-Python PTB approximation that reproduces the Java
tokens on every E2E reference, so only METEOR is lost.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pycocoevalcap.meteor.meteor as _coco_meteor
import pycocoevalcap.tokenizer.ptbtokenizer as _coco_ptb
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from sacrebleu.metrics.bleu import BLEU
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from hsplitlora.eval.nist import corpus_nist

__all__ = ["METRIC_NAMES", "Scores", "load_fixture", "score"]

log = logging.getLogger(__name__)

# Names and order exactly as the E2E scorer prints them.
METRIC_NAMES = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")

# The scorer's BLEU never smooths; it only floors a zero hit count at 1e-15 so log() is defined.
_BLEU = BLEU(lowercase=True, tokenize="13a", smooth_method="floor", smooth_value=1e-15)
_TOKENIZE_13A = Tokenizer13a()

_PTB_JAR = Path(_coco_ptb.__file__).parent / _coco_ptb.STANFORD_CORENLP_3_4_1_JAR
_METEOR_JAR = Path(_coco_meteor.__file__).parent / _coco_meteor.METEOR_JAR
_PTB_DROP = frozenset(_coco_ptb.PUNCTUATIONS)
# Ends every PTB batch so that trailing lines which tokenise to nothing can't vanish unnoticed.
_SENTINEL = "sentinel"


@dataclass(frozen=True)
class Scores:
    """Corpus scores on the scorer's scales (BLEU, METEOR, ROUGE-L in [0, 1]; CIDEr x10)."""

    bleu: float
    nist: float
    meteor: float | None  # None when METEOR could not run; the reason is in `unavailable`
    rouge_l: float
    cider: float
    unavailable: dict[str, str] = field(default_factory=dict)  # metric name -> why it is None
    notes: dict[str, str] = field(default_factory=dict)  # deviations from the official run

    def as_dict(self) -> dict[str, float | None | dict[str, str]]:
        """JSON-ready dict keyed by the scorer's metric names, plus `unavailable` and `notes`."""
        values = (self.bleu, self.nist, self.meteor, self.rouge_l, self.cider)
        out: dict[str, float | None | dict[str, str]] = dict(zip(METRIC_NAMES, values, strict=True))
        out["unavailable"] = dict(self.unavailable)
        out["notes"] = dict(self.notes)
        return out


def load_fixture(hyps_path: str | Path, refs_path: str | Path) -> tuple[list[str], list[list[str]]]:
    """Read a hypotheses file and a references file the way the E2E scorer reads them.

    Hypotheses: one per line. References: one per line, the references of one hypothesis on
    consecutive lines, groups separated by one empty line, in hypothesis order. A references
    file without any empty line holds one reference per hypothesis. Lines are stripped.
    """
    hyps = [line.strip() for line in Path(hyps_path).read_text(encoding="utf-8").splitlines()]
    groups: list[list[str]] = [[]]
    for lineno, raw in enumerate(Path(refs_path).read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if line:
            groups[-1].append(line)
        elif groups[-1]:
            groups.append([])
        else:
            raise ValueError(
                f"{refs_path}:{lineno}: empty reference group (an empty line right after "
                "another empty line or at the start); separate groups with exactly one empty line"
            )
    if not groups[-1]:
        groups.pop()  # one empty line at the end of the file closes the last group
    if len(groups) == 1:
        groups = [[ref] for ref in groups[0]]
    if len(groups) != len(hyps):
        raise ValueError(
            f"{refs_path} has {len(groups)} reference groups but {hyps_path} has {len(hyps)} "
            "hypotheses; give one group (references separated from the next group by one "
            "empty line) per hypothesis line"
        )
    return hyps, groups


def score(hypotheses: list[str], references: list[list[str]]) -> Scores:
    """Score hypotheses against their reference groups (``references[i]`` belongs to
    ``hypotheses[i]``) with the E2E challenge's five metrics.

    Takes about 10 s on the E2E test set with Java, most of it METEOR's JVM loading its
    paraphrase table (it needs ~1.2 GB of memory); without Java, a few seconds.
    """
    _check_inputs(hypotheses, references)
    unavailable: dict[str, str] = {}
    notes: dict[str, str] = {}

    # sacrebleu wants one stream per reference slot; None pads the slots a segment lacks
    # (documented in sacrebleu, though its type hints say str).
    ref_streams = [
        [group[k] if k < len(group) else None for group in references]
        for k in range(max(len(group) for group in references))
    ]
    bleu = _BLEU.corpus_score(hypotheses, ref_streams).score / 100.0  # type: ignore[arg-type]
    nist = corpus_nist(
        [_mteval_tokens(hyp) for hyp in hypotheses],
        [[_mteval_tokens(ref) for ref in group] for group in references],
    )

    flat_refs = [ref for group in references for ref in group]
    java = shutil.which("java")
    if java is None:
        unavailable["METEOR"] = (
            "no `java` executable on PATH; METEOR 1.5 is a Java program. Install a Java "
            "runtime (e.g. OpenJDK 17) to get METEOR"
        )
    ptb, fallback_note = _ptb_tokenize(hypotheses + flat_refs, java)
    if fallback_note:
        notes["PTB"] = fallback_note
        log.warning("%s", fallback_note)

    res = {i: [" ".join(tokens)] for i, tokens in enumerate(ptb[: len(hypotheses)])}
    gts: dict[int, list[str]] = {}
    pos = len(hypotheses)
    for i, group in enumerate(references):
        gts[i] = [" ".join(tokens) for tokens in ptb[pos : pos + len(group)]]
        pos += len(group)
    rouge_l = float(Rouge().compute_score(gts, res)[0])
    cider = float(Cider().compute_score(gts, res)[0])

    meteor: float | None = None
    if java is not None:
        try:
            meteor = _meteor(gts, res, java)
        except RuntimeError as exc:
            unavailable["METEOR"] = str(exc)
    if "METEOR" in unavailable:
        log.warning("METEOR unavailable: %s", unavailable["METEOR"])
    return Scores(bleu, nist, meteor, rouge_l, cider, unavailable, notes)


def _check_inputs(hypotheses: list[str], references: list[list[str]]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(
            f"score(): {len(hypotheses)} hypotheses but {len(references)} reference groups; "
            "references[i] must be the list of references of hypotheses[i]"
        )
    if not hypotheses:
        raise ValueError("score(): no hypotheses; the corpus scores need at least one segment")
    for i, (hyp, group) in enumerate(zip(hypotheses, references, strict=True)):
        if not isinstance(hyp, str):
            raise TypeError(f"score(): hypotheses[{i}] is {type(hyp).__name__}, expected str")
        if isinstance(group, str) or not group:
            raise ValueError(
                f"score(): references[{i}] must be a non-empty list of reference strings, "
                f"got {group!r}"
            )
        for j, ref in enumerate(group):
            if not isinstance(ref, str):
                raise TypeError(
                    f"score(): references[{i}][{j}] is {type(ref).__name__}, expected str"
                )


def _mteval_tokens(text: str) -> list[str]:
    """Lowercased mteval-v13a tokens (the scorer tokenises first, then lowercases)."""
    return _TOKENIZE_13A(text).lower().split()


def _ptb_tokenize(texts: list[str], java: str | None) -> tuple[list[list[str]], str | None]:
    """PTB tokens of every text from the Java tokenizer, or from the Python stand-in when Java
    is missing or fails; the second value then says so, for `Scores.notes`."""
    if java is not None:
        try:
            return _ptb_tokens_java(texts, java), None
        except RuntimeError as exc:
            why = f"the Java PTB tokenizer failed ({exc})"
    else:
        why = "no `java` executable on PATH"
    note = (
        f"{why}; ROUGE_L and CIDEr used the pure-Python PTB approximation (the same tokens "
        "as Java on all E2E references, may differ on unusual text)"
    )
    return [_ptb_tokens_python(text) for text in texts], note


def _ptb_tokens_java(texts: list[str], java: str) -> list[list[str]]:
    """Stanford PTBTokenizer 3.4.1 as the COCO code runs it, punctuation removed.

    One text per line (``-preserveLines``), so each text's own line breaks become spaces.
    """
    lines = [" ".join(text.split()) for text in texts] + [_SENTINEL]
    cmd = [java, "-cp", str(_PTB_JAR), "edu.stanford.nlp.process.PTBTokenizer",
           "-preserveLines", "-lowerCase", "-encoding", "utf-8"]  # fmt: skip
    try:
        proc = subprocess.run(cmd, input="\n".join(lines).encode("utf-8"), capture_output=True)
    except OSError as exc:
        raise RuntimeError(f"could not start {cmd[0]}: {exc}") from exc
    if proc.returncode != 0:
        stderr = proc.stderr.decode("utf-8", "replace").strip()[-500:]
        raise RuntimeError(f"{_PTB_JAR.name} exited with status {proc.returncode}: {stderr}")
    out = proc.stdout.decode("utf-8")
    out_lines = (out[:-1] if out.endswith("\n") else out).split("\n")
    if len(out_lines) != len(lines) or out_lines[-1] != _SENTINEL:
        raise RuntimeError(
            f"{_PTB_JAR.name} returned {len(out_lines)} lines for {len(lines)} input lines"
        )
    return [[w for w in line.split() if w not in _PTB_DROP] for line in out_lines[:-1]]


# --- pure-Python stand-in for the PTB tokenizer -------------------------------------------
# Mirrors what PTBTokenizer 3.4.1 (-lowerCase) does to English restaurant-review text: currency
# normalisation (£ -> #), clitic splitting (isn't -> is n't), hyphenated words and numbers
# kept whole, a word's final period kept only for abbreviations or before , ; : ("center.,").
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})
_SYMBOLS = {"£": "#", "€": "$", "¢": "cents", "(": "-lrb-", ")": "-rrb-", "[": "-lsb-",
            "]": "-rsb-", "{": "-lcb-", "}": "-rcb-", '"': "''"}  # fmt: skip
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr etc vs inc ltd co corp mt ave rd jan feb aug sept oct nov dec "
    "ft gov rev capt sgt gen col lt".split()
)
_SPLIT_WORDS = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"],
                "wanna": ["wan", "na"]}  # fmt: skip
_CLITIC = re.compile(r"(.+?)(n't|'s|'re|'ve|'ll|'d|'m)", re.DOTALL)
_ACRONYM = re.compile(r"(?:[^\W\d_]\.)+[^\W\d_]")
_PTB_TOKEN = re.compile(
    r"""(?P<number>(?<![^\s£$€¥#])-\d+(?:[.,:/]\d+)*)   # signed number: "£-25" -> # -25
      | (?P<word>\w+(?:(?:[-/']|(?<=\d)[.,:](?=\d)|\.(?=[^\W\d_]))\w+)*)
      | \.\.\. | -- | [?!]+
      | \S""",
    re.VERBOSE,
)


def _ptb_tokens_python(text: str) -> list[str]:
    """Lowercased PTB-style tokens with the COCO punctuation removed, without Java."""
    text = text.translate(_QUOTES)
    tokens: list[str] = []
    end = 0
    for match in _PTB_TOKEN.finditer(text):
        if match.start() < end:  # the period was glued to the previous word
            continue
        token, end = match.group().lower(), match.end()
        if match.lastgroup == "word":
            after = text[end : end + 2]
            abbreviation = token in _ABBREVIATIONS or _ACRONYM.fullmatch(token) is not None
            if (
                after[:1] == "."
                and after != ".."
                and (abbreviation or after[1:] in (",", ";", ":"))
            ):
                token, end = token + ".", end + 1
            if token in _SPLIT_WORDS:
                tokens.extend(_SPLIT_WORDS[token])
                continue
            clitic = _CLITIC.fullmatch(token)
            if clitic:
                tokens.extend(clitic.groups())
                continue
        tokens.append(_SYMBOLS.get(token, token))
    return [token for token in tokens if token not in _PTB_DROP]


def _meteor(gts: dict[int, list[str]], res: dict[int, list[str]], java: str) -> float:
    """Corpus METEOR 1.5 (``-l en -norm``) from the jar bundled with pycocoevalcap.

    Speaks the jar's ``-stdio`` protocol as pycocoevalcap's ``Meteor`` does: one ``SCORE``
    line per segment returns its statistics, then one ``EVAL`` line over all of them returns
    the segment scores and, last, the corpus score (aggregated statistics, not a mean).
    Our own client because pycocoevalcap's holds a lock that its ``__del__`` takes again, so
    a JVM failing mid-run deadlocks there; here it becomes an error carrying java's stderr.
    """
    cmd = [java, "-jar", "-Xmx2G", str(_METEOR_JAR), "-", "-", "-stdio", "-l", "en", "-norm"]
    with tempfile.TemporaryFile() as stderr:
        try:
            proc = subprocess.Popen(
                cmd, cwd=_METEOR_JAR.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=stderr,
            )  # fmt: skip
        except OSError as exc:
            raise RuntimeError(f"could not start {java}: {exc}") from exc
        try:
            stats = []
            for key, refs in gts.items():
                hyp = res[key][0].replace("|||", "").replace("  ", " ")
                _meteor_send(proc, " ||| ".join(["SCORE", *refs, hyp]))
                stats.append(_meteor_receive(proc))
            _meteor_send(proc, " ||| ".join(["EVAL", *stats]))
            replies = [_meteor_receive(proc) for _ in range(len(stats) + 1)]
            return float(replies[-1])  # segment scores first, the corpus score last
        except (OSError, ValueError, RuntimeError) as exc:
            _stop(proc)
            stderr.seek(0)
            said = stderr.read().decode("utf-8", "replace").strip()[-500:] or "(nothing)"
            raise RuntimeError(
                f"METEOR ({_METEOR_JAR.name}) failed: {exc}; java said: {said}"
            ) from exc
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Kill and reap the process; a pipe it already broke is no error here."""
    proc.kill()
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    proc.wait()


def _meteor_send(proc: subprocess.Popen[bytes], line: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write((line + "\n").encode("utf-8"))
    proc.stdin.flush()


def _meteor_receive(proc: subprocess.Popen[bytes]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline().decode("utf-8").strip()
    if not line:
        raise RuntimeError("the METEOR process closed its output early")
    return line
