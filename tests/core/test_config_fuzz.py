"""A seeded config fuzz against PEFT: every mutated LoraConfig, adapter_config.json and config.yaml
gives a typed lorakit error or a result identical to PEFT's (the engine, its verdicts and the
deliberate differences are in `config_fuzz`; `bench/hostile/configs.py` runs the same over more
cases)."""

import collections

import pytest

from .config_fuzz import DELIBERATE, campaign


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory):
    return campaign(seed=16, config_cases=240, file_cases=50, yaml_cases=160, compare_every=2,
                    workdir=tmp_path_factory.mktemp("fuzz"))


def test_no_case_escapes_as_an_untyped_exception(verdicts):
    untyped = [f"{v.door}: {v.case!r:.200} -> {v.detail}" for v in verdicts if v.kind == "untyped"]
    assert not untyped, "\n".join(untyped)


def test_lorakit_and_peft_agree_on_every_case_lorakit_accepts(verdicts):
    mismatches = [f"{v.door}: {v.case!r:.200} -> {v.detail}" for v in verdicts if v.kind == "mismatch"]
    assert not mismatches, "\n".join(mismatches)


def test_the_campaign_covers_every_door_and_outcome(verdicts):
    counts = collections.Counter((v.door, v.kind) for v in verdicts)
    for door in ("kwargs", "dict", "file", "yaml"):
        assert counts[(door, "typed")] >= 10, counts
        assert counts[(door, "identical")] >= 5, counts
    compared = [v for v in verdicts if "outputs compared" in v.detail]
    assert len(compared) >= 10, "adapters saved by lorakit and loaded by PEFT with the same logits"
    assert counts[("file", "typed")] + counts[("file", "deliberate")] >= 25


def test_every_deliberate_difference_is_one_of_the_documented_ones(verdicts):
    used = {reason for v in verdicts if v.kind == "deliberate" for reason in v.detail.split(" | ", 1)[1].split(" || ")}
    assert used and used <= set(DELIBERATE.values())
