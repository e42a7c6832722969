"""The labelled redaction corpus: recall and precision of the detectors, and throughput.

Records are prose with one planted value (of a known type) or with a look-alike that is not PII
(order numbers, UUIDs, timestamps, prices, versions, model names, hashes). Recall counts planted
values fully covered by a finding; precision counts findings that cover a planted value;
"untouched" is the share of look-alike records with no finding at all.

Then texts made to be slow (``SLOW_TEXTS``), each at 1 MiB (the payload limit's default) and
4 MiB: MB/s of ``find`` at 1 MiB, against the corpus's MB/s, and how much more than four times
the 1 MiB text's time the 4 MiB text took (1.0: linear; a quadratic pass gives about 4). Below
1 MiB a text's growth is blurred by the processor's caches (a run of key headers took 1.3 ms at
100 KiB, 32 ms at 1 MiB and 126 ms at 4 MiB).
"""

from __future__ import annotations

import gc
import random
import re
from collections import Counter
from typing import Any

from bench import best_seconds
from pipeline.detectors import find
from pipeline.redact import DEFAULT_POLICY, redact_text
from pipeline.worker import GC_THRESHOLDS
from tests.pii_samples import GENERATORS, SLOW_TEXTS, lookalike, sensitive_part

PROSE = (
    "Customer wrote in about the renewal and asked us to check the account history first. ",
    "The agent summarised the thread, looked up the policy and drafted an answer for review. ",
    "Follow-up scheduled; nothing else changed in the ticket since the last update on Monday. ",
)


def corpus(records: int, seed: int = 11) -> list[tuple[str, str | None, str | None]]:
    """(text, planted type or None, sensitive part or None) records, half with PII."""
    rng = random.Random(seed)
    kinds = sorted(GENERATORS)
    out: list[tuple[str, str | None, str | None]] = []
    for i in range(records):
        prose = rng.choice(PROSE) * rng.randint(1, 3)
        cut = rng.randint(0, len(prose))
        if i % 2 == 0:
            kind = kinds[(i // 2) % len(kinds)]
            value = GENERATORS[kind](rng)
            out.append((f"{prose[:cut]} {value} {prose[cut:]}", kind, sensitive_part(kind, value)))
        else:
            out.append((f"{prose[:cut]} {lookalike(rng)} {prose[cut:]}", None, None))
    return out


def measure(records: int = 4000) -> dict[str, Any]:
    data = corpus(records)
    hits: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    true_findings = false_findings = untouched = lookalikes = 0
    for text, kind, secret in data:
        findings = find(text)
        if kind is None:
            lookalikes += 1
            untouched += not findings
            false_findings += len(findings)
            continue
        assert secret is not None
        totals[kind] += 1
        at = text.index(secret)
        covered = [f for f in findings if f.start <= at and f.end >= at + len(secret)]
        hits[kind] += bool(covered)
        true_findings += len(covered)
        false_findings += len(findings) - len(covered)
    texts = [t for t, _, _ in data]
    text_bytes = sum(len(t.encode()) for t in texts)
    seconds = best_seconds(lambda: [redact_text(t, DEFAULT_POLICY, "acme", {}) for t in texts])
    # the baseline: one plain email regex over the same texts, as a naive redactor's single
    # detector would run; the ratio compares machines where MB/s alone does not
    email = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
    baseline = best_seconds(lambda: [email.sub("[EMAIL]", t) for t in texts])
    return {
        "records": len(data),
        "recall": sum(hits.values()) / sum(totals.values()),
        "recall_by_type": {k: hits[k] / totals[k] for k in sorted(totals)},
        "precision": true_findings / max(1, true_findings + false_findings),
        "lookalikes_untouched": untouched / lookalikes,
        "redact_mb_per_s_one_core": text_bytes / seconds / 1e6,
        "baseline_one_email_regex_mb_per_s": text_bytes / baseline / 1e6,
        "redact_vs_one_regex": baseline / seconds,
        "slow_texts": slow_texts(text_bytes / seconds / 1e6),
    }


def slow_texts(corpus_mb_per_s: float) -> dict[str, dict[str, float]]:
    """For each of ``SLOW_TEXTS``: MB/s of ``find`` over 1 MiB of it, that against
    ``corpus_mb_per_s``, and the time over 4 MiB over four times that (1.0 is linear). Timed
    with the worker's collector thresholds: at Python's, collections walking this process's
    other objects blurred the growth (2.07 for short JWTs in the thirty-fourth run; 1.02 with
    the worker's, beside a million other objects)."""
    thresholds = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        return {name: _slow_text(piece, corpus_mb_per_s) for name, (piece, _) in SLOW_TEXTS.items()}
    finally:
        gc.set_threshold(*thresholds)


def _slow_text(piece: str, corpus_mb_per_s: float) -> dict[str, float]:
    one, four = (piece * (size // len(piece)) for size in (1 << 20, 4 << 20))
    one_s = best_seconds(lambda: find(one))
    four_s = best_seconds(lambda: find(four))
    mb_per_s = len(one) / one_s / 1e6
    return {
        "mb_per_s": mb_per_s,
        "vs_corpus": mb_per_s / corpus_mb_per_s,
        "growth_vs_linear": four_s / (4 * one_s),
    }
