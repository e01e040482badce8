"""The one place a metric's name is made: `metric_key("tpr", 1e-3)` -> "tpr_at_far0.1pct_mean".

Training's validation, the evaluation summary, reports, Tune's objective, checkpoint ranking and the
quickstart's headline all name metrics through these functions, and configs validate a configured name with
`check_metric_name` when they load instead of failing when a run ends.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Annotated, Literal

from pydantic import AfterValidator

AT_FAR_METRICS = ("tpr", "accuracy", "far")
STATS = ("mean", "std")

# What the training loop reports after validation (Tune's objective, checkpoint ranking). Its loss terms
# are reported too, each named `loss_<term>` by its objective.
VAL_TPR_AT_FAR = "val_tpr_at_far"
VAL_ACCURACY = "val_accuracy"
VALIDATION_METRICS = (VAL_TPR_AT_FAR, VAL_ACCURACY)
LOSS_PREFIX = "loss_"

MetricFamily = Literal["training", "verification"]

_VERIFICATION_NAME = re.compile(
    rf"^(?:accuracy|(?P<metric>{'|'.join(AT_FAR_METRICS)})_at_far(?P<pct>[0-9.e+-]+)pct)"
    rf"(?:_(?P<stat>{'|'.join(STATS)}))?$"
)
_VERIFICATION_FORMS = f"accuracy or <{'|'.join(AT_FAR_METRICS)}>_at_far<percent>pct (e.g. tpr_at_far0.1pct)"


def far_tag(far: float) -> str:
    """0.001 -> 'far0.1pct' (a metric-name-safe label)."""
    return _rate_tag("far", far)


def fpir_tag(fpir: float) -> str:
    """0.01 -> 'fpir1pct', the open-set identification counterpart of `far_tag`."""
    return _rate_tag("fpir", fpir)


def _rate_tag(rate: str, value: float) -> str:
    return f"{rate}{value * 100:g}pct"


def metric_key(metric: str, far: float | None = None, stat: str | None = "mean") -> str:
    """`accuracy` -> accuracy_mean; (`tpr`, 1e-3) -> tpr_at_far0.1pct_mean; stat=None drops the suffix
    (a per-fold column)."""
    name = metric if far is None else f"{metric}_at_{far_tag(far)}"
    return name if stat is None else f"{name}_{stat}"


def scoped(*parts: str) -> str:
    """An MLflow metric under its scope: ("ours", "unmasked", "accuracy_mean") -> ours.unmasked.accuracy_mean;
    ("open_set", "n_mated") -> open_set.n_mated."""
    return ".".join(parts)


def parse_verification_key(name: str) -> tuple[str, float | None, str | None]:
    """Inverse of `metric_key` for verification names: "tpr_at_far0.1pct" -> ("tpr", 0.001, None). Raises
    ValueError for anything `metric_key` does not produce (a typo, "far0.10pct", an unknown statistic)."""
    match = _VERIFICATION_NAME.match(name)
    parsed = None
    if match:
        try:
            far = float(match["pct"]) / 100 if match["pct"] else None
            parsed = (match["metric"] or "accuracy", far, match["stat"])
        except ValueError:  # digits and dots that are not a number ("1.2.3")
            pass
    if parsed is None or metric_key(*parsed) != name:
        raise ValueError(
            f"unknown verification metric {name!r}; known: {_VERIFICATION_FORMS}, optionally with _mean/_std"
        )
    return parsed


def verification_metrics(far_targets: list[float]) -> list[str]:
    """The verification metrics an evaluation at `far_targets` reports (each as _mean and _std)."""
    return ["accuracy"] + [metric_key(m, t, stat=None) for t in far_targets for m in AT_FAR_METRICS]


def check_metric_name(name: str, family: MetricFamily = "training") -> str:
    """Config validator body: `name` if it is a metric the family produces, else a ValueError naming the
    known ones. training: what the training loop reports (val_tpr_at_far, val_accuracy, loss_<term>);
    verification: a verification metric without its statistic (accuracy, tpr_at_far0.1pct: a comparison
    shows its mean and std)."""
    if family == "verification":
        try:
            stat = parse_verification_key(name)[2]
        except ValueError:
            stat = "not a verification metric"
        if stat is not None:
            raise ValueError(
                f"unknown verification metric {name!r}; known: {_VERIFICATION_FORMS}, without _mean/_std "
                "(both are shown)"
            )
        return name
    if name in VALIDATION_METRICS or (name.startswith(LOSS_PREFIX) and len(name) > len(LOSS_PREFIX)):
        return name
    raise ValueError(
        f"unknown training metric {name!r}; known: {', '.join(VALIDATION_METRICS)} or a loss term "
        f"{LOSS_PREFIX}<term> (e.g. {LOSS_PREFIX}total)"
    )


# Config field types: `metric: TrainingMetricName = VAL_TPR_AT_FAR` fails at load on a typo.
TrainingMetricName = Annotated[str, AfterValidator(partial(check_metric_name, family="training"))]
VerificationMetricName = Annotated[str, AfterValidator(partial(check_metric_name, family="verification"))]
