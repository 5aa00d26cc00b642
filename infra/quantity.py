"""Kubernetes resource quantities in the API's canonical form.

Why by hand: Kueue starts a queued TrainJob with a full Update of the object it decoded into Go types,
and a `resource.Quantity` re-encodes in its canonical form ("2000m" -> "2", "1024Mi" -> "1Gi", "0.5"
-> "500m"). `spec.trainer` is immutable by CEL (`self == oldSelf`), which compares the strings: a
quantity the stack wrote in another form makes Kueue's start fail with "field is immutable" and the job
stays suspended (kubeflow/trainer#3888). No Python library writes Go's canonical form (the kubernetes
client's `parse_quantity` only parses), so this is apimachinery's `Quantity.CanonicalizeBytes`
(pkg/api/resource/quantity.go, amount.go), for the values a stack config can hold; its test tables
(TestQuantityString, TestQuantityParseEmit) are tests/infra/test_quantity.py's.
"""

from __future__ import annotations

import re
from decimal import Decimal

_GRAMMAR = re.compile(r"^([+-]?)(\d*)(?:\.(\d*))?(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?\d+)?$")
_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_DECIMAL_SUFFIX = {v: k for k, v in _DECIMAL.items()}
_BINARY_SUFFIX = {v: k for k, v in _BINARY.items()}


class QuantityError(ValueError):
    pass


def canonical(text: str) -> str:
    """The string Go's resource.Quantity writes for `text` (what the API server's clients send back)."""
    m = _GRAMMAR.match(text.strip())
    if not m or not (m.group(2) or m.group(3)):
        raise QuantityError(f"{text!r} is not a Kubernetes quantity (like 16Gi, 512Mi, 8 or 500m)")
    sign, whole, frac, suffix = m.group(1), m.group(2) or "0", m.group(3) or "", m.group(4) or ""
    value = Decimal(f"{whole}.{frac or '0'}")
    if suffix in _BINARY:
        value *= Decimal(1024) ** _BINARY[suffix]
        form = "binary"
    elif suffix[:1] in ("e", "E") and len(suffix) > 1:
        value = value.scaleb(int(suffix[1:]))
        form = "exponent"
    else:
        value = value.scaleb(_DECIMAL[suffix])
        form = "decimal"
    if value == 0:
        return "0"
    if int(value.normalize().as_tuple().exponent) < -9:
        # Go rounds up to nano units on parse: a value that needs finer units would not survive.
        raise QuantityError(f"{text!r} has digits below 10^-9, which Kubernetes rounds up; write it without them")
    if form == "binary" and (value < 1024 or value != value.to_integral_value()):
        form = "decimal"  # Go shows small or fractional binary amounts as DecimalSI, not to lose precision
    negative = "-" if sign == "-" else ""
    if form == "binary":
        amount, power = int(value), 0
        while amount % 1024 == 0 and power < 6:
            amount //= 1024
            power += 1
        suffix = _BINARY_SUFFIX.get(power, "")
        return f"{negative}{amount}{suffix}"
    mantissa, exponent = _without_tens(value)
    shift = exponent % 3  # down to a multiple of 3: "1.5" -> 1500m, "50k" stays 50k
    mantissa, exponent = mantissa * 10**shift, exponent - shift
    if form == "decimal" and exponent in _DECIMAL_SUFFIX:
        return f"{negative}{mantissa}{_DECIMAL_SUFFIX[exponent]}"
    return f"{negative}{mantissa}" + (f"e{exponent}" if exponent else "")


def _without_tens(value: Decimal) -> tuple[int, int]:
    """value = mantissa * 10**exponent with no factor of 10 left in the mantissa."""
    t = value.normalize().as_tuple()
    mantissa = int("".join(map(str, t.digits)))
    exponent = int(t.exponent)
    while mantissa % 10 == 0:
        mantissa //= 10
        exponent += 1
    return mantissa, exponent
