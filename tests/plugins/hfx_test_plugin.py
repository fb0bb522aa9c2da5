"""A test-only plugin: an optimizer wrapping SGD, a factory optimizer, two attentions and a trainer command."""

from hfx import hookimpl


@hookimpl
def hfx_register(registry):
    registry.optimizer("test_sgd", "hfx_test_targets:WrappedSGD", description="SGD under another name")
    registry.optimizer("test_factory", "hfx_test_targets:WrappedSGD", factory="hfx_test_targets:SGDFactory")
    registry.attention("test_sdpa", "hfx_test_targets:counting_sdpa", description="SDPA that counts calls")
    registry.attention("test_apply", "hfx_test_targets:counting_sdpa", apply="hfx_test_targets:apply_scaled_lm_head")
    registry.trainer("toy-sft", "hfx_test_trainers:ToySFTTrainer", config="hfx_test_trainers:ToySFTConfig",
                     description="SFT on a toy task (test)")
    registry.options("testplugin", {"alpha": 1.0, "mode": "a", "test_sgd": {}})
    registry.cli("hello", "hfx_test_cli:main", help="say hello (a plugin-contributed command)")
