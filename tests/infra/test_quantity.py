"""infra/quantity.py against apimachinery's own tables (pkg/api/resource/quantity_test.go:
TestQuantityString's alternates and canonical strings, TestQuantityParseEmit)."""

import pytest

from infra.quantity import QuantityError, canonical


def is_canonical(text: str) -> bool:
    try:
        return canonical(text) == text
    except QuantityError:
        return False


# (written, what Go's Quantity.String() writes back)
GO_TABLE = [
    ("1024Mi", "1Gi"), ("307200Ki", "300Mi"), ("6Ki", "6Ki"), ("1025024Mi", "1001Gi"), ("1024Gi", "1Ti"),
    ("5000m", "5"), ("0.5", "500m"), ("1000M", "1G"), ("0.001T", "1G"), ("1000u", "1m"), ("80m", "80m"),
    ("1.08", "1080m"), ("1080000000n", "1080m"), ("300M", "300M"), ("1T", "1T"), ("1000E", "1e21"),
    ("5000E", "5e21"), ("1234567M", "1234567M"), ("3k", "3k"), ("1025", "1025"), ("0", "0"), ("00", "0"),
    (".001e12", "1e9"), ("0.001e0", "1e-3"), ("1000e-12", "1e-9"), ("80e-3", "80e-3"), ("300e6", "300e6"),
    ("1n", "1n"), ("1080n", "1080n"), ("1080u", "1080u"),
    ("1Ki", "1Ki"), ("1Mi", "1Mi"), ("1Gi", "1Gi"), (".001Ki", "1024m"), (".000001Ki", "1024u"),
    (".000000001Ki", "1024n"),
]


@pytest.mark.parametrize("written,expected", GO_TABLE)
def test_canonical_form_is_gos(written, expected):
    assert canonical(written) == expected
    assert is_canonical(expected)
    assert canonical("-" + written) == ("0" if expected == "0" else "-" + expected)


@pytest.mark.parametrize("written", ["2000m", "1.5Gi", "16384Mi", "0.5Gi", "1000"])
def test_what_a_stack_config_might_say_is_rewritten(written):
    assert not is_canonical(written)
    assert is_canonical(canonical(written))


@pytest.mark.parametrize("bad", ["", "Gi", "1 Gi", "1.2.3", "12GB", "0.0000000001"])
def test_not_a_quantity_is_refused(bad):
    with pytest.raises(QuantityError):
        canonical(bad)
