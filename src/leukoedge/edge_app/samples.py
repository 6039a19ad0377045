"""One sample (a slide or case) summarised from its fields: what its page, report and API show.

Counts follow the history's outcomes: a field is a retake (refused for its
quality), abstained (no label: unlike the training images), or labelled with
its class. ``counts`` holds the labelled fields per class (every bundle class
present, 0 when none), so the counts plus ``abstained`` plus ``retake`` add up
to ``n``. ``mean_probabilities`` averages only the labelled fields: the
probabilities of an abstention or a retake are "for reference only" on every
page and would pull the mean toward fields the device itself did not trust.

Which model made the fields: ``models`` lists each distinct (model name,
version, bundle checksum) with its number of fields, in the order first used.
The checksum is what identifies a model (a name and version are typed by
whoever converted it); a sample whose fields come from more than one bundle,
or partly from an unrecorded one (results stored before the checksum was),
says so (:attr:`SampleSummary.several_bundles`), because its counts then mix
two models' answers.

The summary reads the sample's rows in batches and keeps only counts, sums
and the list of result ids, so a sample of thousands of fields costs one id
per field in memory.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .agreement import Agreement, agreement
from .storage import ResultStore, Sample, StoredResult

#: Hex digits of a bundle checksum shown where the full one is given once on the same page (as git's short ids).
SHORT_SHA = 12


def short_sha(checksum: str | None) -> str:
    """The first :data:`SHORT_SHA` hex digits ('' for None): the ``short_sha`` template filter."""
    return (checksum or "")[:SHORT_SHA]


@dataclass(frozen=True)
class ModelUse:
    """One model that classified fields of a sample: name, version, bundle checksum (None: not recorded)."""

    name: str
    version: str
    bundle_sha256: str | None
    n: int = 0

    def to_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "bundle_sha256": self.bundle_sha256, "n": self.n}


@dataclass
class SampleSummary:
    """The sample and its figures; :meth:`to_dict` is ``GET /api/samples/<id>``."""

    sample: Sample
    labels: list[str]
    n: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    abstained: int = 0
    retake: int = 0
    reviewed: int = 0
    disagreed: int = 0
    mean_probabilities: dict[str, float] | None = None
    results: list[str] = field(default_factory=list)
    models: list[ModelUse] = field(default_factory=list)
    scales: list[tuple[float | None, str | None]] = field(default_factory=list)
    agreement: Agreement | None = None

    @property
    def checksums(self) -> list[str | None]:
        """The distinct bundle checksums of the fields (None: not recorded), in the order first used."""
        return list(dict.fromkeys(m.bundle_sha256 for m in self.models))

    @property
    def bundle_sha256(self) -> str | None:
        """The one checksum every field shares; None when there are no fields, several, or it is unknown."""
        checksums = self.checksums
        return checksums[0] if len(checksums) == 1 else None

    @property
    def several_bundles(self) -> bool:
        """Fields from more than one bundle (an unrecorded checksum counts as one more: it cannot be ruled out)."""
        return len(self.checksums) > 1

    def to_dict(self) -> dict:
        return {
            **self.sample.to_dict(),
            "n": self.n,
            "counts": dict(self.counts),
            "abstained": self.abstained,
            "retake": self.retake,
            "reviewed": self.reviewed,
            "disagreed": self.disagreed,
            "mean_probabilities": None if self.mean_probabilities is None else dict(self.mean_probabilities),
            "mean_over": sum(self.counts.values()),
            "results": list(self.results),
            "models": [m.to_dict() for m in self.models],
            "bundle_sha256": self.bundle_sha256,
            "several_bundles": self.several_bundles,
            "um_per_px": [{"um_per_px": um, "scale_source": source} for um, source in self.scales],
            "agreement": None if self.agreement is None else self.agreement.to_dict(),
        }


def summarise(sample: Sample, results: Iterable[StoredResult], labels: Sequence[str],
              pairs: Iterable[tuple] = ()) -> SampleSummary:
    """Figures of ``sample`` from its results (any order) and its review groups (for the agreement)."""
    summary = SampleSummary(sample=sample, labels=list(labels), counts={label: 0 for label in labels})
    sums: dict[str, float] = {}
    models: dict[tuple[str, str, str | None], int] = {}
    scales: dict[tuple[float | None, str | None], None] = {}
    for r in results:
        summary.n += 1
        summary.results.append(r.id)
        key = (r.model_name, r.model_version, r.bundle_sha256)
        models[key] = models.get(key, 0) + 1
        scales.setdefault((None if r.um_per_px is None else round(r.um_per_px, 6), r.scale_source), None)
        summary.reviewed += r.reviewed
        summary.disagreed += r.disagreed
        if r.retake:
            summary.retake += 1
        elif r.abstained:
            summary.abstained += 1
        else:
            summary.counts[r.label] = summary.counts.get(r.label, 0) + 1
            for name, p in r.probabilities.items():
                sums[name] = sums.get(name, 0.0) + float(p)
    labelled = sum(summary.counts.values())
    if labelled:
        order = list(labels) + sorted(set(sums) - set(labels))
        summary.mean_probabilities = {name: sums.get(name, 0.0) / labelled for name in order}
    summary.models = [ModelUse(name, version, sha, n) for (name, version, sha), n in models.items()]
    summary.scales = list(scales)
    summary.agreement = agreement(pairs, labels)
    return summary


def summary_of(store: ResultStore, sample_id: str, labels: Sequence[str]) -> SampleSummary:
    """The summary of a stored sample; SampleNotFoundError for an unknown id."""
    sample = store.get_sample(sample_id)
    return summarise(sample, store.sample_results(sample.id), labels, store.review_pairs(sample_id=sample.id))
