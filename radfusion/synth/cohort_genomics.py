"""Genotype rules of the synthetic cohort: the lung panel, its variants and the tumour's draw.

Which variants a patient's tumour carries (EGFR, ALK and KRAS drivers mutually exclusive, TP53
and STK11 on top), their allele fractions, TMB and MSI. The probabilities are made up; the rules
are documented in :mod:`radfusion.synth.cohort`. Whether a gene was *tested* is the testing
plan's business (:mod:`radfusion.synth.cohort_clinical`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from radfusion.synth.cohort_codes import HGNC, SO_DELETION, SO_GENE_FUSION, SO_SNV, Code

__all__ = [
    "EGFR_T790M",
    "GENES",
    "LUNG_PANEL",
    "P_ALK",
    "P_EGFR",
    "P_GERMLINE_TP53",
    "P_KRAS",
    "P_MSI_HIGH",
    "P_STK11",
    "P_TP53",
    "TMB_MEDIAN",
    "VARIANTS",
    "Call",
    "Gene",
    "Genotype",
    "VariantSpec",
    "draw_genotype",
]

LUNG_PANEL: tuple[str, ...] = ("EGFR", "KRAS", "ALK", "TP53", "STK11")
"""The lung cancer panel, in report order."""

# -- the genotype rules' constants (documented in radfusion.synth.cohort) ----------------------

P_EGFR: dict[tuple[str, str], float] = {
    ("adenocarcinoma", "never"): 0.50,
    ("adenocarcinoma", "former"): 0.15,
    ("adenocarcinoma", "current"): 0.08,
    ("squamous", "never"): 0.05,
    ("squamous", "former"): 0.03,
    ("squamous", "current"): 0.02,
}
P_ALK: dict[tuple[str, str], float] = {
    ("adenocarcinoma", "never"): 0.15,
    ("adenocarcinoma", "former"): 0.04,
    ("adenocarcinoma", "current"): 0.03,
    ("squamous", "never"): 0.02,
    ("squamous", "former"): 0.01,
    ("squamous", "current"): 0.01,
}
"""P(ALK fusion | no EGFR variant)."""
P_KRAS: dict[tuple[str, str], float] = {
    ("adenocarcinoma", "never"): 0.08,
    ("adenocarcinoma", "former"): 0.35,
    ("adenocarcinoma", "current"): 0.40,
    ("squamous", "never"): 0.03,
    ("squamous", "former"): 0.06,
    ("squamous", "current"): 0.06,
}
"""P(KRAS variant | no EGFR variant and no ALK fusion)."""
P_TP53: dict[tuple[str, str], float] = {
    ("adenocarcinoma", "never"): 0.30,
    ("adenocarcinoma", "former"): 0.50,
    ("adenocarcinoma", "current"): 0.55,
    ("squamous", "never"): 0.70,
    ("squamous", "former"): 0.80,
    ("squamous", "current"): 0.85,
}
P_STK11: dict[bool, float] = {True: 0.30, False: 0.06}
"""P(STK11 variant) by whether the tumour has a KRAS variant."""
P_GERMLINE_TP53 = 0.05
P_MSI_HIGH = 0.01
TMB_MEDIAN: dict[str, float] = {"never": 2.7, "former": 7.4, "current": 10.0}

# -- genes and variants ------------------------------------------------------------------------


@dataclass(frozen=True)
class Gene:
    """A gene of the panel: its HGNC code, reference transcript and the region a test covers."""

    symbol: str
    hgnc_id: str
    transcript: str
    region: str

    def code(self) -> Code:
        """The HGNC Coding the Genomics Reporting IG wants for gene-studied (48018-6)."""
        return Code(HGNC, self.hgnc_id, self.symbol)


GENES: dict[str, Gene] = {
    "EGFR": Gene("EGFR", "HGNC:3236", "NM_005228.5", "EGFR exons 18-21"),
    "KRAS": Gene("KRAS", "HGNC:6407", "NM_004985.5", "KRAS exons 2-4"),
    "ALK": Gene("ALK", "HGNC:427", "NM_004304.5", "ALK rearrangements (introns 18-19)"),
    "TP53": Gene("TP53", "HGNC:11998", "NM_000546.6", "TP53 exons 2-11"),
    "STK11": Gene("STK11", "HGNC:11389", "NM_000455.5", "STK11 exons 1-9"),
}


@dataclass(frozen=True)
class VariantSpec:
    """One variant the generator can place: HGVS (None for the fusion), type and a short name."""

    gene: str
    c_hgvs: str | None
    p_hgvs: str | None
    change_type: Code
    label: str


_EGFR_SENSITISING = (
    VariantSpec("EGFR", "NM_005228.5:c.2573T>G", "p.Leu858Arg", SO_SNV, "L858R"),
    VariantSpec(
        "EGFR", "NM_005228.5:c.2235_2249del", "p.Glu746_Ala750del", SO_DELETION, "exon 19 deletion"
    ),
)
EGFR_T790M = VariantSpec("EGFR", "NM_005228.5:c.2369C>T", "p.Thr790Met", SO_SNV, "T790M")
"""The acquired resistance variant some re-biopsies after the study date find."""
VARIANTS: dict[str, tuple[VariantSpec, ...]] = {
    "EGFR": _EGFR_SENSITISING,
    "KRAS": (
        VariantSpec("KRAS", "NM_004985.5:c.34G>T", "p.Gly12Cys", SO_SNV, "G12C"),
        VariantSpec("KRAS", "NM_004985.5:c.35G>A", "p.Gly12Asp", SO_SNV, "G12D"),
        VariantSpec("KRAS", "NM_004985.5:c.35G>T", "p.Gly12Val", SO_SNV, "G12V"),
    ),
    "ALK": (VariantSpec("ALK", None, None, SO_GENE_FUSION, "EML4-ALK fusion"),),
    "TP53": (
        VariantSpec("TP53", "NM_000546.6:c.818G>A", "p.Arg273His", SO_SNV, "R273H"),
        VariantSpec("TP53", "NM_000546.6:c.743G>A", "p.Arg248Gln", SO_SNV, "R248Q"),
        VariantSpec("TP53", "NM_000546.6:c.524G>A", "p.Arg175His", SO_SNV, "R175H"),
    ),
    "STK11": (
        VariantSpec("STK11", "NM_000455.5:c.109C>T", "p.Gln37Ter", SO_SNV, "Q37*"),
        VariantSpec("STK11", "NM_000455.5:c.580G>T", "p.Asp194Tyr", SO_SNV, "D194Y"),
    ),
}
"""The variants a tumour can carry, by gene (a draw picks one by its position)."""


@dataclass(frozen=True)
class Call:
    """A variant the patient carries, with the VAF a test reports and where it comes from."""

    spec: VariantSpec
    vaf_percent: float
    source: str  # "somatic" | "germline"


@dataclass(frozen=True)
class Genotype:
    """The tumour's true genotype, tested or not: calls per panel gene, TMB and MSI."""

    calls: dict[str, tuple[Call, ...]]  # every panel gene; () = wild-type
    tmb: float
    msi_high: bool

    def mutated(self, gene: str) -> bool:
        """Whether the tumour carries a variant in ``gene`` (tested or not)."""
        return bool(self.calls[gene])


def _vaf(rng: np.random.Generator, purity: float, source: str) -> float:
    if source == "germline":
        return round(float(rng.uniform(45.0, 55.0)), 1)
    return round(float(np.clip(purity * rng.uniform(0.35, 0.95), 0.03, 0.9)) * 100.0, 1)


def draw_genotype(rng: np.random.Generator, histology: str, smoking: str) -> Genotype:
    """The tumour's true variants in the panel genes, TMB and MSI (rules in cohort's docstring)."""
    key = (histology, smoking)
    purity = float(rng.uniform(0.2, 0.8))
    chosen: dict[str, VariantSpec | None] = dict.fromkeys(LUNG_PANEL)
    if rng.random() < P_EGFR[key]:
        chosen["EGFR"] = VARIANTS["EGFR"][int(rng.integers(0, 2))]
    elif rng.random() < P_ALK[key]:
        chosen["ALK"] = VARIANTS["ALK"][0]
    elif rng.random() < P_KRAS[key]:
        chosen["KRAS"] = VARIANTS["KRAS"][int(rng.integers(0, 3))]
    if rng.random() < P_TP53[key]:
        chosen["TP53"] = VARIANTS["TP53"][int(rng.integers(0, 3))]
    if rng.random() < P_STK11[chosen["KRAS"] is not None]:
        chosen["STK11"] = VARIANTS["STK11"][int(rng.integers(0, 2))]
    calls: dict[str, tuple[Call, ...]] = {}
    for gene in LUNG_PANEL:
        spec = chosen[gene]
        if spec is None:
            calls[gene] = ()
            continue
        source = "germline" if gene == "TP53" and rng.random() < P_GERMLINE_TP53 else "somatic"
        calls[gene] = (Call(spec, _vaf(rng, purity, source), source),)
    msi_high = bool(rng.random() < P_MSI_HIGH)
    tmb = TMB_MEDIAN[smoking] * math.exp(float(rng.normal(0.0, 0.6))) * (3.0 if msi_high else 1.0)
    return Genotype(calls=calls, tmb=round(tmb, 1), msi_high=msi_high)
