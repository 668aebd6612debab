import jsonschema
import pytest

from refrag.train.stages import STAGES, StageConfig, final_stage, get_stage, stage_config_schema


def test_each_stage_starts_from_an_earlier_one_or_the_base_models():
    names = list(STAGES)
    assert STAGES[names[0]].previous is None
    for i, stage in enumerate(STAGES.values()):
        assert stage.previous is None or stage.previous in names[:i]
    assert all(name == stage.name for name, stage in STAGES.items())
    assert [s.previous for s in STAGES.values()] == [
        None,
        "align",
        "reconstruct",
        "reconstruct",
        "cpt",
        "cpt",
        "mixed",
    ]
    ablations = {name for name, stage in STAGES.items() if stage.ablation}
    assert ablations == {"cpt_frozen"}
    assert not ablations & {stage.previous for stage in STAGES.values()}  # never built on


def test_the_final_stage_is_the_last_main_stage_listed():
    assert final_stage(["reconstruct", "cpt", "cpt_frozen"]) == "cpt"
    assert final_stage(["cpt_frozen", "reconstruct"]) == "reconstruct"
    with pytest.raises(ValueError, match="main"):
        final_stage(["cpt_frozen"])


def test_the_policy_stage_trains_only_its_policy_on_the_mixed_input_model():
    policy = STAGES["policy"].defaults
    assert STAGES["policy"].previous == "mixed" and STAGES["mixed"].previous == "cpt"
    assert not (policy.train_encoder or policy.train_projector or policy.train_decoder)
    assert STAGES["mixed"].defaults.train_decoder


def test_cpt_trains_the_decoder_and_its_ablation_keeps_it_frozen():
    assert STAGES["cpt"].defaults.train_decoder and not STAGES["cpt_frozen"].defaults.train_decoder
    assert not STAGES["reconstruct"].defaults.train_decoder


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_names_a_dataset_builder_and_a_trainer_that_exist(name):
    from refrag.train.stages import _resolve

    stage = STAGES[name]
    assert callable(_resolve(stage.dataset)) and callable(_resolve(stage.trainer))
    assert stage.data in ("alignment", "shards")


def test_unknown_stage_names_the_known_ones():
    with pytest.raises(ValueError, match="align, reconstruct, cpt, cpt_frozen, sft, mixed, policy"):
        get_stage("dpo")


def test_stage_config_rejects_unknown_hyperparameters():
    with pytest.raises(TypeError):
        StageConfig(stepz=3)
    with pytest.raises(TypeError):
        STAGES["cpt"].defaults.merged({"stepz": 3})


def test_overrides_keep_the_stage_defaults_they_do_not_name():
    defaults = STAGES["reconstruct"].defaults
    hp = defaults.merged({"lr": 1e-5})
    assert hp.lr == 1e-5 and (hp.curriculum, hp.steps) == (defaults.curriculum, defaults.steps)


def test_schema_covers_every_field_with_its_default_and_checks_values():
    schema = stage_config_schema(STAGES["cpt"].defaults)
    assert set(schema["properties"]) == set(StageConfig.__dataclass_fields__)
    assert schema["properties"]["lr"]["default"] == STAGES["cpt"].defaults.lr
    assert schema["properties"]["curriculum"]["items"] == {"type": "integer", "minimum": 1}
    jsonschema.validate({"steps": 3, "loss_weights": {"mse": 0.5}}, schema)
    for bad in ({"steps": 0}, {"stepz": 3}, {"train_decoder": "yes"}, {"loss_weights": {"l1": 1}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    assert "default" not in stage_config_schema()["properties"]["lr"]
