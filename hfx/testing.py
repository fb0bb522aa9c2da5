"""Offline tiny-model test kit and conformance suites for hfx plugin packages.

Everything here is built in-process: a byte-level BPE tokenizer with a ChatML template, tiny random
Llama/Qwen2/Qwen3/Mistral models, tiny datasets. Nothing is downloaded.

Use it from a package's ``conftest.py``::

    pytest_plugins = ["hfx.testing"]          # fixtures: hf_offline, tokenizer, tiny_model_dir, ...

and subclass a conformance suite in a test module::

    from hfx.testing import OptimizerConformance

    class TestMyOptimizer(OptimizerConformance):
        def make_optimizer(self, model):
            return MyOptimizer(model.parameters(), lr=1e-2)

This module imports torch and transformers at the top: only tests import it.
"""

from __future__ import annotations

import atexit
import copy
import functools
import io
import itertools
import math
import os
import pickle
import shutil
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from ._compat import checkpointing_field

__all__ = [
    "CHATML_TEMPLATE",
    "DEFAULT_TOLERANCES",
    "FAMILIES",
    "FAST_TRAINING_ARGS",
    "OFFLINE_ENV",
    "AttentionConformance",
    "KernelConformance",
    "OptimizerConformance",
    "TinyMLP",
    "TrainerConformance",
    "apply_offline_env",
    "assert_matches_sdpa",
    "check_plain_state",
    "check_weights_only_roundtrip",
    "fast_training_args",
    "generate_greedy",
    "left_padded_batch",
    "make_tiny_datasets",
    "params_changed",
    "save_tiny_model",
    "sdpa_reference",
    "shared_tiny_model_dir",
    "snapshot_params",
    "tiny_config",
    "tiny_model",
    "tiny_tokenizer",
    "unwrap_optimizer",
]

# --------------------------------------------------------------------------------------------------
# Offline environment
# --------------------------------------------------------------------------------------------------

OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRL_EXPERIMENTAL_SILENCE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

# huggingface_hub/transformers/datasets read the flags once, at import time; these cached copies must be
# patched as well or an already-imported library would still try the network.
_CACHED_OFFLINE_FLAGS = (
    ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
    ("huggingface_hub.constants", "HF_HUB_DISABLE_TELEMETRY"),
    ("transformers.utils.hub", "_is_offline_mode"),  # transformers < 5 keeps its own copy
    ("datasets.config", "HF_HUB_OFFLINE"),
    ("datasets.config", "HF_DATASETS_OFFLINE"),
)


def apply_offline_env(monkeypatch: pytest.MonkeyPatch | None = None) -> None:
    """Set :data:`OFFLINE_ENV` and patch the libraries' cached offline flags.

    With a ``monkeypatch`` everything is undone after the test; without one the change is permanent.

    >>> apply_offline_env()  # e.g. at the top of a script that must never reach the Hub
    """
    for key, value in OFFLINE_ENV.items():
        if monkeypatch is not None:
            monkeypatch.setenv(key, value)
        else:
            os.environ[key] = value
    for module_name, attr in _CACHED_OFFLINE_FLAGS:
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, attr):
            if monkeypatch is not None:
                monkeypatch.setattr(module, attr, True)
            else:
                setattr(module, attr, True)


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------

PAD_TOKEN, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# ChatML. `{% generation %}` marks the assistant tokens for `return_assistant_tokens_mask` (TRL's
# assistant-only loss); the closing <|im_end|> is inside it so the model learns to stop.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _corpus() -> list[str]:
    """A few hundred short sentences: prose, arithmetic with digits, chat phrases. Fixed order."""
    subjects = ["The cat", "A dog", "My friend", "The model", "Our team", "The user", "The assistant", "A student"]
    verbs = ["likes", "reads", "writes", "sees", "counts", "trains on", "answers", "solves"]
    objects = ["the book.", "a short story.", "the numbers.", "the question.", "every problem.", "some data."]
    prose = [f"{s} {v} {o}" for s, v, o in itertools.product(subjects, verbs, objects)]
    maths = [
        f"What is {a} + {b}? The answer is {a + b}." for a, b in itertools.product(range(0, 100, 7), range(3, 60, 11))
    ]
    maths += [f"{a} * {b} = {a * b}" for a, b in itertools.product(range(2, 10), range(2, 10, 3))]
    chat = [
        "Hello!",
        "Hi, how are you?",
        "I am fine, thank you.",
        "Can you help me?",
        "Sure, here is the answer.",
        "You are a helpful assistant.",
        "system",
        "user",
        "assistant",
        "Thanks a lot!",
        "Please explain step by step.",
        "Let me think about it.",
        "That is correct.",
        "That is wrong, try again.",
        "Good morning.",
        "Good night.",
    ]
    return prose + maths + chat * 4


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Train the BPE once per process (a few ms); training on a fixed corpus is deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps character offsets exact, which the assistant-token mask relies on
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=[PAD_TOKEN, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus(), trainer=trainer)
    return backend.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Return a fresh copy of the in-process byte-level BPE tokenizer (ChatML, 512 tokens).

    Each call returns a new object (callers may change ``padding_side`` freely); the vocabulary is the same.

    >>> tok = tiny_tokenizer()
    >>> tok.decode(tok("What is 2 + 3?")["input_ids"])
    'What is 2 + 3?'
    """
    from tokenizers import Tokenizer

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START],
        chat_template=CHATML_TEMPLATE,
        model_max_length=1024,
        model_input_names=["input_ids", "attention_mask"],  # transformers 4.x adds token_type_ids otherwise
    )


# --------------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------------

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")

_CONFIG_CLASSES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "mistral": "MistralConfig"}


def tiny_config(family: str = "qwen2", tokenizer: PreTrainedTokenizerFast | None = None, **overrides: Any):
    """A 2-layer, hidden-32 config of ``family`` sized to the tiny tokenizer (about 35k parameters).

    >>> tiny_config("llama", num_hidden_layers=1).num_hidden_layers
    1
    """
    if family not in _CONFIG_CLASSES:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    tok = tokenizer if tokenizer is not None else tiny_tokenizer()
    kwargs: dict[str, Any] = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,  # explicit: Qwen3 (and Mistral on transformers 5) default to 128
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.pad_token_id,  # as Qwen does: <|endoftext|> doubles as BOS
        tie_word_embeddings=True,
    )
    if family == "mistral":
        kwargs["sliding_window"] = None  # a window would make padded and unpadded runs differ
    if family in ("qwen2", "qwen3"):
        kwargs["use_sliding_window"] = False
    kwargs.update(overrides)
    return getattr(transformers, _CONFIG_CLASSES[family])(**kwargs)


def tiny_model(
    family: str = "qwen2",
    seed: int = 0,
    *,
    tokenizer: PreTrainedTokenizerFast | None = None,
    attn_implementation: str | None = None,
    **overrides: Any,
):
    """A randomly initialised tiny causal LM; the same ``seed`` gives the same weights.

    The global RNG is left untouched. Returned in eval mode, like ``from_pretrained``.

    >>> model = tiny_model("qwen3", attn_implementation="sdpa")
    >>> model.config.model_type
    'qwen3'
    """
    config = tiny_config(family, tokenizer, **overrides)
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    return model.eval()


def save_tiny_model(
    family: str,
    directory: str | os.PathLike,
    *,
    seed: int = 0,
    tokenizer: PreTrainedTokenizerFast | None = None,
    **overrides: Any,
) -> Path:
    """Save a tiny model and its tokenizer so that ``from_pretrained(path)`` and TRL (``model=str(path)``) load it.

    Pass the path, not the in-memory model, to TRL: DPOTrainer rebuilds its reference model from
    ``config._name_or_path``.

    >>> path = save_tiny_model("llama", tmp_path / "llama")
    >>> AutoModelForCausalLM.from_pretrained(path)  # doctest: +SKIP
    """
    directory = Path(directory)
    tok = tokenizer if tokenizer is not None else tiny_tokenizer()
    model = tiny_model(family, seed, tokenizer=tok, **overrides)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


_SHARED_ROOT: Path | None = None


@functools.cache
def shared_tiny_model_dir(family: str = "qwen2") -> Path:
    """Save ``tiny_model(family)`` once per process into a temp dir (removed at exit) and return its path.

    Treat it as read-only; write training outputs elsewhere.

    >>> trainer = SFTTrainer(model=str(shared_tiny_model_dir("qwen2")), ...)  # doctest: +SKIP
    """
    global _SHARED_ROOT
    if _SHARED_ROOT is None:
        _SHARED_ROOT = Path(tempfile.mkdtemp(prefix="hfx-tiny-models-"))
        atexit.register(shutil.rmtree, _SHARED_ROOT, ignore_errors=True)
    return save_tiny_model(family, _SHARED_ROOT / family)


# --------------------------------------------------------------------------------------------------
# Tiny datasets
# --------------------------------------------------------------------------------------------------


def make_tiny_datasets(n: int = 8) -> dict[str, Any]:
    """Tiny in-memory ``datasets.Dataset``s in TRL's formats, built from a + b questions.

    Keys: ``language_modeling`` (text), ``conversational`` (messages), ``preference`` (prompt/chosen/rejected
    strings), ``conversational_preference``, ``prompt_only``, ``conversational_prompt_only``.

    >>> make_tiny_datasets()["preference"][0]["chosen"]
    ' 3'
    """
    from datasets import Dataset

    pairs = [(i % 7 + 1, (3 * i) % 11 + 2) for i in range(n)]
    questions = [f"What is {a} + {b}?" for a, b in pairs]
    right = [str(a + b) for a, b in pairs]
    wrong = [str(a + b + 1 + i % 3) for i, (a, b) in enumerate(pairs)]

    def user(q):
        return [{"role": "user", "content": q}]

    def assistant(a):
        return [{"role": "assistant", "content": a}]

    return {
        "language_modeling": Dataset.from_dict(
            {"text": [f"{q} The answer is {r}." for q, r in zip(questions, right, strict=True)]}
        ),
        "conversational": Dataset.from_dict(
            {"messages": [user(q) + assistant(r) for q, r in zip(questions, right, strict=True)]}
        ),
        "preference": Dataset.from_dict(
            {"prompt": questions, "chosen": [" " + r for r in right], "rejected": [" " + w for w in wrong]}
        ),
        "conversational_preference": Dataset.from_dict(
            {
                "prompt": [user(q) for q in questions],
                "chosen": [assistant(r) for r in right],
                "rejected": [assistant(w) for w in wrong],
            }
        ),
        "prompt_only": Dataset.from_dict({"prompt": questions}),
        "conversational_prompt_only": Dataset.from_dict({"prompt": [user(q) for q in questions]}),
    }


# Settings that make a Trainer run in about a second on a CPU; lr 0.1 (as TRL's tests use) so that
# "parameters changed" is certain after 2 steps.
FAST_TRAINING_ARGS: dict[str, Any] = dict(
    max_steps=2,
    per_device_train_batch_size=2,
    learning_rate=0.1,
    use_cpu=True,
    bf16=False,
    gradient_checkpointing=False,
    report_to="none",
    save_strategy="no",
    logging_steps=1,
    disable_tqdm=True,
    dataloader_num_workers=0,
    seed=0,
)


def fast_training_args(config_cls: type, output_dir: str | os.PathLike, **overrides: Any):
    """Build ``config_cls`` (TrainingArguments, SFTConfig, DPOConfig, ...) with :data:`FAST_TRAINING_ARGS`.

    >>> args = fast_training_args(SFTConfig, tmp_path, max_length=64)  # doctest: +SKIP
    """
    kwargs = {**FAST_TRAINING_ARGS, **overrides}
    field = checkpointing_field(config_cls)
    kwargs.setdefault(field, kwargs.pop("gradient_checkpointing", False))
    return config_cls(output_dir=str(output_dir), **kwargs)


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------

PADDING_TEXTS = (
    "Hi",
    "What is 12 + 30? The answer is 42.",
    "The assistant reads the book.",
)


def left_padded_batch(tokenizer, texts: Iterable[str] = PADDING_TEXTS, device: str | torch.device | None = None):
    """Tokenize ``texts`` with left padding (the layout used for generation and DPO prompts).

    >>> batch = left_padded_batch(tiny_tokenizer(), ["Hi", "a longer text"])
    >>> bool((batch["attention_mask"][:, 0] == 0).any())
    True
    """
    # per-call padding_side leaves the caller's tokenizer as it was
    batch = tokenizer(list(texts), padding=True, padding_side="left", return_tensors="pt")
    return batch.to(device) if device is not None else batch


def snapshot_params(model: nn.Module, trainable_only: bool = True) -> dict[str, torch.Tensor]:
    """Detached copies of the named parameters, for comparing before/after training.

    >>> before = snapshot_params(model); trainer.train()  # doctest: +SKIP
    """
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad or not trainable_only}


def params_changed(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor] | nn.Module) -> list[str]:
    """Names of the parameters in ``before`` whose values differ in ``after`` (a snapshot or a module).

    >>> params_changed({"w": torch.zeros(2)}, {"w": torch.ones(2)})
    ['w']
    """
    if isinstance(after, nn.Module):
        after = dict(after.named_parameters())
    return [n for n, old in before.items() if not torch.equal(old, after[n].detach().to(old.device))]


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside accelerate's ``AcceleratedOptimizer`` (what ``Trainer.optimizer`` holds), else ``optimizer``.

    >>> opt = unwrap_optimizer(trainer.optimizer)  # doctest: +SKIP
    """
    return getattr(optimizer, "optimizer", optimizer)


def sdpa_reference(model):
    """A copy of ``model`` built from its config with ``attn_implementation="sdpa"`` and the same weights.

    Parameters that only ``model`` has (added by an attention module) are ignored.

    >>> ref = sdpa_reference(tiny_model("llama", attn_implementation="my_attention"))  # doctest: +SKIP
    """
    config = copy.deepcopy(model.config)
    with torch.random.fork_rng(devices=[]):
        reference = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    missing = reference.load_state_dict(model.state_dict(), strict=False).missing_keys
    assert not missing, f"the model lacks weights of the plain architecture: {missing}"
    return reference.to(device=model.device, dtype=model.dtype).eval()


def assert_matches_sdpa(model, tokenizer=None, *, atol: float = 1e-5, rtol: float = 1e-5, texts=PADDING_TEXTS,
                        reference=None):
    """Assert ``model``'s logits match SDPA's at every non-pad position of a left-padded batch.

    The reference is ``model``'s weights in the plain architecture with SDPA (:func:`sdpa_reference`), or
    ``reference`` (e.g. the model before a module that converts its weights was applied).
    Raises ``AssertionError`` otherwise, e.g. for an attention registered without a mask function.

    >>> assert_matches_sdpa(tiny_model("qwen2", attn_implementation="hfx_softplus"))  # doctest: +SKIP
    """
    tok = tokenizer if tokenizer is not None else tiny_tokenizer()
    batch = left_padded_batch(tok, texts, device=model.device)
    keep = batch["attention_mask"].bool()
    assert not keep.all(), "the batch has no padding; the check would prove nothing"
    reference = sdpa_reference(model) if reference is None else reference.eval()
    model.eval()
    with torch.no_grad():
        got = model(**batch).logits[keep]
        want = reference(**batch).logits[keep]
    assert torch.isfinite(got).all(), "non-finite logits at non-pad positions"
    torch.testing.assert_close(
        got, want, atol=atol, rtol=rtol, msg=lambda m: f"logits differ from SDPA on a left-padded batch: {m}"
    )


def generate_greedy(model, tokenizer=None, max_new_tokens: int = 4, texts=PADDING_TEXTS) -> torch.Tensor:
    """Greedy-generate exactly ``max_new_tokens`` tokens for a left-padded batch; returns the full ids.

    >>> generate_greedy(tiny_model("llama")).shape[1] - left_padded_batch(tiny_tokenizer())["input_ids"].shape[1]
    4
    """
    tok = tokenizer if tokenizer is not None else tiny_tokenizer()
    batch = left_padded_batch(tok, texts, device=model.device)
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    assert out.shape == (batch["input_ids"].shape[0], batch["input_ids"].shape[1] + max_new_tokens), out.shape
    return out


_PLAIN_SCALARS = (bool, int, float, type(None))


def check_plain_state(state_dict: Mapping[str, Any]) -> None:
    """Assert an optimizer ``state_dict()`` holds only tensors and plain numbers (strings only in param_groups).

    Trainer resumes with ``torch.load(weights_only=True)``, which refuses other objects.

    >>> check_plain_state(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1).state_dict())
    """

    def walk(value, where, allow_str):
        if isinstance(value, (torch.Tensor, *_PLAIN_SCALARS)) or (allow_str and isinstance(value, str)):
            return
        if isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{where}[{i}]", allow_str)
            return
        if isinstance(value, dict):
            for key, item in value.items():
                assert isinstance(key, (int, str)), f"{where} has a key of type {type(key).__name__}"
                walk(item, f"{where}[{key!r}]", allow_str)
            return
        raise AssertionError(
            f"optimizer state {where} holds a {type(value).__module__}.{type(value).__qualname__}; "
            "keep only tensors and plain numbers so torch.load(weights_only=True) can read it"
        )

    walk(state_dict.get("state", {}), "state", allow_str=False)
    walk(state_dict.get("param_groups", []), "param_groups", allow_str=True)


def finish_distributed() -> None:
    """End a multi-process test script: wait for every rank, destroy the process group, then leave with
    ``os._exit(0)``. Call it last; write results to files before it (``atexit`` handlers, e.g.
    :func:`shared_tiny_model_dir`'s cleanup, do not run).

    Skipping interpreter teardown matters: even after ``destroy_process_group`` a rank's C++ static destructors can
    race the threads gloo and DDP started and abort ("terminate called without an active exception", SIGABRT), which
    ``accelerate launch`` reports as a failed run although every rank finished its work (seen 1 run in 20 on 2 busy
    cores)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def check_weights_only_roundtrip(obj: Any) -> Any:
    """``torch.save`` ``obj`` and read it back with ``torch.load(weights_only=True)``; return the loaded copy.

    Raises ``AssertionError`` when the safe loader refuses it (Trainer's resume would fail the same way).

    >>> loaded = check_weights_only_roundtrip(optimizer.state_dict())  # doctest: +SKIP
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    try:
        return torch.load(buffer, weights_only=True)
    except pickle.UnpicklingError as err:
        raise AssertionError(f"torch.load(weights_only=True) refused the object: {err}") from err


# --------------------------------------------------------------------------------------------------
# Pytest fixtures (register with `pytest_plugins = ["hfx.testing"]`)
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def hf_offline(monkeypatch):
    """:func:`apply_offline_env` for one test, undone afterwards.

    To apply it everywhere, in a conftest: ``@pytest.fixture(autouse=True)`` ``def _offline(hf_offline): ...``
    """
    apply_offline_env(monkeypatch)


@pytest.fixture
def tokenizer():
    """The tiny ChatML tokenizer, a fresh copy per test (so a test may change it)."""
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir():
    """Factory: ``tiny_model_dir("llama") -> Path`` of a saved tiny model, saved once per session."""
    return shared_tiny_model_dir


@pytest.fixture(scope="session")
def tiny_model_path(request):
    """Path of a saved tiny model; Qwen2 unless parametrized indirectly with a family:
    ``@pytest.mark.parametrize("tiny_model_path", FAMILIES, indirect=True)``."""
    return shared_tiny_model_dir(getattr(request, "param", "qwen2"))


@pytest.fixture(scope="session")
def warm_start_home(tmp_path_factory):
    """A fresh ``HFX_CACHE_DIR`` shared by the session (warm starts under ``<it>/warm_start``): tests that need the
    same default toy warm start train it once, from scratch, instead of once each (~5 CPU minutes for the
    collaborator task). Set it with ``monkeypatch.setenv("HFX_CACHE_DIR", str(warm_start_home))``."""
    return tmp_path_factory.mktemp("hfx-cache")


@pytest.fixture(scope="session")
def tiny_datasets():
    """:func:`make_tiny_datasets` (8 rows each), built once per session."""
    return make_tiny_datasets()


# --------------------------------------------------------------------------------------------------
# Conformance suites
# --------------------------------------------------------------------------------------------------


class _Conformance:
    """Base of the suites. The suites themselves are not collected; every subclass is, whatever its name,
    unless it sets ``__test__ = False`` or its name starts with ``_`` (abstract intermediates).

    Class attributes named in ``_grid`` parametrize the test arguments of the same name.
    """

    __test__ = False
    _grid: dict[str, str] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__test__" not in cls.__dict__:
            # pytest collects any class whose __test__ is True (and skips any where it is False)
            cls.__test__ = not cls.__name__.startswith("_")

    def pytest_generate_tests(self, metafunc):  # pytest calls this hook on test classes too
        for argname, attr in self._grid.items():
            if argname in metafunc.fixturenames:
                values = list(getattr(self, attr))
                metafunc.parametrize(argname, values, ids=[_param_id(v) for v in values])

    @pytest.fixture(autouse=True)
    def _hfx_offline(self, monkeypatch):
        apply_offline_env(monkeypatch)


def _param_id(value) -> str:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, (tuple, list)):
        return "x".join(map(str, value))
    return str(value)


class TrainerConformance(_Conformance):
    """A trainer trains 2 steps on a tiny saved model: every trainable parameter changes and the loss is finite.

    Hooks: ``make_trainer(model_path, output_dir, peft_config=None)``; optional ``families``,
    ``supports_peft``, ``lora_target_modules``, ``may_stay_unchanged``::

        class TestSPIN(TrainerConformance):
            supports_peft = True
            def make_trainer(self, model_path, output_dir, peft_config=None):
                args = fast_training_args(SPINConfig, output_dir, max_length=64)
                return SPINTrainer(model=str(model_path), args=args, peft_config=peft_config,
                                   train_dataset=make_tiny_datasets()["preference"])
    """

    __test__ = False
    families: tuple[str, ...] = ("qwen2",)
    supports_peft: bool = False
    lora_target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    may_stay_unchanged: tuple[str, ...] = ()  # name substrings of parameters the method may leave untouched
    _grid = {"family": "families"}

    def make_trainer(self, model_path: Path, output_dir: Path, peft_config=None):
        raise NotImplementedError("return a Trainer that loads the model from model_path")

    def _train(self, trainer) -> None:
        result = trainer.train()
        assert math.isfinite(result.training_loss), f"training loss is {result.training_loss}"
        logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert all(math.isfinite(x) for x in logged), f"non-finite logged loss: {logged}"
        if trainer.args.max_steps > 0:
            assert trainer.state.global_step == trainer.args.max_steps

    def test_training_changes_parameters(self, family, tmp_path):
        trainer = self.make_trainer(shared_tiny_model_dir(family), tmp_path)
        before = snapshot_params(trainer.model)
        assert before, "the model has no trainable parameters"
        self._train(trainer)
        changed = set(params_changed(before, trainer.model))
        unchanged = [n for n in before if n not in changed and not any(s in n for s in self.may_stay_unchanged)]
        assert not unchanged, f"parameters unchanged after training: {unchanged}"

    def test_lora_trains_only_adapters(self, family, tmp_path):
        if not self.supports_peft:
            pytest.skip("supports_peft is False")
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(self.lora_target_modules), task_type="CAUSAL_LM"
        )
        trainer = self.make_trainer(shared_tiny_model_dir(family), tmp_path, peft_config=peft_config)
        trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable), f"trainable besides LoRA: {trainable}"
        before = snapshot_params(trainer.model, trainable_only=False)
        self._train(trainer)
        changed = set(params_changed(before, trainer.model))
        assert changed == set(trainable), (
            f"changed but not adapters: {sorted(changed - set(trainable))}; "
            f"adapters unchanged: {sorted(set(trainable) - changed)}"
        )


class TinyMLP(nn.Module):
    """Small regression net for optimizer tests, with one frozen and one unused parameter.

    >>> TinyMLP()(torch.zeros(2, 8)).shape
    torch.Size([2, 4])
    """

    def __init__(self, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.fc1 = nn.Linear(8, 16)
            self.fc2 = nn.Linear(16, 4)
            self.frozen = nn.Parameter(torch.randn(4), requires_grad=False)
            self.unused = nn.Parameter(torch.randn(3))  # never gets a gradient

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))) + self.frozen


class OptimizerConformance(_Conformance):
    """An optimizer steps, lowers a loss, leaves grad-less parameters alone and resumes bit-identically
    from a ``torch.load(weights_only=True)`` copy of its state.

    Hooks: ``make_optimizer(model)``; optional ``make_model()``, ``compute_loss(model)``, ``steps``::

        class TestMARS(OptimizerConformance):
            def make_optimizer(self, model):
                return MARS(model.parameters(), lr=1e-2)
    """

    __test__ = False
    steps: int = 10

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        raise NotImplementedError("return an optimizer over model's parameters")

    def make_model(self) -> nn.Module:
        """A fresh model; every call must give the same weights."""
        return TinyMLP()

    def compute_loss(self, model: nn.Module) -> torch.Tensor:
        """Loss on a fixed batch (default: MSE of :class:`TinyMLP` on a fixed random regression task)."""
        g = torch.Generator().manual_seed(1)
        x = torch.randn(32, 8, generator=g)
        y = torch.randn(32, 4, generator=g)
        return nn.functional.mse_loss(model(x), y)

    def _run(self, model, optimizer, steps):
        for _ in range(steps):
            optimizer.zero_grad()
            self.compute_loss(model).backward()
            optimizer.step()

    def test_steps_reduce_loss(self):
        model = self.make_model()
        optimizer = self.make_optimizer(model)
        before = snapshot_params(model)
        with torch.no_grad():
            start = self.compute_loss(model).item()
        self._run(model, optimizer, self.steps)
        with torch.no_grad():
            end = self.compute_loss(model).item()
        assert math.isfinite(end) and end < start, f"loss {start} -> {end} after {self.steps} steps"
        assert params_changed(before, model), "no parameter changed"
        assert all(torch.isfinite(p).all() for p in model.parameters())

    def test_params_without_grad_untouched(self):
        model = self.make_model()
        optimizer = self.make_optimizer(model)
        self._run(model, optimizer, 1)
        no_grad = {n: p.detach().clone() for n, p in model.named_parameters() if p.grad is None}
        self._run(model, optimizer, self.steps)
        assert not params_changed(no_grad, model), "a parameter without a gradient was changed"

    def test_zero_grad_then_step_is_noop(self):
        model = self.make_model()
        optimizer = self.make_optimizer(model)
        self._run(model, optimizer, 2)
        optimizer.zero_grad()
        assert all(p.grad is None or not p.grad.any() for p in model.parameters()), "zero_grad left gradients"
        if all(p.grad is None for p in model.parameters()):
            before = snapshot_params(model, trainable_only=False)
            optimizer.step()
            assert not params_changed(before, model), "step() without gradients changed parameters"

    def test_state_dict_is_plain(self):
        model = self.make_model()
        optimizer = self.make_optimizer(model)
        self._run(model, optimizer, 2)
        state = optimizer.state_dict()
        assert state["state"], "the optimizer keeps no state after two steps"
        check_plain_state(state)

    def test_state_dict_weights_only_roundtrip(self):
        model = self.make_model()
        optimizer = self.make_optimizer(model)
        self._run(model, optimizer, 2)
        check_weights_only_roundtrip(optimizer.state_dict())

    def test_resume_is_bit_identical(self):
        model = self.make_model()
        optimizer = self.make_optimizer(model)
        self._run(model, optimizer, 3)
        saved = check_weights_only_roundtrip({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
        resumed_model = self.make_model()
        resumed_model.load_state_dict(saved["model"])
        resumed = self.make_optimizer(resumed_model)
        resumed.load_state_dict(saved["optimizer"])
        for m, opt in ((model, optimizer), (resumed_model, resumed)):
            with torch.random.fork_rng(devices=[]):  # same RNG for both, as Trainer restores it on resume
                torch.manual_seed(1234)
                self._run(m, opt, 2)
        diverged = params_changed(snapshot_params(model, trainable_only=False), resumed_model)
        assert not diverged, f"resumed optimizer diverged from the original on {diverged}"


class AttentionConformance(_Conformance):
    """An attention implementation matches SDPA on a left-padded batch and works in ``generate``.

    Hooks: ``attn_implementation`` (a name registered in AttentionInterface *and* AttentionMaskInterface)
    and/or ``apply(model)``; optional ``families``, ``atol``/``rtol``, ``generate_matches_sdpa``::

        class TestSoftplus(AttentionConformance):
            attn_implementation = "hfx_softplus"
            atol = 1e-4
    """

    __test__ = False
    attn_implementation: str | None = None
    families: tuple[str, ...] = FAMILIES
    atol: float = 1e-5
    rtol: float = 1e-5
    generate_matches_sdpa: bool = True  # set False for methods that change results by design (cache eviction)
    max_new_tokens: int = 4
    _grid = {"family": "families"}

    def apply(self, model):
        """Patch ``model`` in place or return a new one (for modules that are applied, not selected by name)."""
        return model

    def make_model(self, family: str):
        model = tiny_model(family, attn_implementation=self.attn_implementation or "sdpa")
        return (self.apply(model) or model).eval()

    def reference(self, model, family: str):
        """The SDPA model ``model`` must match: by default its own weights in the plain architecture; override for
        modules that convert the weights (the model before ``apply``: ``tiny_model(family, attn_implementation=
        "sdpa")``)."""
        return sdpa_reference(model)

    def test_registered_with_mask(self):
        if self.attn_implementation is None:
            pytest.skip("no attn_implementation name")
        from transformers import AttentionInterface, AttentionMaskInterface

        name = self.attn_implementation
        assert name in AttentionInterface(), f"{name!r} is not registered in AttentionInterface"
        assert name in AttentionMaskInterface(), (
            f"{name!r} is not registered in AttentionMaskInterface: transformers builds no mask and ignores padding"
        )

    def test_matches_sdpa_on_left_padding(self, family):
        model = self.make_model(family)
        if self.attn_implementation is not None:
            assert model.config._attn_implementation == self.attn_implementation
        assert_matches_sdpa(model, atol=self.atol, rtol=self.rtol, reference=self.reference(model, family))

    def test_generate(self, family):
        model = self.make_model(family)
        out = generate_greedy(model, max_new_tokens=self.max_new_tokens)
        assert int(out.max()) < model.config.vocab_size
        if self.generate_matches_sdpa:
            want = generate_greedy(self.reference(model, family), max_new_tokens=self.max_new_tokens)
            assert torch.equal(out, want), f"greedy generation differs from SDPA:\n{out}\n{want}"


def _clone(x):
    """A copy of a tensor or of a list of tensors (anything else as is)."""
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(t) for t in x)
    return x.clone() if isinstance(x, torch.Tensor) else x


def _strided_copy(x):
    """``x`` with the same values in a non-contiguous view (a tensor or a list of tensors; anything else as is)."""
    if isinstance(x, (list, tuple)):
        return type(x)(_strided_copy(t) for t in x)
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.numel() < 2:
        return x
    wide = torch.empty((*x.shape, 2), dtype=x.dtype, device=x.device)
    wide[..., 0] = x
    return wide[..., 0]


DEFAULT_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {  # dtype -> (rtol, atol)
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}


class KernelConformance(_Conformance):
    """A kernel equals its torch reference on every (shape, dtype) of the grid, odd shapes included.

    Hooks: ``reference(*inputs)``, ``kernel(*inputs)``, ``make_inputs(shape, dtype, device)``; optional
    ``shapes``, ``dtypes``, ``tolerances`` ({dtype: (rtol, atol)}), ``device``, ``check_backward``::

        class TestSwiGLU(KernelConformance):
            dtypes = (torch.float32, torch.bfloat16)
            def make_inputs(self, shape, dtype, device): return (torch.randn(shape, dtype=dtype, device=device),) * 2
            def reference(self, a, b): return F.silu(a) * b
            def kernel(self, a, b): return swiglu(a, b)
    """

    __test__ = False
    shapes: tuple[tuple[int, ...], ...] = ((1,), (7,), (4, 8), (3, 5, 17), (2, 33, 65))
    dtypes: tuple[torch.dtype, ...] = (torch.float32,)
    tolerances: dict[torch.dtype, tuple[float, float]] = {}
    device: str = "cpu"
    check_backward: bool = False
    modifies_inputs: bool = False
    _grid = {"shape": "shapes", "dtype": "dtypes"}

    def make_inputs(self, shape: tuple[int, ...], dtype: torch.dtype, device: str) -> tuple:
        raise NotImplementedError

    def reference(self, *inputs):
        raise NotImplementedError

    def kernel(self, *inputs):
        raise NotImplementedError

    def tolerance(self, dtype: torch.dtype) -> tuple[float, float]:
        return {**DEFAULT_TOLERANCES, **self.tolerances}[dtype]

    def _inputs(self, shape, dtype):
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            pytest.skip("CUDA is not available")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return tuple(self.make_inputs(shape, dtype, self.device))

    def _close(self, got, want, dtype, what):
        rtol, atol = self.tolerance(dtype)
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")

    def test_grid_has_odd_shapes(self):
        assert any(d % 2 for s in self.shapes for d in s if d > 1), "add shapes with odd sizes to the grid"

    def test_matches_reference(self, shape, dtype):
        inputs = self._inputs(shape, dtype)
        want = self.reference(*[_clone(x) for x in inputs])
        self._close(self.kernel(*inputs), want, dtype, f"kernel != reference at shape {shape}, {dtype}")

    def test_inputs_not_modified(self, shape, dtype):
        if self.modifies_inputs:
            pytest.skip("the kernel works in place by design")
        inputs = self._inputs(shape, dtype)
        copies = [_clone(x) for x in inputs]
        self.kernel(*inputs)
        for i, (x, c) in enumerate(zip(inputs, copies, strict=True)):
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, c), f"input {i} was modified"

    def test_non_contiguous_handled_or_rejected(self, shape, dtype):
        """Strided inputs (same values, every other element of a wider buffer) either give the reference's result or
        raise an error that says "contiguous"."""
        inputs = self._inputs(shape, dtype)
        want = self.reference(*[_clone(x) for x in inputs])
        strided = [_strided_copy(x) for x in inputs]
        try:
            got = self.kernel(*strided)
        except (ValueError, RuntimeError) as err:
            assert "contiguous" in str(err), f"a non-contiguous input raised an unclear error: {err}"
            return
        self._close(got, want, dtype, f"kernel on non-contiguous inputs != reference at shape {shape}, {dtype}")

    def test_backward_matches_reference(self, shape, dtype):
        if not self.check_backward:
            pytest.skip("check_backward is False")

        def grads(fn):
            inputs = [
                x.detach().clone().requires_grad_() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                for x in self._inputs(shape, dtype)
            ]
            out = fn(*inputs)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            g = torch.Generator(device=self.device).manual_seed(2)
            loss = sum((o.float() * torch.randn(o.shape, generator=g, device=self.device)).sum() for o in outs)
            leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
            return torch.autograd.grad(loss, leaves, allow_unused=True)

        self._close(grads(self.kernel), grads(self.reference), dtype, f"gradients differ at shape {shape}, {dtype}")
