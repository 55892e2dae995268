"""Which structure names ``lsmseg evaluate`` takes (--structure, --mapping) and how each preset
names a case's structure."""

from __future__ import annotations

import pytest
from lsmseg_evaluation.categories import classify, known_structure

from lsmseg import structures


def test_every_name_lsmseg_knows_is_a_known_structure_for_evaluation():
    # src/lsmseg/structures.py is the project's list: evaluate must take every name predict takes.
    for name in (*structures.STRUCTURES, *structures.ALIASES):
        assert known_structure(name) is not None, name
    assert known_structure("vessels") == "blood_vessel" and known_structure("Blood_Vessel") == "blood_vessel"


@pytest.mark.parametrize("typo", ["blood_vesel", "microgila", "", "microglia2", "cfos neuron"])
def test_a_typo_is_not_a_known_structure(typo):
    assert known_structure(typo) is None


def test_2024_names_take_the_structure_the_2024_rule_scores_them_as():
    # 'cfos' / 'microglia' anywhere in the name, 'cfos' first, as the 2024 evaluator tests it.
    assert classify("x_microglia_h", preset="selma3d-2024") == ("microglia", "isolated-sparse", True)
    assert classify("brain_cfos_3", preset="selma3d-2024") == ("cfos_neuron", "isolated-sparse", True)
    assert classify("microglia_cfos_4", preset="selma3d-2024")[0] == "cfos_neuron"
    assert classify("x_microglia_h", {"x_microglia_h": {"structure": "cfos"}}, preset="selma3d-2024")[0] == "microglia"
    assert classify("blood_vessel_1", preset="selma3d-2024") == ("blood_vessel", "contiguous-dense", True)
    assert classify("vol9", preset="selma3d-2024") == ("unknown", "unknown", False)
    # 2026 unchanged: its prefixes only
    assert classify("x_microglia_h") == ("unknown", "unknown", False)
    assert classify("microglia_cfos_4") == ("microglia", "isolated-sparse", True)


@pytest.mark.parametrize("item, named", [("blood_vessel=vesels", "'vesels'"), ("blood_vesel=vessels", "blood_vesel")])
def test_validate_shipped_refuses_a_bad_predict_as_up_front(tmp_path, capsys, item, named):
    # A bad NAME used to stop the run inside lsmseg predict, after staging, with predict's usage text;
    # a bad STRUCTURE exited 1, as a failed run does.
    from lsmseg_evaluation import validate_shipped

    code = validate_shipped.main(["--predict-as", item, "--data", str(tmp_path), "--out", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and err.startswith(f"ERROR: --predict-as {item}:") and named in err
    assert not (tmp_path / "out").exists()


def test_validate_shipped_reuse_without_predictions_is_a_usage_error(tmp_path, capsys):
    from lsmseg_evaluation import validate_shipped

    assert validate_shipped.main(["--reuse-predictions", "--data", str(tmp_path), "-q"]) == 2  # was 1
    assert capsys.readouterr().err.strip() == "ERROR: --reuse-predictions needs --predictions DIR"


@pytest.mark.parametrize("field, value", [("structure", "blood_vesel"), ("label_scheme", "binry"),
                                          ("sparse_edge", "edge"), ("jobs", 0)])
def test_evaluation_settings_refuse_unknown_values(field, value):
    from lsmseg_evaluation.evaluate import EvaluationSettings

    with pytest.raises(ValueError, match=field):
        EvaluationSettings(**{field: value})
    EvaluationSettings(structure="Vessels", label_scheme="sparse", sparse_edge="background")  # aliases, any case


def test_a_mapping_entry_with_a_category_may_name_its_own_structure(tmp_path):
    # Only an entry without a category is refused for an unknown name: nothing says how to score it.
    from lsmseg_evaluation.categories import load_mapping

    mapping_file = tmp_path / "map.csv"
    mapping_file.write_text("name,structure,category\nbrain3,astrocytes,isolated-sparse\n")
    mapping = load_mapping(mapping_file)
    assert classify("brain3", mapping) == ("astrocytes", "isolated-sparse", False)
    mapping_file.write_text("name,structure,category\nbrain3,astrocytes,\n")
    with pytest.raises(Exception, match="'astrocytes' is not a known structure"):
        load_mapping(mapping_file)
