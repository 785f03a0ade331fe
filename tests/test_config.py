import pytest

from hsplitlora.config import ConfigError, RunConfig, load_config


def _write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = load_config(None)
    assert cfg.train.mode == "splitlora" and cfg.model.name == "smollm2-135m"
    again = load_config(_write(tmp_path, cfg.to_yaml()))
    assert again == cfg


def test_unknown_field_names_path_and_suggests(tmp_path):
    path = _write(tmp_path, "train:\n  stpes: 10\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg
    assert "train.stpes: unknown field 'stpes' (did you mean 'steps'?)" in msg
    assert "allowed here:" in msg and "agg_interval" in msg


def test_bad_choice_lists_allowed_values(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, "train:\n  mode: fedsplit\n"))
    msg = str(e.value)
    assert "train.mode" in msg
    for allowed in ("'centralized'", "'split'", "'splitfed'", "'splitlora'"):
        assert allowed in msg
    assert "got 'fedsplit'" in msg


def test_out_of_range_value_and_type(tmp_path):
    with pytest.raises(ConfigError, match=r"lora\.r: Input should be greater than or equal to 1"):
        load_config(None, ["lora.r=0"])
    with pytest.raises(ConfigError, match=r"train\.steps: .*integer"):
        load_config(None, ["train.steps=many"])


def test_missing_data_file_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"data file .*nope.csv does not exist.*data.train_files"):
        load_config(_write(tmp_path, "data:\n  train_files: [nope.csv]\n"))


def test_not_a_mapping_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "train: [\n"))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.yaml")


def test_overrides_and_cross_field_check():
    cfg = load_config(None, ["train.steps=7", "lora.targets=[q_proj]"])
    assert cfg.train.steps == 7 and cfg.lora.targets == ["q_proj"]
    with pytest.raises(ConfigError, match="override 'train.steps' must look like"):
        load_config(None, ["train.steps"])
    with pytest.raises(ConfigError, match="bfloat16' needs train.precision 'bf16'"):
        load_config(None, ["model.dtype=bfloat16", "train.precision=fp32"])


def test_shipped_configs_validate():
    from tests.conftest import REPO

    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        assert isinstance(load_config(path), RunConfig)


def test_shipped_experiments_validate_and_share_the_headline_base():
    """Every experiment file expands to valid run configs; the capacity check's runs
    differ from the headline grid's SplitLoRA runs only in what their variants set."""
    from hsplitlora.experiment import _flat, load_experiment
    from tests.conftest import REPO

    files = sorted((REPO / "configs" / "experiments").glob("*.yaml"))
    experiments = {p.stem: load_experiment(p) for p in files
                   if not p.stem.endswith("_base")}
    assert {"hsplitlora_table", "hsplitlora_capacity", "splitlora_table"} <= set(experiments)
    table = {r.name: r.config for r in experiments["hsplitlora_table"].runs}
    for run in experiments["hsplitlora_capacity"].runs:
        twin = table[run.name.replace(run.values["variant"], "splitlora")]
        ours, theirs = (_flat(c.model_dump(mode="json")) for c in (run.config, twin))
        changed = {k for k in ours if ours[k] != theirs[k]} - {"output.dir", "output.name"}
        assert changed == ({"lora.targets"} if "cut1" not in run.name
                           else {"lora.targets", "train.cut"}), run.name


def test_a_shared_server_side_is_refused_where_it_cannot_run():
    base = {"train": {"mode": "hsplitlora"}, "hetero": {"server_side": "shared"}}
    assert RunConfig.model_validate(base).server_side == "shared"
    assert RunConfig.model_validate({"train": {"mode": "hsplitlora"}}).server_side == (
        "shared")  # the mode's
    assert RunConfig.model_validate({"train": {"mode": "hetlora"}}).server_side == (
        "per_participant")
    assert RunConfig.model_validate({"train": {"mode": "splitlora"}}).server_side == "shared"
    for aggregator in ("zeropad", "svd"):  # a shared side takes part in their aggregations
        assert RunConfig.model_validate({"train": {"mode": "hsplitlora"}, "hetero": {
            "aggregator": aggregator}}).server_side == "shared"
    assert RunConfig.model_validate({"train": {"mode": "flexlora"}, "hetero": {
        "server_side": "shared"}}).server_side == "shared"
    for raw, message in [
        ({**base, "hetero": {"server_side": "shared", "aggregator": "fedavg"}},
         r"'shared' needs a split run with an aggregator it can take part in \(noisefree, "
         r"stack, svd, zeropad\), not 'fedavg'; set hetero.server_side: per_participant"),
        ({"train": {"mode": "hsplitlora"}, "hetero": {"aggregator": "fedavg"}},
         r"hsplitlora's shared server side needs a split run with an aggregator"),
        ({"train": {"mode": "flexlora"}, "hetero": {"federated": True,
                                                   "server_side": "shared"}},
         r"not 'svd' with hetero.federated"),
        ({"train": {"mode": "splitfed"}, "hetero": {"server_side": "shared"}},
         r"applies to the planned modes, not 'splitfed', whose server side is per participant"),
    ]:
        with pytest.raises(ValueError, match=message):
            RunConfig.model_validate(raw)


def test_train_device_takes_cuda_n_and_a_missing_device_is_named(monkeypatch):
    import torch
    from pydantic import ValidationError

    from hsplitlora.errors import UserError
    from hsplitlora.runtime.device import resolve_device

    cfg = RunConfig.model_validate({"train": {"device": "cuda:1"}})
    assert cfg.train.device == "cuda:1"
    with pytest.raises(ValidationError, match="train.device"):
        RunConfig.model_validate({"train": {"device": "gpu"}})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UserError, match=r"only 2 CUDA device\(s\) are visible \(cuda:0..cuda:1\)"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA device is visible here"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_padding_that_could_pass_max_length_is_refused():
    for bad in (256, 24):
        with pytest.raises(ConfigError, match=f"pad_to_multiple_of {bad} does not divide "
                                              "data.max_length 128"):
            load_config(None, [f"data.pad_to_multiple_of={bad}"])
    assert load_config(None, ["data.pad_to_multiple_of=16"]).data.pad_to_multiple_of == 16
