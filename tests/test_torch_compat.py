"""The torch adapter: the same answers on every supported torch, and one declared minimum."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.default_planner import (create_default_global_save_plan,
                                                          create_default_local_save_plan)
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

from asyncckpt import _torch_compat as compat

ROOT = Path(__file__).resolve().parents[1]


def _global_plan():
    state = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}
    plans, metadata = create_default_global_save_plan([create_default_local_save_plan(state, True)])
    return plans, metadata


def test_a_valid_plan_has_no_problems() -> None:
    plans, metadata = _global_plan()
    assert compat.global_plan_problems(plans, metadata) == []


def test_an_out_of_bounds_chunk_is_a_problem() -> None:
    plans, metadata = _global_plan()
    w = metadata.state_dict_metadata["w"]
    bad = ChunkStorageMetadata(offsets=torch.Size([2, 0]), sizes=torch.Size([4, 3]))
    metadata.state_dict_metadata["w"] = dataclasses.replace(w, chunks=[bad])
    problems = compat.global_plan_problems(plans, metadata)
    assert problems and all(isinstance(p, str) and p for p in problems)


def test_planner_raises_on_the_problems_of_either_torch() -> None:
    """planner's check goes through the adapter: no `join` of a bool on torch 2.11."""
    from asyncckpt.planner import _global_plan as plan_one

    state = {"w": torch.zeros(4, 3)}
    rank_plan = plan_one([create_default_local_save_plan(state, True)], 0)
    assert [it.index.fqn for it in rank_plan.global_plans[0].items] == ["w"]


@pytest.mark.parametrize("version, expected", [("2.11.0+cu130", (2, 11)), ("2.13.0", (2, 13)),
                                               ("2.12.1+cpu", (2, 12)), ("2.14.0a0+git1234", (2, 14))])
def test_torch_release_parses_local_and_pre_releases(version: str, expected: tuple[int, int]) -> None:
    assert compat.torch_release(version) == expected


def test_this_torch_is_supported() -> None:
    assert compat.torch_release() >= compat.MIN_TORCH


def _declared_minimum() -> tuple[int, int]:
    text = (ROOT / "pyproject.toml").read_text()
    found = re.findall(r'"torch>=(\d+)\.(\d+)(?:\.\d+)?"', text)
    assert len(found) == 1, f"pyproject.toml should declare torch>=X.Y once, found {found}"
    return int(found[0][0]), int(found[0][1])


def _oldest_in_ci() -> tuple[int, int]:
    text = (ROOT / ".ci" / "run").read_text()
    pins = [tuple(map(int, m)) for m in re.findall(r"(?:torch==|OLDEST_TORCH=)(\d+)\.(\d+)\.\d+", text)]
    assert pins, ".ci/run pins no torch version"
    return min(pins)


def test_declared_minimum_is_the_oldest_torch_ci_runs() -> None:
    assert _declared_minimum() == _oldest_in_ci() == compat.MIN_TORCH
