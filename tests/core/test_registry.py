"""The plug-in points: methods by peft_type, variants in lorakit.plugins, and the one-way layering
(the core consults the registries and never imports a method or a variant)."""

import ast
import inspect
from pathlib import Path

import pytest

import lorakit
from lorakit import plugins
from lorakit.errors import ConfigError
from lorakit.layer import LoraLayer
from lorakit.plugins import method_for, peft_types
from lorakit.methods.adalora import AdaLoraConfig, AdaLoraModel, SVDLinear
from lorakit.model import LoraModel

SRC = Path(lorakit.__file__).parent
CORE = ["config.py", "layer.py", "inject.py", "model.py", "io.py", "plugins.py", "methods/__init__.py"]


def test_methods_are_registered_by_peft_type():
    assert peft_types() == ["ADALORA", "LORA"]
    assert method_for("LORA").config_class is lorakit.LoraConfig
    assert method_for(None) is method_for("LORA")  # PEFT files without a peft_type
    assert method_for("LORA").model_class is LoraModel and method_for("ADALORA").model_class is AdaLoraModel
    assert method_for("ADALORA").config_class is AdaLoraConfig
    assert method_for("LORA").mixed_batches and not method_for("ADALORA").mixed_batches
    assert method_for("LORA").resume_problem is None and method_for("ADALORA").resume_problem
    with pytest.raises(ConfigError, match="'IA3'.*ADALORA, LORA"):
        method_for("IA3")


def test_variants_are_registered():
    assert [v.name for v in plugins.variants()] == ["dora"]
    assert plugins.base_weight_init("pissa_niter_4") is not None and plugins.base_weight_init("OLoRA") is not None
    assert plugins.base_weight_init(True) is None and plugins.base_weight_init("gaussian") is None
    assert callable(plugins.operation("add_weighted_adapter")) and callable(plugins.operation("convert_to_lora"))
    with pytest.raises(ConfigError, match="not registered"):
        plugins.variant("vera")


def test_svd_linear_add_adapter_is_substitutable():
    assert inspect.signature(SVDLinear.add_adapter).parameters.keys() == \
        inspect.signature(LoraLayer.add_adapter).parameters.keys()


@pytest.mark.parametrize("path", CORE)
def test_the_core_imports_no_method_or_variant_and_nothing_inside_functions(path):
    tree = ast.parse((SRC / path).read_text())
    imported = [(node, alias.name if isinstance(node, ast.Import) else node.module)
                for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names]
    for node, module in imported:
        module = module or ""
        assert not module.startswith(("lorakit.variants", "lorakit.methods.")), (path, module)
        names = [a.name for a in node.names]
        assert not (module == "lorakit" and {"variants", "methods"} & set(names)), (path, names)
    top = {id(n) for n in tree.body} | {id(n) for n in ast.walk(tree) if isinstance(n, ast.If)
                                        for n in n.body}  # module level and `if TYPE_CHECKING:`
    inside = [module for node, module in imported if id(node) not in top]
    assert not inside, f"{path}: imports inside functions: {inside}"
