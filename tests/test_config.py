import pytest

from pipeline.config import ConfigError, load_params, validate
from pipeline.part_names import validate as validate_names
from tests.conftest import REPO, smoke_raw, write_params


def test_shipped_params_and_smoke_profile_validate():
    default = load_params(REPO / "params.yaml")
    smoke = load_params(REPO / "params.yaml", "smoke")
    assert default.sft.steps > smoke.sft.steps
    # The profile overrides only what it names; the rest comes from params.yaml.
    assert smoke.sft.lr == default.sft.lr


def test_unknown_key_is_named(tmp_path):
    raw = smoke_raw()
    raw["sft"]["learning_rate"] = 0.1
    with pytest.raises(ConfigError, match=r"sft\.learning_rate: unknown key"):
        load_params(write_params(tmp_path, raw))


def test_wrong_type_is_named(tmp_path):
    raw = smoke_raw()
    raw["sft"]["batch_size"] = "many"
    with pytest.raises(ConfigError, match=r"params\.yaml.*sft\.batch_size"):
        load_params(write_params(tmp_path, raw))


def test_unknown_degradation_and_parameter_are_named():
    raw = smoke_raw()
    raw["prepare"]["degradations"]["tasks"]["fog"] = {"weight": 1}
    validate(raw, "x")  # the schema knows no degradation; the names are checked against them
    with pytest.raises(ConfigError, match=r"prepare\.degradations\.tasks\.fog: unknown degradation 'fog'"):
        validate_names(raw, "x")
    raw = smoke_raw()
    raw["prepare"]["degradations"]["tasks"]["jpeg"]["params"] = {"qualty": [10, 20]}
    with pytest.raises(ConfigError, match=r"tasks\.jpeg\.params\.qualty: not a parameter of jpeg"):
        validate_names(raw, "x")


def test_source_kind_needs_path():
    raw = smoke_raw()
    raw["prepare"]["source"] = {"kind": "folder"}
    with pytest.raises(ConfigError, match="source.path is required"):
        validate(raw, "x")


def test_missing_file_and_unknown_profile(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: file not found"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="profile 'gigantic' not found"):
        load_params(REPO / "params.yaml", "gigantic")


def test_section_hash_tracks_only_named_sections():
    a = validate(smoke_raw(), "x")
    raw = smoke_raw()
    raw["evaluate"]["grid_images"] = 2
    b = validate(raw, "x")
    assert a.section_hash("sft") == b.section_hash("sft")
    assert a.section_hash("evaluate") != b.section_hash("evaluate")


def test_a_profile_can_be_a_file_of_ones_own(tmp_path):
    from pipeline.config import load_params

    mine = tmp_path / "mine.yaml"
    mine.write_text("sft: {steps: 7}\n")
    assert load_params(REPO / "params.yaml", str(mine)).sft.steps == 7
    with pytest.raises(ConfigError, match=r"missing.yaml: file not found"):
        load_params(REPO / "params.yaml", str(tmp_path / "missing.yaml"))
