"""Tests for asyncckpt.config: ManagerOptions, and options and plans from YAML (pure)."""

from __future__ import annotations

import math

import pytest
import yaml

from asyncckpt.config import (
    ManagerOptions,
    PlanRequest,
    load_yaml_text,
    options_from_dict,
    plan_request,
    resolve_root,
    with_checkpoint_schedule,
)
from asyncckpt.errors import ConfigError
from asyncckpt.retention import Retention
from asyncckpt.schedule import Schedule, plan_checkpoints

# ---------------------------------------------------------------- ManagerOptions


def test_signal_options_defaults() -> None:
    opts = ManagerOptions()
    assert opts.save_on_signal is False and opts.signal_grace_s == 30.0


@pytest.mark.parametrize(
    ("kwargs", "quoted"),
    [
        ({"signal_grace_s": 0}, "signal_grace_s=0"),
        ({"signal_grace_s": -1.0}, "signal_grace_s=-1.0"),
        ({"signal_grace_s": math.inf}, "signal_grace_s=inf"),
        ({"signal_grace_s": math.nan}, "signal_grace_s=nan"),
        ({"signal_grace_s": "30"}, "signal_grace_s='30'"),
        ({"signal_grace_s": True}, "signal_grace_s=True"),
        ({"save_on_signal": "yes"}, "save_on_signal='yes'"),
    ],
)
def test_signal_options_rejected(kwargs: dict, quoted: str) -> None:
    with pytest.raises(ConfigError) as info:
        ManagerOptions(**kwargs)
    assert quoted in str(info.value)


# ---------------------------------------------------------------- load_yaml_text


def test_load_yaml_text() -> None:
    assert load_yaml_text("a: 1\n", "x.yaml") == {"a": 1}
    assert load_yaml_text("", "x.yaml") == {}


@pytest.mark.parametrize(
    ("text", "quoted"),
    [
        ("training: [1\n", "x.yaml is not valid YAML at line 2, column 1"),
        ("a: b: c\n", "x.yaml is not valid YAML at line 1"),
        ("- 1\n- 2\n", "expected a mapping at the top, found a list"),
        ("!!python/object:os.system {}\n", "x.yaml is not valid YAML"),  # safe_load only
    ],
)
def test_load_yaml_text_rejects(text: str, quoted: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_yaml_text(text, "x.yaml")
    assert quoted in str(info.value)


# ---------------------------------------------------------------- plan_request


@pytest.mark.parametrize(
    ("training", "total", "per_epoch"),
    [
        ({"total_steps": 500}, 500, 500),
        ({"epochs": 3, "steps_per_epoch": 100}, 300, 100),
        ({"total_steps": 300, "steps_per_epoch": 100}, 300, 100),
        ({"total_steps": 300, "epochs": 3}, 300, 100),
        ({"total_steps": 300, "epochs": 3, "steps_per_epoch": 100}, 300, 100),
        ({"total_steps": 3.0e2, "lr": 0.1, "batch_size": 8}, 300, 300),  # trainer keys ignored
    ],
)
def test_plan_request_lengths(training: dict, total: int, per_epoch: int) -> None:
    req = plan_request({"training": training})
    assert (req.total_steps, req.steps_per_epoch) == (total, per_epoch)


def test_plan_request_reads_every_key_and_plans_like_plan_checkpoints() -> None:
    config = {"training": {"epochs": 4, "steps_per_epoch": 1000, "dataset_tokens": 12_000_000,
                           "target_checkpoints": 30, "log_steps_first_epoch": False,
                           "min_checkpoint_interval": 50}}
    req = plan_request(config)
    assert req == PlanRequest(total_steps=4000, steps_per_epoch=1000, target=30,
                              dataset_tokens=12_000_000, log_steps_first_epoch=False, min_interval=50)
    assert req.plan() == plan_checkpoints(4000, 1000, target=30, log_steps_first_epoch=False,
                                          min_interval=50)
    assert req.target_for() == (30, "training.target_checkpoints")


def test_plan_request_target_for_dataset_size() -> None:
    req = plan_request({"training": {"total_steps": 10_000, "dataset_tokens": 30_000_000}})
    assert req.target_for() == (100, "large dataset")
    assert req.target_for({"large": 30}) == (30, "large dataset")
    assert len(req.plan({"large": 30})) == 30
    assert plan_request({"training": {"total_steps": 10}}).target_for()[0] is None


@pytest.mark.parametrize(
    ("config", "quoted"),
    [
        ({}, "x.yaml: training.total_steps is missing"),
        ({"training": None}, "training.total_steps is missing"),
        ({"training": {"epochs": 3}}, "training.total_steps is missing"),
        ({"training": [1, 2]}, "x.yaml: training=[1, 2] is not valid: expected a mapping"),
        ({"training": {"total_steps": 0}}, "x.yaml: training.total_steps=0 is not valid"),
        ({"training": {"total_steps": "10"}}, "training.total_steps='10'"),
        ({"training": {"total_steps": 10, "target_checkpoints": -1}}, "target_checkpoints=-1"),
        ({"training": {"total_steps": 10, "dataset_tokens": "3e7"}}, "dataset_tokens='3e7'"),
        ({"training": {"total_steps": 10, "log_steps_first_epoch": "no"}}, "log_steps_first_epoch='no'"),
        ({"training": {"total_steps": 10, "min_checkpoint_interval": 0}}, "min_checkpoint_interval=0"),
        ({"training": {"total_steps": 301, "epochs": 3, "steps_per_epoch": 100}}, "disagrees"),
        ({"training": {"total_step": 10}}, "unknown key 'total_step'; did you mean 'total_steps'?"),
        ({"training": {"total_steps": 10, "steps_per_epochs": 5}}, "did you mean 'steps_per_epoch'?"),
    ],
)
def test_plan_request_rejects(config: dict, quoted: str) -> None:
    with pytest.raises(ConfigError) as info:
        plan_request(config, "x.yaml")
    assert quoted in str(info.value)


# ---------------------------------------------------------------- options_from_dict


def test_options_from_dict_full_section() -> None:
    root, opts = options_from_dict({"checkpoint": {
        "root": "runs/a", "compression": None, "max_pending": 3, "save_on_signal": True,
        "signal_grace_s": 5, "storage_options": {"anon": True},
        "retention": {"keep_last": 3, "keep_best": 1, "best_metric": "val_loss", "best_mode": "min"},
        "schedule": {"every_n_steps": 500, "on_epoch_end": True, "param_milestones": "1K,5K"},
    }, "model": {"width": 3}})
    assert root == "runs/a"
    assert opts.retention == Retention(keep_last=3, keep_best=1, best_metric="val_loss")
    assert opts.schedule == Schedule(every_n_steps=500, on_epoch_end=True, param_milestones=[1000, 5000])
    assert (opts.compression, opts.max_pending, opts.save_on_signal, opts.signal_grace_s) == (None, 3, True, 5)
    assert opts.storage_options == {"anon": True}


def test_options_from_dict_overrides() -> None:
    root, opts = options_from_dict({"checkpoint": {"root": "a", "schedule": {"every_n_steps": 5}}},
                                   overrides={"root": "b", "schedule": Schedule(every_n_steps=7)})
    assert root == "b" and opts.schedule == Schedule(every_n_steps=7)


def test_schedule_from_training_checkpoint_schedule() -> None:
    config = {"training": {"total_steps": 100, "checkpoint_schedule": [10, 50, 100]},
              "checkpoint": {"root": "r"}}
    assert options_from_dict(config)[1].schedule == Schedule(at_steps=[10, 50, 100])
    config["checkpoint"]["schedule"] = {"on_epoch_end": True}  # merged: at_steps added
    assert options_from_dict(config)[1].schedule == Schedule(on_epoch_end=True, at_steps=[10, 50, 100])
    config["checkpoint"]["schedule"] = {"at_steps": [7]}  # an explicit at_steps wins
    assert options_from_dict(config)[1].schedule == Schedule(at_steps=[7])


def test_auto_generate_checkpoints() -> None:
    training = {"epochs": 2, "steps_per_epoch": 1000, "target_checkpoints": 12,
                "auto_generate_checkpoints": True}
    _, opts = options_from_dict({"training": training, "checkpoint": {"root": "r"}})
    assert opts.schedule == Schedule(at_steps=plan_checkpoints(2000, 1000, target=12))
    assert len(opts.schedule.at_steps) == 12
    training["auto_generate_checkpoints"] = False
    assert options_from_dict({"training": training, "checkpoint": {"root": "r"}})[1].schedule is None


@pytest.mark.parametrize(
    ("config", "quoted"),
    [
        ({}, "x.yaml: checkpoint.root is missing"),
        ({"checkpoint": {"root": ""}}, "checkpoint.root is missing"),
        ({"checkpoint": "runs/a"}, "x.yaml: checkpoint='runs/a' is not valid: expected a mapping"),
        ({"checkpoint": {"root": "r", "keep_last": 3}}, "x.yaml: checkpoint: unknown key 'keep_last'"),
        ({"checkpoint": {"root": "r", "compresion": "zstd"}}, "did you mean 'compression'?"),
        ({"checkpoint": {"root": "r", "retention": {"keep_lst": 3}}},
         "x.yaml: checkpoint.retention: unknown key 'keep_lst'; did you mean 'keep_last'?"),
        ({"checkpoint": {"root": "r", "schedule": {"every": 3}}}, "checkpoint.schedule: unknown key 'every'"),
        ({"checkpoint": {"root": "r", "schedule": {"every_n_steps": 0}}},
         "x.yaml: checkpoint.schedule: every_n_steps=0 is not valid"),
        ({"checkpoint": {"root": "r", "schedule": "every 5"}}, "x.yaml: checkpoint: schedule='every 5'"),
        ({"checkpoint": {"root": "r", "compression": "lz4"}}, "x.yaml: checkpoint: compression='lz4'"),
        ({"checkpoint": {"root": "r"}, "training": {"checkpoint_schedule": [0, 5]}},
         "x.yaml: training.checkpoint_schedule: at_steps=[0, 5]"),
        ({"checkpoint": {"root": "r"}, "training": {"auto_generate_checkpoints": "yes"}},
         "training.auto_generate_checkpoints='yes'"),
        ({"checkpoint": {"root": "r"}, "training": {"auto_generate_checkpoints": True}},
         "training.total_steps is missing"),
    ],
)
def test_options_from_dict_rejects(config: dict, quoted: str) -> None:
    with pytest.raises(ConfigError) as info:
        options_from_dict(config, "x.yaml")
    assert quoted in str(info.value)


# ---------------------------------------------------------------- with_checkpoint_schedule

DOC = """\
# experiment 7
model:
  width: 128   # hidden size
training:
  # length of the run
  total_steps: 10000
  lr: 0.1
checkpoint:
  root: runs/x
"""


def _expected(text: str, plan: list[int]) -> dict:
    data = yaml.safe_load(text)
    data["training"] = {**(data.get("training") or {}), "checkpoint_schedule": plan}
    return data


def test_with_checkpoint_schedule_adds_the_key_and_keeps_comments() -> None:
    out, kept = with_checkpoint_schedule(DOC, [1, 2, 4])
    assert kept
    assert out == DOC.replace("  lr: 0.1\n", "  lr: 0.1\n  checkpoint_schedule: [1, 2, 4]\n")


@pytest.mark.parametrize(
    "old",
    [
        "  checkpoint_schedule: [5, 6]\n",
        "  checkpoint_schedule:\n  - 5\n  - 6\n",
        "  checkpoint_schedule:\n    - 5\n\n    - 6\n",
        "  checkpoint_schedule: [5,\n    6]\n",
        "  checkpoint_schedule:   # planned\n  - 5\n",
    ],
)
def test_with_checkpoint_schedule_replaces_an_old_plan(old: str) -> None:
    text = DOC.replace("  lr: 0.1\n", f"{old}  # the learning rate\n  lr: 0.1\n")
    out, kept = with_checkpoint_schedule(text, [1, 2])
    assert kept
    assert out == DOC.replace("  lr: 0.1\n", "  checkpoint_schedule: [1, 2]\n  # the learning rate\n  lr: 0.1\n")


@pytest.mark.parametrize(
    "text",
    [
        "training:",  # no newline, no body
        "training:\n",
        "training:   # the run\n    total_steps: 5\n",  # 4-space indent
        "a: 1\ntraining:\n  total_steps: 5\n\n\n# trailing comment\n",
        "training:\r\n  total_steps: 5\r\nb: 2\r\n",
    ],
)
def test_with_checkpoint_schedule_layouts(text: str) -> None:
    out, kept = with_checkpoint_schedule(text, [3, 5])
    assert kept
    assert yaml.safe_load(out) == _expected(text, [3, 5])


@pytest.mark.parametrize("text", ["training: {total_steps: 5}\n", "a: 1\n", "{training: {total_steps: 5}}\n"])
def test_with_checkpoint_schedule_falls_back_to_a_dump(text: str) -> None:
    out, kept = with_checkpoint_schedule(text, [3, 5])
    assert not kept
    assert yaml.safe_load(out) == _expected(text, [3, 5])


def test_with_checkpoint_schedule_wraps_long_plans() -> None:
    plan = list(range(1, 10_001, 37))
    out, kept = with_checkpoint_schedule(DOC, plan)
    assert kept and max(len(line) for line in out.splitlines()) <= 100
    assert yaml.safe_load(out) == _expected(DOC, plan)


def test_with_checkpoint_schedule_rejects_bad_yaml() -> None:
    with pytest.raises(ConfigError, match="x.yaml is not valid YAML"):
        with_checkpoint_schedule("training: [", [1], "x.yaml")


# ---------------------------------------------------------------- hostile and odd inputs

def test_a_yaml_file_that_is_not_utf8_names_the_file_and_the_byte() -> None:
    from asyncckpt.config import decode_yaml

    data = "training:\n  total_steps: 10  # café\n".encode("latin-1")
    with pytest.raises(ConfigError) as info:
        decode_yaml(data, "x.yaml")
    assert "x.yaml is not valid: not UTF-8 text (byte b'\\xe9' at offset 34, line 2)" in str(info.value)
    assert decode_yaml("\ufeffa: 1\n".encode(), "x.yaml") == "a: 1\n"   # a BOM is fine


def test_yaml_nested_too_deeply_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="x.yaml is not valid YAML: nested too deeply"):
        load_yaml_text("[" * 5000 + "]" * 5000, "x.yaml")


@pytest.mark.parametrize("root", [5, 1.5, True, [1], {"a": 1}, 10**30, math.nan])
def test_a_root_that_is_not_text_is_named_not_called_missing(root: object) -> None:
    with pytest.raises(ConfigError) as info:
        options_from_dict({"checkpoint": {"root": root}}, "x.yaml")
    text = str(info.value)
    assert f"x.yaml: checkpoint.root={root!r} is not valid" in text and "missing" not in text


HUGE = 10**30
BAD_SECONDS = [0, -1, math.nan, math.inf, HUGE, 1e10, 30 * 24 * 3600 + 1, "10", True, None, [1]]


@pytest.mark.parametrize("name", ["lease_heartbeat_s", "lease_timeout_s", "signal_grace_s"])
@pytest.mark.parametrize("value", BAD_SECONDS)
def test_wait_options_out_of_range_are_config_errors(name: str, value: object) -> None:
    other = {"lease_timeout_s": 10**9} if name == "lease_heartbeat_s" else {}
    with pytest.raises(ConfigError) as info:
        ManagerOptions(**{name: value, **other})
    assert f"{name}={value!r} is not valid" in str(info.value)
    with pytest.raises(ConfigError) as info:                    # and from YAML, naming the file
        options_from_dict({"checkpoint": {"root": "r", name: value}}, "x.yaml")
    assert str(info.value).startswith(f"x.yaml: checkpoint: {name}={value!r} is not valid")


def test_the_longest_wait_is_accepted() -> None:
    from asyncckpt.config import MAX_WAIT_S

    opts = ManagerOptions(lease_heartbeat_s=MAX_WAIT_S - 1, lease_timeout_s=MAX_WAIT_S, signal_grace_s=MAX_WAIT_S)
    assert opts.lease_timeout_s == MAX_WAIT_S == 30 * 24 * 3600


@pytest.mark.parametrize(
    ("name", "value"),
    [("writer_threads", HUGE), ("writer_threads", 1025), ("upload_concurrency", HUGE),
     ("upload_part_bytes", HUGE), ("upload_part_bytes", (5 << 30) + 1), ("max_pending", 2.0),
     ("zstd_level", HUGE), ("pinned_memory_budget", math.inf), ("writer_threads", None)],
)
def test_int_options_out_of_range_are_config_errors(name: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        ManagerOptions(**{name: value})
    assert str(info.value).startswith(f"{name}={value!r} is not valid")


@pytest.mark.parametrize(
    ("training", "quoted"),
    [
        ({"total_steps": 10**10}, "x.yaml: training.total_steps=10000000000 is not valid: expected an "
                                  "integer in [1, 9999999999]"),
        ({"total_steps": 1e300}, "training.total_steps=1e+300 is not valid"),
        ({"total_steps": math.nan}, "training.total_steps=nan is not valid"),
        ({"total_steps": math.inf}, "training.total_steps=inf is not valid"),
        ({"epochs": 10**7, "steps_per_epoch": 10}, "training.epochs=10000000 is not valid"),
        ({"epochs": 10**6, "steps_per_epoch": 10**5},
         "training.total_steps (epochs x steps_per_epoch)=100000000000 is not valid"),
        ({"total_steps": 10**8, "steps_per_epoch": 10},
         "x.yaml: training.steps_per_epoch=10 is not valid: expected at least total_steps / 1,000,000"),
        ({"total_steps": 1000, "target_checkpoints": 10**7},
         "training.target_checkpoints=10000000 is not valid: expected an integer in [0, 1000000]"),
        ({"total_steps": 1000, "target_checkpoints": HUGE}, "training.target_checkpoints="),
        ({"total_steps": 1000, "dataset_tokens": math.inf}, "training.dataset_tokens=inf"),
        ({"total_steps": 1000, "min_checkpoint_interval": math.nan}, "training.min_checkpoint_interval=nan"),
        ({"total_steps": 1000, "log_steps_first_epoch": "no"}, "training.log_steps_first_epoch='no'"),
    ],
)
def test_plan_requests_out_of_range_are_config_errors(training: dict, quoted: str) -> None:
    config = {"training": {**training, "auto_generate_checkpoints": True}, "checkpoint": {"root": "r"}}
    for call in (lambda: plan_request(config, "x.yaml").plan(), lambda: options_from_dict(config, "x.yaml")):
        with pytest.raises(ConfigError) as info:
            call()
        assert quoted in str(info.value)


@pytest.mark.parametrize(
    ("steps", "quoted"),
    [([1, 10**10], "x.yaml: training.checkpoint_schedule: at_steps=[1, 10000000000] is not valid"),
     ([1, HUGE], "not 1000000000000000000000000000000"),
     ([1, math.nan], "not nan"),
     (list(range(1, 1_000_002)), "at_steps has more than 1,000,000 steps")],
)
def test_planned_steps_past_the_bounds_are_config_errors(steps: list, quoted: str) -> None:
    config = {"training": {"checkpoint_schedule": steps}, "checkpoint": {"root": "r"}}
    with pytest.raises(ConfigError) as info:
        options_from_dict(config, "x.yaml")
    assert "x.yaml: training.checkpoint_schedule" in str(info.value) and quoted in str(info.value)


@pytest.mark.parametrize(
    ("retention", "quoted"),
    [({"best_metric": 5}, "best_metric=5"), ({"best_metric": [None]}, "best_metric=[None]"),
     ({"best_metric": ["a", "a"]}, "best_metric=['a', 'a']"), ({"best_metric": ""}, "best_metric=''"),
     ({"best_metric": "a", "best_mode": "best"}, "best_mode='best'"),
     ({"best_metric": "a", "best_mode": {"a": math.nan}}, "best_mode={'a': nan}"),
     ({"best_metric": "a", "best_mode": {"b": "min"}}, "best_mode={'b': 'min'}"),
     ({"best_metric": "a", "best_mode": ["min"]}, "best_mode=['min']"),
     ({"keep_best": math.inf, "best_metric": "a"}, "keep_best=inf"),
     ({"keep_best": 1}, "best_metric=None"), ({"keep_last": math.nan}, "keep_last=nan"),
     ({"keep_tags": [5]}, "keep_tags=[5]")],
)
def test_bad_metric_options_from_yaml_are_config_errors(retention: dict, quoted: str) -> None:
    with pytest.raises(ConfigError) as info:
        options_from_dict({"checkpoint": {"root": "r", "retention": retention}}, "x.yaml")
    assert str(info.value).startswith("x.yaml: checkpoint.retention: ") and quoted in str(info.value)


# ---------------------------------------------------------------- target_checkpoints by size category
SIZES = {"small": 20, "medium": 50, "large": 100, "xlarge": 200}


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        (9_999_999, (20, "small dataset, training.target_checkpoints.small")),
        (12_000_000, (50, "medium dataset, training.target_checkpoints.medium")),
        (50_000_000, (100, "large dataset, training.target_checkpoints.large")),
        (10**11, (200, "xlarge dataset, training.target_checkpoints.xlarge")),
    ],
)
def test_target_checkpoints_mapping_picks_by_dataset_tokens(tokens: int, expected: tuple) -> None:
    req = plan_request({"training": {"total_steps": 100_000, "dataset_tokens": tokens,
                                     "target_checkpoints": {**SIZES, "small": 20.0}}}, "x.yaml")
    assert req.target == SIZES
    assert req.target_for() == expected
    assert len(req.plan()) == expected[0]
    category = expected[1].split()[0]
    assert req.target_for({category: 3}) == (3, f"{category} dataset")  # --targets wins


@pytest.mark.parametrize(
    ("training", "quoted"),
    [
        ({"target_checkpoints": {**SIZES, "huge": 5}},
         "x.yaml: training.target_checkpoints: unknown size category 'huge' (=5); expected small, "
         "medium, large, xlarge"),
        ({"target_checkpoints": {"small": 1, "large": 2}},
         "x.yaml: training.target_checkpoints={'small': 1, 'large': 2} is not valid: expected a mapping "
         "from each of small/medium/large/xlarge to an int in [0, 1000000]; missing medium, xlarge"),
        ({"target_checkpoints": {**SIZES, "medium": "50"}},
         "x.yaml: training.target_checkpoints.medium='50' is not valid: expected an integer in [0, 1000000]"),
        ({"target_checkpoints": {**SIZES, "medium": 2.5}}, "x.yaml: training.target_checkpoints.medium=2.5"),
        ({"target_checkpoints": {**SIZES, "medium": None}}, "x.yaml: training.target_checkpoints.medium=None"),
        ({"target_checkpoints": {**SIZES, "xlarge": -3}}, "x.yaml: training.target_checkpoints.xlarge=-3"),
        ({"target_checkpoints": {**SIZES, 1: 3}}, "x.yaml: training.target_checkpoints: unknown size category 1"),
        ({"target_checkpoints": {}}, "missing small, medium, large, xlarge"),
        ({"target_checkpoints": [20, 50]}, "x.yaml: training.target_checkpoints=[20, 50] is not valid"),
        ({"target_checkpoints": SIZES},
         "x.yaml: training.target_checkpoints={'small': 20, 'medium': 50, 'large': 100, 'xlarge': 200} "
         "picks the target by dataset size category: training.dataset_tokens (the dataset's size in "
         "tokens) is needed"),
        ({"target_checkpoints": SIZES, "dataset_path": "data/train.bin"},
         "is needed (training.dataset_path is given, but its size in tokens depends on the file "
         "format and the tokenizer: asyncckpt does not guess it)"),
    ],
)
def test_target_checkpoints_mapping_rejects(training: dict, quoted: str) -> None:
    config = {"training": {"total_steps": 1000, **training, "auto_generate_checkpoints": True},
              "checkpoint": {"root": "r"}}
    for call in (lambda: plan_request(config, "x.yaml"), lambda: options_from_dict(config, "x.yaml")):
        with pytest.raises(ConfigError) as info:
            call()
        assert quoted in str(info.value)


def test_target_checkpoints_mapping_gives_from_config_its_plan() -> None:
    training = {"total_steps": 10_000, "steps_per_epoch": 1000, "dataset_tokens": 30_000_000,
                "target_checkpoints": {**SIZES, "large": 25}, "auto_generate_checkpoints": True}
    _, options = options_from_dict({"training": training, "checkpoint": {"root": "r"}})
    assert options.schedule.at_steps == tuple(plan_checkpoints(10_000, 1000, target=25))


# ---------------------------------------------------------------- checkpoint.root relative to the file
@pytest.mark.parametrize(
    ("root", "base", "expected"),
    [
        ("runs/ckpt", "/etc/exp", "/etc/exp/runs/ckpt"),
        ("./ckpt", "/etc/exp", "/etc/exp/./ckpt"),
        ("../ckpt", "/etc/exp", "/etc/exp/../ckpt"),
        ("runs/ckpt", None, "runs/ckpt"),                  # a dict config: the working directory
        ("/abs/ckpt", "/etc/exp", "/abs/ckpt"),
        ("~/ckpt", "/etc/exp", "~/ckpt"),
        ("s3://bucket/run", "/etc/exp", "s3://bucket/run"),
        ("file:///data/run", "/etc/exp", "file:///data/run"),
        ("memory://run", "/etc/exp", "memory://run"),
    ],
)
def test_resolve_root(root: str, base: str | None, expected: str) -> None:
    assert resolve_root(root, base) == expected


def test_options_from_dict_resolves_the_files_root_not_an_override() -> None:
    config = {"checkpoint": {"root": "runs/ckpt"}}
    assert options_from_dict(config, "x.yaml", base_dir="/etc/exp")[0] == "/etc/exp/runs/ckpt"
    assert options_from_dict(config, "x.yaml")[0] == "runs/ckpt"
    assert options_from_dict(config, "x.yaml", {"root": "other"}, base_dir="/etc/exp")[0] == "other"
