"""Patient rules of the synthetic cohort: identity, demographics, imaging, stage, clinical
values, the testing plan, dates and the outcome.

Each concern draws from its own stream (:func:`patient_rngs`), and the writer calls the draws in
a fixed order, so the same ``(seed, index)`` gives the same patient. The rules and their made-up
numbers are documented in :mod:`radfusion.synth.cohort`; the genotype's are in
:mod:`radfusion.synth.cohort_genomics`.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass

import numpy as np

from radfusion.synth.cohort_codes import SITE_A_OID, SITE_B_URI
from radfusion.synth.cohort_genomics import LUNG_PANEL, Genotype
from radfusion.synth.ct import Phantom, make_phantom

__all__ = [
    "FIELD_OF_VIEW_MM",
    "FOLLOW_UP_DAYS",
    "N_PRIOR",
    "OUTCOME_INTERCEPT",
    "OUTCOME_WEIGHTS",
    "PFS_WEIBULL_SHAPE",
    "P_ADENO",
    "SCENARIOS",
    "SLICE_THICKNESS_MM",
    "SMOKING_PRIOR",
    "TUMOUR_COUNT_P",
    "TUMOUR_TYPE_P",
    "Clinical",
    "Dates",
    "Demographics",
    "Identity",
    "Imaging",
    "Outcome",
    "Plan",
    "Stage",
    "draw_clinical",
    "draw_dates",
    "draw_demographics",
    "draw_outcome",
    "draw_phantom",
    "draw_plan",
    "draw_smoking_histology",
    "draw_stage",
    "draw_tumour_types",
    "patient_identity",
    "patient_rngs",
    "stage_group",
    "tumour_profile",
]

# The CT geometry of every phantom (pixel spacing = field of view / size); cohort.json records it.
SLICE_THICKNESS_MM = 2.5
FIELD_OF_VIEW_MM = 360.0
_PHANTOM_ATTEMPTS = 4  # phantom seeds tried per tumour count before trying one tumour fewer
# Study dates are uniform over 2023-01-02 .. 2025-12-31.
_STUDY_EPOCH = datetime.date(2023, 1, 2)
_STUDY_SPAN_DAYS = 1095

# -- the rules' constants (documented in radfusion.synth.cohort) ------------------------------

SMOKING_PRIOR: dict[str, tuple[float, float, float]] = {
    "female": (0.30, 0.45, 0.25),
    "male": (0.15, 0.50, 0.35),
}
"""P(never, former, current) by sex."""
P_ADENO: dict[str, float] = {"never": 0.85, "former": 0.60, "current": 0.55}
"""P(adenocarcinoma) by smoking status; otherwise squamous cell carcinoma."""
TUMOUR_TYPE_P: dict[str, dict[str, float]] = {
    "egfr": {
        "ground_glass": 0.25,
        "part_solid": 0.35,
        "solid": 0.20,
        "spiculated": 0.05,
        "juxta_pleural": 0.10,
        "juxta_vascular": 0.05,
    },
    "kras_or_smoker": {
        "ground_glass": 0.03,
        "part_solid": 0.07,
        "solid": 0.35,
        "spiculated": 0.30,
        "juxta_pleural": 0.15,
        "juxta_vascular": 0.10,
    },
    "other": {
        "ground_glass": 0.10,
        "part_solid": 0.15,
        "solid": 0.35,
        "spiculated": 0.15,
        "juxta_pleural": 0.15,
        "juxta_vascular": 0.10,
    },
}
"""P(phantom tumour type) by profile: ``egfr`` (an EGFR variant), else ``kras_or_smoker`` (a
KRAS variant, or a current or former smoker), else ``other``. EGFR-mutant adenocarcinomas are
more often ground-glass or part-solid, KRAS- and smoking-related ones solid and spiculated."""
TUMOUR_COUNT_P: dict[bool, tuple[float, float, float]] = {
    False: (0.60, 0.30, 0.10),
    True: (0.40, 0.35, 0.25),
}
"""P(1, 2, 3 tumours) by whether the tumour has an EGFR variant."""
N_PRIOR: dict[int, tuple[float, float, float, float]] = {
    1: (0.70, 0.14, 0.11, 0.05),
    2: (0.55, 0.18, 0.18, 0.09),
    3: (0.45, 0.20, 0.25, 0.10),
    4: (0.40, 0.20, 0.27, 0.13),
}
"""P(N0..N3) by T rank (T1 = 1 … T4 = 4)."""
OUTCOME_INTERCEPT = -2.0
OUTCOME_WEIGHTS: dict[str, float] = {
    "stage_minus_1": 0.9,
    "ecog": 0.45,
    "log1p_tumour_volume_ml": 0.35,
    "extra_tumours": 0.3,
    "tp53_mutated": 0.5,
    "kras_stk11_comutated": 0.7,
    "targetable_driver": -1.1,
    "tmb_high_without_driver": -0.5,
    "age_decades_from_67": 0.3,
    "current_smoker": 0.3,
    "primary_subsolid": -0.8,
    "primary_spiculated": 0.6,
}
"""Weights of the synthetic outcome's logit; features are named as in the ground truth.
``primary_subsolid`` and ``primary_spiculated`` are what the image shows of the primary (the
largest) tumour: ground-glass or part-solid (more indolent), spiculated (more aggressive)."""
PFS_WEIBULL_SHAPE = 1.3
"""Shape of the Weibull progression-free time; its scale makes P(time ≤ 365 d) the outcome's
probability, so ``progression_12m`` is the time's own 12-month status."""
FOLLOW_UP_DAYS = (180, 1460)
"""Follow-up ends (censoring) uniformly between these days after the study date."""

SCENARIOS: dict[int, str] = {
    0: "NGS panel; a preliminary report superseded by the final one; a follow-up ECOG after the "
    "study date",
    1: "partial testing (some genes untested); an entered-in-error variant in a tested "
    "wild-type gene",
    2: "NGS panel; TMB without effectiveDateTime (issued only); a re-biopsy report after the "
    "study date",
    3: "site B (URI issuer); no genomic test before the study date, a first one after it",
}


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_GIVEN: dict[str, tuple[str, ...]] = {
    "female": _words("Alice Beatriz Chloe Dana Elena Fatima Greta Hana Ines Julia Keiko"),
    "male": _words("Adam Bruno Carlos David Emil Farid Georg Hiro Ivan Jonas Kofi Luca"),
}
_FAMILY = _words(
    "Abbott Berger Castillo Dubois Eriksen Fischer Garcia Hansen Ito Jensen Kowalski Laurent "
    "Moreau Novak Okafor Petrov Quinn Rossi Schmidt Tanaka Usman Vargas Weber Yilmaz"
)

# -- what is drawn per patient -------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """Who the patient is to the two record systems: PatientID, site and identifiers."""

    index: int
    patient_id: str
    site: str  # "A" | "B"
    system: str  # FHIR identifier system
    issuer: str  # what write_ct_series takes: urn:oid:… or the URI
    decoy_value: str


@dataclass(frozen=True)
class Demographics:
    """Sex, birth and study dates, age at the study and the synthetic name."""

    sex: str  # FHIR administrative gender: "female" | "male"
    birth_date: datetime.date
    study_date: datetime.date
    age: int
    family: str
    given: str


@dataclass(frozen=True)
class Imaging:
    """What the phantom's tumours say: count, sides, sizes, volume and the primary's side."""

    tumour_count: int
    tumours_requested: int
    sides: tuple[str, ...]
    diameters_mm: tuple[float, ...]
    total_volume_ml: float
    primary_side: str
    phantom_seed: int
    types: tuple[str, ...] = ()  # the phantom's tumour types (synth.nodules.TUMOUR_TYPES)
    primary_density: str = "solid"  # solid | part_solid | ground_glass
    primary_shape: str = "sphere"  # sphere | lobulated | irregular | spiculated

    @property
    def largest_diameter_mm(self) -> float:
        """The primary tumour's diameter."""
        return max(self.diameters_mm)


@dataclass(frozen=True)
class Stage:
    """Clinical AJCC 8 TNM categories (without the ``c`` prefix) and the stage group."""

    t: str
    n: str
    m: str
    group: str

    @property
    def number(self) -> int:
        """1..4 for stage I..IV."""
        return {"I": 1, "II": 2, "III": 3, "IV": 4}[self.group.rstrip("ABC123")]


@dataclass(frozen=True)
class Clinical:
    """Smoking, histology, coding choice and the clinical values before and after the study."""

    smoking: str
    smoking_history: bool  # an older "daily smoker" record precedes the current one
    histology: str  # "adenocarcinoma" | "squamous"
    generic_code: bool
    ecog: int
    karnofsky: int | None
    cea: float | None
    cea_followup: float | None
    ecog_followup: int  # the value a follow-up ECOG has, when the plan writes one


@dataclass(frozen=True)
class Plan:
    """How the patient was tested and which messiness applies (see the scenarios)."""

    scenario: int
    panel: tuple[str, ...]  # genes in the final report before the study (() = none)
    tmb_msi: bool
    preliminary: bool
    spurious_kras: bool
    error_gene: str | None
    tmb_without_effective: bool
    followup: bool
    acquired_t790m: bool
    ecog_followup: bool


@dataclass(frozen=True)
class Dates:
    """The record's dates around the study date (rules in :mod:`radfusion.synth.cohort`)."""

    diagnosis: datetime.date
    specimen: datetime.date
    final_issued: datetime.date
    preliminary_issued: datetime.date
    stage: datetime.date
    smoking: datetime.date
    smoking_history: datetime.date
    ecog: datetime.date
    cea: datetime.date
    ecog_followup: datetime.date
    cea_followup: datetime.date
    followup_specimen: datetime.date
    followup_issued: datetime.date


@dataclass(frozen=True)
class Outcome:
    """The synthetic ``progression_12m`` outcome: the model's features, logit and the label."""

    features: dict[str, float]
    logit: float
    probability: float
    label: bool  # progression within 365 days: progression_free_days <= 365
    progression_free_days: int  # the true time to progression or death
    follow_up_days: int  # when follow-up ended (censoring)

    @property
    def observed(self) -> tuple[int, bool]:
        """What follow-up shows: (days, event), the event seen only before follow-up ended."""
        event = self.progression_free_days <= self.follow_up_days
        return (self.progression_free_days if event else self.follow_up_days), event

    @property
    def risk_category(self) -> str:
        """low < 0.3 ≤ intermediate < 0.6 ≤ high."""
        if self.probability < 0.3:
            return "low"
        return "intermediate" if self.probability < 0.6 else "high"


# -- drawing a patient ---------------------------------------------------------------------------


def patient_rngs(seed: int, index: int) -> dict[str, np.random.Generator]:
    """Independent streams per concern, so a change in one (e.g. a phantom retry) leaves the
    others alone."""
    names = ("identity", "clinical", "genomics", "imaging", "plan", "outcome")
    children = np.random.SeedSequence([seed, index]).spawn(len(names))
    return {name: np.random.default_rng(child) for name, child in zip(names, children, strict=True)}


def _patient_id(seed: int, index: int) -> str:
    return f"RFC{seed}-{index + 1:04d}"


def patient_identity(seed: int, index: int) -> Identity:
    """PatientID, site and identifiers of patient ``index`` (no draw: ``index % 4`` decides)."""
    site = "B" if index % 4 == 3 else "A"
    system = SITE_B_URI if site == "B" else f"urn:oid:{SITE_A_OID}"
    return Identity(
        index=index,
        patient_id=_patient_id(seed, index),
        site=site,
        system=system,
        issuer=system,  # write_ct_series: urn:oid:… → ISO, anything else → URI
        decoy_value=_patient_id(seed, index + 1),
    )


def _pick(rng: np.random.Generator, options: tuple[str, ...], p: tuple[float, ...]) -> str:
    return options[int(rng.choice(len(options), p=np.asarray(p) / sum(p)))]


def _age_at(birth: datetime.date, day: datetime.date) -> int:
    return day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))


def draw_demographics(rng: np.random.Generator) -> Demographics:
    """Sex, study date, age (hence birth date) and name."""
    sex = "female" if rng.random() < 0.5 else "male"
    study = _STUDY_EPOCH + datetime.timedelta(days=int(rng.integers(0, _STUDY_SPAN_DAYS)))
    age = int(np.clip(round(float(rng.normal(67.0, 9.0))), 40, 90))
    last_birthday = study - datetime.timedelta(days=int(rng.integers(0, 365)))
    day = 28 if (last_birthday.month, last_birthday.day) == (2, 29) else last_birthday.day
    birth = datetime.date(last_birthday.year - age, last_birthday.month, day)
    return Demographics(
        sex=sex,
        birth_date=birth,
        study_date=study,
        age=_age_at(birth, study),
        family=_FAMILY[int(rng.integers(0, len(_FAMILY)))],
        given=_GIVEN[sex][int(rng.integers(0, len(_GIVEN[sex])))],
    )


def draw_smoking_histology(rng: np.random.Generator, sex: str) -> tuple[str, str]:
    """Smoking status by sex, then the histology by smoking status."""
    smoking = _pick(rng, ("never", "former", "current"), SMOKING_PRIOR[sex])
    histology = "adenocarcinoma" if rng.random() < P_ADENO[smoking] else "squamous"
    return smoking, histology


def _imaging(phantom: Phantom, requested: int, phantom_seed: int) -> Imaging:
    tumours = phantom.tumours
    primary = max(tumours, key=lambda t: (t.radius_mm, -t.label))
    return Imaging(
        tumour_count=len(tumours),
        tumours_requested=requested,
        sides=tuple(t.side for t in tumours),
        diameters_mm=tuple(round(2.0 * t.radius_mm, 2) for t in tumours),
        total_volume_ml=round(sum(t.volume_mm3 for t in tumours) / 1000.0, 3),
        primary_side=primary.side,
        phantom_seed=phantom_seed,
        types=tuple(t.type for t in tumours),
        primary_density=primary.density,
        primary_shape=primary.shape,
    )


def tumour_profile(genotype: Genotype, smoking: str) -> str:
    """The key of :data:`TUMOUR_TYPE_P` for a patient."""
    if genotype.mutated("EGFR"):
        return "egfr"
    return "kras_or_smoker" if genotype.mutated("KRAS") or smoking != "never" else "other"


def draw_tumour_types(rng: np.random.Generator, profile: str, count: int) -> tuple[str, ...]:
    """``count`` phantom tumour types for a profile of :data:`TUMOUR_TYPE_P`."""
    types, p = zip(*TUMOUR_TYPE_P[profile].items(), strict=True)
    return tuple(str(types[int(rng.choice(len(types), p=p))]) for _ in range(count))


def draw_phantom(
    rng: np.random.Generator, genotype: Genotype, smoking: str, slices: int, size: int
) -> tuple[Phantom, Imaging]:
    """A realistic chest phantom with 1..3 tumours whose types follow the genotype and smoking
    (:data:`TUMOUR_TYPE_P`); on a tumour that does not fit, another phantom seed, then one
    tumour fewer.

    Raises:
        ValueError: not even one tumour fits (too few slices or too small an image).
    """
    requested = int(rng.choice(3, p=TUMOUR_COUNT_P[genotype.mutated("EGFR")])) + 1
    types = draw_tumour_types(rng, tumour_profile(genotype, smoking), requested)
    for count in range(requested, 0, -1):
        for _ in range(_PHANTOM_ATTEMPTS):
            phantom_seed = int(rng.integers(0, 2**31 - 1))
            try:
                phantom = make_phantom(
                    slices=slices,
                    rows=size,
                    columns=size,
                    seed=phantom_seed,
                    tumours=count,
                    pixel_spacing=FIELD_OF_VIEW_MM / size,
                    slice_thickness=SLICE_THICKNESS_MM,
                    style="realistic",
                    kernel="soft",
                    tumour_types=types[:count],
                )
            except ValueError as err:
                if "tumours" not in str(err):
                    raise
                continue
            return phantom, _imaging(phantom, requested, phantom_seed)
    raise ValueError(
        f"slices: a tumour does not fit in a phantom of {slices} slices of {size}x{size}; "
        "use more slices or a larger size"
    )


def _t_category(imaging: Imaging) -> str:
    same_lung = sum(side == imaging.primary_side for side in imaging.sides)
    if same_lung >= 2:
        return "T3"  # separate tumour nodule(s) in the same lung (lobes are not modelled)
    d = imaging.largest_diameter_mm
    for limit, t in ((10, "T1a"), (20, "T1b"), (30, "T1c"), (40, "T2a"), (50, "T2b"), (70, "T3")):
        if d <= limit:
            return t
    return "T4"


def _t_rank(t: str) -> int:
    return int(t[1])


def stage_group(t: str, n: str, m: str) -> str:
    """AJCC 8th edition lung cancer stage group for the T, N, M categories this cohort uses."""
    if m == "M1c":
        return "IVB"
    if m in ("M1a", "M1b"):
        return "IVA"
    early = _t_rank(t) <= 2
    if n == "N0":
        return {"T1a": "IA1", "T1b": "IA2", "T1c": "IA3", "T2a": "IB", "T2b": "IIA"}.get(
            t, "IIB" if t == "T3" else "IIIA"
        )
    if n == "N1":
        return "IIB" if early else "IIIA"
    if n == "N2":
        return "IIIA" if early else "IIIB"
    return "IIIB" if early else "IIIC"


def draw_stage(rng: np.random.Generator, imaging: Imaging) -> Stage:
    """T and M from the phantom's tumours, N drawn by T, distant M1b/M1c at random."""
    t = _t_category(imaging)
    n = _pick(rng, ("N0", "N1", "N2", "N3"), N_PRIOR[_t_rank(t)])
    if len(set(imaging.sides)) == 2:
        m = "M1a"  # a tumour in the contralateral lung
    elif rng.random() < (0.16 if n in ("N2", "N3") else 0.08):
        m = "M1b" if rng.random() < 0.5 else "M1c"
    else:
        m = "M0"
    return Stage(t=t, n=n, m=m, group=stage_group(t, n, m))


def _karnofsky(rng: np.random.Generator, ecog: int) -> int:
    high = {0: 100, 1: 80, 2: 60, 3: 40, 4: 20}[ecog]
    return high - (10 if rng.random() < 0.5 else 0)


def draw_clinical(
    rng: np.random.Generator, demo: Demographics, smoking: str, histology: str, stage: Stage
) -> Clinical:
    """ECOG (and a follow-up), Karnofsky, CEA (and a follow-up) and the record's quirks."""
    mu = 0.1 + 0.35 * stage.number + (0.3 if demo.age >= 75 else 0.0)
    ecog = int(np.clip(round(float(rng.normal(mu, 0.7))), 0, 4))
    karnofsky = _karnofsky(rng, ecog) if rng.random() < 0.35 else None
    cea = None
    cea_followup = None
    if rng.random() < 0.4:
        median = 2.0 * (1.0 + 0.6 * (stage.number - 1)) * (1.5 if smoking == "current" else 1.0)
        cea = round(median * math.exp(float(rng.normal(0.0, 0.5))), 1)
        if rng.random() < 0.5:
            cea_followup = round(cea * math.exp(float(rng.normal(0.2, 0.4))), 1)
    return Clinical(
        smoking=smoking,
        smoking_history=smoking == "former" and bool(rng.random() < 0.6),
        histology=histology,
        generic_code=bool(rng.random() < 0.3),
        ecog=ecog,
        karnofsky=karnofsky,
        cea=cea,
        cea_followup=cea_followup,
        ecog_followup=min(4, ecog + int(rng.integers(0, 3))),
    )


def draw_plan(rng: np.random.Generator, scenario: int, genotype: Genotype) -> Plan:
    """Testing and messiness for the patient's scenario (``index % 4``) plus random extras."""
    if scenario == 1:
        panel: tuple[str, ...] = ("EGFR", "ALK") if rng.random() < 0.5 else ("EGFR", "KRAS", "ALK")
    elif scenario == 3:
        panel = ()
    else:
        panel = LUNG_PANEL
    wild_type = [g for g in panel if not genotype.mutated(g)]
    error_gene = None
    if wild_type and (scenario == 1 or rng.random() < 0.15):
        error_gene = wild_type[int(rng.integers(0, len(wild_type)))]
    full = panel == LUNG_PANEL
    preliminary = full and (scenario == 0 or rng.random() < 0.2)
    followup = scenario in (2, 3) or rng.random() < 0.25
    return Plan(
        scenario=scenario,
        panel=panel,
        tmb_msi=full,
        preliminary=preliminary,
        spurious_kras=preliminary
        and not genotype.mutated("KRAS")
        and not genotype.mutated("EGFR")
        and bool(rng.random() < 0.5),
        error_gene=error_gene,
        tmb_without_effective=full and (scenario == 2 or rng.random() < 0.2),
        followup=followup,
        acquired_t790m=followup and genotype.mutated("EGFR") and bool(rng.random() < 0.5),
        ecog_followup=scenario == 0 or bool(rng.random() < 0.3),
    )


def _days(rng: np.random.Generator, low: int, high: int) -> datetime.timedelta:
    """A whole number of days in [low, high]."""
    return datetime.timedelta(days=int(rng.integers(low, high + 1)))


def draw_dates(rng: np.random.Generator, study: datetime.date) -> Dates:
    """Every date of the record, relative to the study date."""
    specimen = study - _days(rng, 16, 75)
    diagnosis = specimen - _days(rng, 0, 10)
    final_issued = specimen + _days(rng, 5, 14)  # ≤ study - 2
    followup_specimen = study + _days(rng, 45, 200)
    ecog = study - _days(rng, 0, 21) if rng.random() < 0.8 else study
    return Dates(
        diagnosis=diagnosis,
        specimen=specimen,
        final_issued=final_issued,
        preliminary_issued=specimen + _days(rng, 2, 4),
        stage=min(diagnosis + _days(rng, 1, 10), study - datetime.timedelta(days=1)),
        smoking=study - _days(rng, 0, 60),
        smoking_history=study - _days(rng, 400, 1500),
        ecog=ecog,
        cea=study - _days(rng, 1, 30),
        ecog_followup=study + _days(rng, 1, 120),
        cea_followup=study + _days(rng, 20, 150),
        followup_specimen=followup_specimen,
        followup_issued=followup_specimen + _days(rng, 7, 21),
    )


def draw_outcome(
    rng: np.random.Generator,
    demo: Demographics,
    clinical: Clinical,
    stage: Stage,
    imaging: Imaging,
    genotype: Genotype,
) -> Outcome:
    """The synthetic outcome: ``progression_12m`` from a logistic model of the true features,
    and a progression-free time drawn from the same probability (a Weibull time whose scale puts
    that probability on day 365; the label is its 12-month status), censored at the end of
    follow-up."""
    driver = genotype.mutated("EGFR") or genotype.mutated("ALK")
    features = {
        "stage_minus_1": float(stage.number - 1),
        "ecog": float(clinical.ecog),
        "log1p_tumour_volume_ml": round(math.log1p(imaging.total_volume_ml), 4),
        "extra_tumours": float(imaging.tumour_count - 1),
        "tp53_mutated": float(genotype.mutated("TP53")),
        "kras_stk11_comutated": float(genotype.mutated("KRAS") and genotype.mutated("STK11")),
        "targetable_driver": float(driver),
        "tmb_high_without_driver": float(genotype.tmb >= 10.0 and not driver),
        "age_decades_from_67": round((demo.age - 67) / 10.0, 4),
        "current_smoker": float(clinical.smoking == "current"),
        "primary_subsolid": float(imaging.primary_density != "solid"),
        "primary_spiculated": float(imaging.primary_shape == "spiculated"),
    }
    logit = OUTCOME_INTERCEPT + sum(OUTCOME_WEIGHTS[k] * v for k, v in features.items())
    probability = 1.0 / (1.0 + math.exp(-logit))
    u = float(rng.random())
    # Weibull: P(T <= t) = 1 - exp(-(t/scale)^k); scale such that P(T <= 365) = probability,
    # so T <= 365 exactly when u < probability (the label's own draw).
    scale = 365.0 / (-math.log1p(-probability)) ** (1.0 / PFS_WEIBULL_SHAPE)
    days = scale * (-math.log1p(-u)) ** (1.0 / PFS_WEIBULL_SHAPE)
    progression_free_days = max(1, math.ceil(days))
    follow_up = int(rng.integers(FOLLOW_UP_DAYS[0], FOLLOW_UP_DAYS[1] + 1))
    return Outcome(
        features=features,
        logit=round(logit, 4),
        probability=round(probability, 4),
        label=progression_free_days <= 365,
        progression_free_days=progression_free_days,
        follow_up_days=follow_up,
    )
