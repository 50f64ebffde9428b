"""Small helpers of pimoe_export.interface with known answers."""

from __future__ import annotations

from pimoe_export.interface import element_count, sm_names, tolerances_for, version_tuple


# ------------------------------------------------------------------------------------------ interface helpers
def test_interface_small_helpers() -> None:
    assert version_tuple("1.21.0.dev20250101") == (1, 21, 0)
    assert version_tuple("2.13.0+cpu") == (2, 13, 0)
    assert version_tuple("1.x.3") == (1,)
    assert version_tuple("10.4.1.2") == (10, 4, 1)
    assert element_count((3, 5, 7)) == 105 and element_count(()) == 1
    assert sm_names(("80", "90")) == ["sm_80", "sm_90"]
    assert tolerances_for("w8a8_dynamic") is tolerances_for("w8a8")
    assert tolerances_for("no-such-precision") is tolerances_for("fp32")
    assert tolerances_for("fp16").error_quantile == 0.98
