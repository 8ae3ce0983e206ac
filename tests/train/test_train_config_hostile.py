"""config.yaml values of the wrong kind are ConfigErrors naming the field, never a TypeError or
RecursionError from deeper in the trainer."""

import pytest

from lorakit import ConfigError
from lorakit.train.config import load_train_config


@pytest.mark.parametrize("text, words", [
    ("warmup_ratio: fast\n", "warmup_ratio='fast'"),
    ("weight_decay: [1]\n", "weight_decay=[1]"),
    ("val_fraction: lots\n", "val_fraction='lots'"),
    ("preset: [balanced]\n", "preset=['balanced']"),
    ("method: {a: 1}\n", "method={'a': 1}"),
    ("method: adalora\nmax_steps: many\n", "max_steps='many'"),
    ("model: 42\n", "model=42"),
    ("output_dir: [a, b]\n", "output_dir=['a', 'b']"),
    ("extra: [1]\n", "extra=[1]"),
    ("epochs: true\n", "epochs=True"),
    ("seed: -1\n", "seed=-1"),
    ("seed: 100000000000000000000\n", "seed=100000000000000000000"),
    ("attention: [auto]\n", "attention=['auto']"),
    ("lora: [1, 2]\n", "lora=[1, 2]"),
    ("lora: [1, 2]\nr: 4\n", "lora=[1, 2]"),
    ("lora: {target_modules: 5}\n", "target_modules=5"),
    ("target_modules: [[q_proj]]\n", "target_modules=[['q_proj']]"),
    ("r: 1000000000000000000\n", "r=1000000000000000000"),
    ("lora_alpha: 1.0e+308\n", "lora_alpha=1e+308"),
    ("use_rslora: maybe\n", "use_rslora='maybe'"),
    ("1: 2\nbatch_size: 2\n", "unknown training option(s) ['1']"),
    ("[" * 5000 + "\n", "config.yaml"),
    ("a: " + "9" * 5000 + "\n", "config.yaml"),
    ("- a\n- b\n", "must be a mapping of field: value, not a list"),
])
def test_a_hostile_config_yaml_value_is_a_config_error_naming_the_field(tmp_path, text, words):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_train_config(path)
    assert words in str(err.value)
