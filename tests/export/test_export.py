"""`lorakit export`: the vLLM checks, Ollama's Modelfile, and what every format shares (a new directory
written atomically, --force, the command that runs it)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorakit import CompatibilityError, ConfigError, LoraConfig, get_peft_model
from lorakit.cli import main
from lorakit.export.exporting import export_adapter
from lorakit.export.ollama import chat_format, modelfile

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_adapter(model_dir, path, **settings):
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": SEVEN, "init_lora_weights": False}
                                      | settings))
    model.save_pretrained(path)
    return path


def test_vllm_gets_the_adapter_files_and_the_serve_line(tiny_model_dir, tmp_path, capsys):
    adapter = save_adapter(tiny_model_dir, tmp_path / "run" / "adapter", r=20, rank_pattern={"q_proj": 4})
    assert main(["export", "--adapter", str(adapter), "--format", "vllm", "--out", str(tmp_path / "v"),
                 "--model", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "v" / name).read_bytes() == (adapter / name).read_bytes()
    assert f"vllm serve {tiny_model_dir} --enable-lora --lora-modules run={tmp_path / 'v'} --max-lora-rank 32" in out
    assert "rank_pattern / alpha_pattern: vLLM releases before their support" in out


@pytest.mark.parametrize("settings, reason", [
    (dict(use_dora=True), "it is a DoRA adapter"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(bias="lora_only"), "it trains biases"),
])
def test_vllm_refuses_what_its_loader_refuses_and_writes_nothing(tiny_model_dir, tmp_path, settings, reason):
    adapter = save_adapter(tiny_model_dir, tmp_path / "a", **settings)
    with pytest.raises(CompatibilityError, match=reason + r".*Merge it into the base model instead"):
        export_adapter(adapter, tmp_path / "v", "vllm", model=str(tiny_model_dir))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no out directory, no temporary left


def test_an_export_never_overwrites_without_force(tiny_model_dir, tmp_path):
    adapter = save_adapter(tiny_model_dir, tmp_path / "a")
    export_adapter(adapter, tmp_path / "v", "vllm", model=str(tiny_model_dir))
    (tmp_path / "v" / "mine.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="is not empty; pick another directory or pass --force"):
        export_adapter(adapter, tmp_path / "v", "vllm", model=str(tiny_model_dir))
    assert (tmp_path / "v" / "mine.txt").is_file()
    export_adapter(adapter, tmp_path / "v", "vllm", model=str(tiny_model_dir), force=True)
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    with pytest.raises(ConfigError, match="is the adapter or base model directory"):
        export_adapter(adapter, adapter, "vllm", model=str(tiny_model_dir), force=True)


def test_modelfile_speaks_ollamas_template_for_chatml(tiny_model_dir):
    template = json.loads((tiny_model_dir / "tokenizer_config.json").read_text()).get("chat_template") \
        or (tiny_model_dir / "chat_template.jinja").read_text()
    assert chat_format(template).name == "ChatML"  # SmolLM2's
    text, notes = modelfile("base.gguf", adapter_file="adapter.gguf", chat_template=template,
                            system="Reply with JSON.", context=2048, name="demo")
    assert text.splitlines()[:3] == ["# written by lorakit export; register it with: ollama create demo -f Modelfile",
                                     "FROM ./base.gguf", "ADAPTER ./adapter.gguf"]
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}' in text
    assert 'SYSTEM """Reply with JSON."""' in text and 'PARAMETER stop "<|im_end|>"' in text
    assert "PARAMETER num_ctx 2048" in text
    text, notes = modelfile("model.gguf", adapter_file=None, chat_template="{{ messages }}", system=None,
                            context=512, name="x")
    assert "TEMPLATE" not in text and "ADAPTER" not in text and "Ollama detects one" in notes[0]


def test_gguf_formats_write_their_files_and_the_command_that_runs_them(tiny_model_dir, tmp_path, capsys):
    adapter = save_adapter(tiny_model_dir, tmp_path / "my-run" / "adapter")
    (tmp_path / "my-run" / "config.yaml").write_text("data: task-api\nname: my-run\n")
    base = ["--adapter", str(adapter), "--model", str(tiny_model_dir)]

    assert main(["export", *base, "--format", "gguf-adapter", "--out", str(tmp_path / "g")]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["adapter.gguf"]
    assert f"--lora {tmp_path / 'g' / 'adapter.gguf'}" in out
    assert "llama.cpp needs the base model as a GGUF too" in out  # an HF directory base

    assert main(["export", *base, "--format", "gguf", "--outtype", "q8_0", "--out", str(tmp_path / "m")]) == 0
    assert f"run it: llama-cli -m {tmp_path / 'm' / 'model-q8_0.gguf'}" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model-q8_0.gguf"]

    assert main(["export", *base, "--format", "ollama", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert f"run it: ollama create my-run -f {tmp_path / 'o' / 'Modelfile'}" in out
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["Modelfile", "model.gguf"]
    text = (tmp_path / "o" / "Modelfile").read_text()
    assert "FROM ./model.gguf\n" in text and "ADAPTER" not in text
    assert 'SYSTEM """Turn the request into task JSON."""' in text  # the system prompt task-api trains with

    assert main(["export", *base, "--format", "ollama", "--lora", "--name", "tasks", "--out",
                 str(tmp_path / "ol")]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "ol").iterdir()) == ["Modelfile", "adapter.gguf", "base.gguf"]
    text = (tmp_path / "ol" / "Modelfile").read_text()
    assert "FROM ./base.gguf\nADAPTER ./adapter.gguf\n" in text and "ollama create tasks" in text


def test_a_merged_gguf_of_an_output_head_adapter_on_tied_embeddings_keeps_the_embedding(tiny_model_dir, tmp_path):
    """The update to a tied output head lands in the head alone (untied, as lorakit merge does), not in the
    embedding it shares its weight with."""
    from lorakit import PeftModel

    adapter = save_adapter(tiny_model_dir, tmp_path / "a", target_modules=["q_proj", "lm_head"])
    report = export_adapter(adapter, tmp_path / "m", "gguf", model=str(tiny_model_dir), outtype="f32")
    assert any("untied from shared weights" in note and "lm_head" in note for note in report.notes)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", gguf_file="model-f32.gguf").eval()
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter)).eval()
    ids = torch.tensor([[1, 5, 9, 33, 7, 100]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
