"""The default Triton model name, ``<pipeline dir>_<unit dir>`` (README, `pimoe-export triton` and `serve`), from the
unit's real place: a relative path, ``.`` or a path through a symlink names the same model as the absolute path."""

from __future__ import annotations

from pimoe_export.serve.triton import default_model_name


def test_the_name_comes_from_where_the_unit_really_is(tmp_path, monkeypatch) -> None:
    unit = tmp_path / "seed-512" / "ort-fp32"
    unit.mkdir(parents=True)
    assert default_model_name(unit) == "seed-512_ort-fp32"
    monkeypatch.chdir(tmp_path / "seed-512")
    assert default_model_name("ort-fp32") == "seed-512_ort-fp32"
    monkeypatch.chdir(unit)
    assert default_model_name(".") == "seed-512_ort-fp32"
    (tmp_path / "latest").symlink_to(unit)
    assert default_model_name(tmp_path / "latest") == "seed-512_ort-fp32"
