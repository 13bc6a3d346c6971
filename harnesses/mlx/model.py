"""Which model the harness runs, where its files lie, and their hashes.

    LAB_MLX_MODEL unset   the default hub model when the Hugging Face hub answers (and
                          HF_HUB_OFFLINE is not 1), else the offline tiny model
    LAB_MLX_MODEL=tiny    the offline tiny model, always (tests, CI, docs/evidence/mlx/BENCH.md)
    LAB_MLX_MODEL=DIR     a local MLX model folder (config.json, model*.safetensors, tokenizer.json)
    LAB_MLX_MODEL=ORG/REPO  a hub repository, downloaded once into the Hugging Face cache

The offline tiny model is built here, deterministically, into the lab's cache: a 4-layer llama
with random weights drawn by numpy from a fixed seed, and a byte-level BPE tokenizer trained in
memory on corpus.txt (padded with reserved tokens to the model's vocabulary) and wrapped in
transformers' PreTrainedTokenizerFast so that `mlx_lm.load` opens the folder offline. Its EOS
ids are empty: a random model must never stop early. Every file of the model in use is hashed;
the hashes go into Build.info and every check.

Nothing here imports mlx at module level: the runner resolves the model without loading it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from lab.sdk import EnvironmentUnavailable, file_lock, sha256_file

DEFAULT_REPO = "mlx-community/Qwen2.5-0.5B-Instruct-4bit"
TINY = "tiny"
HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus.txt"

# The offline model. Sized so that one timed unit (64 prompt + 64 generated tokens) takes about
# 0.15 s on two cores of a server CPU through mlx[cpu]. Weight scales give peaked, position-
# dependent distributions (entropy about 4 nats of a possible 7.6, nucleus of about 150 tokens at
# top-p 0.9): a nearly uniform random model would hide a damaged KV cache.
TINY_SPEC = {
    "vocab_size": 2048,
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "intermediate_size": 384,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "seed": 20260,
    "weight_std": {"embed_tokens": 1.0, "q_proj": 0.15, "k_proj": 0.15, "v_proj": 0.1, "o_proj": 0.1,
                   "gate_proj": 0.1, "up_proj": 0.1, "down_proj": 0.1, "lm_head": 0.25},
}
HUB_PROBE = ("huggingface.co", 443)
HUB_PROBE_TIMEOUT_S = 2.0


class ModelUnavailable(EnvironmentUnavailable):
    """The model named by LAB_MLX_MODEL cannot be used (not a model folder, not downloadable)."""


@dataclass(frozen=True)
class ModelInfo:
    name: str  # "tiny-llama-<spec hash>", a repo id, or a folder's name
    path: str
    sha256: str  # over the names and sha256 of every file
    files: dict = field(default_factory=dict)  # relative name -> sha256

    def record(self) -> dict:
        """What Build.info and the check carry: name, digest, and the files' own hashes."""
        return {"model": self.name, "model_sha256": self.sha256, "model_files": dict(self.files)}

    def to_dict(self) -> dict:
        return asdict(self)


# --- resolution ------------------------------------------------------------------------------
def resolve(cache: str) -> ModelInfo:
    """The model this process uses (LAB_MLX_MODEL, see the module's docstring); built or
    downloaded on first use, hashed once per process and choice."""
    return _resolve(cache, os.environ.get("LAB_MLX_MODEL", "").strip())


@lru_cache(maxsize=None)
def _resolve(cache: str, choice: str) -> ModelInfo:
    if choice == TINY or (not choice and not hub_reachable()):
        return _describe(tiny_model(Path(cache)), tiny_name())
    if not choice:
        choice = DEFAULT_REPO
    folder = _local_folder(choice)
    if folder is not None:
        return _describe(validate_folder(folder), folder.name)
    return _describe(validate_folder(_download(choice)), choice)


def _local_folder(choice: str) -> Path | None:
    """The folder LAB_MLX_MODEL names, or None when it names 'tiny', nothing, or a repo id."""
    if choice in ("", TINY):
        return None
    folder = Path(choice).expanduser()
    if folder.exists() or choice.startswith((".", "/", "~")) or choice.count("/") != 1:
        return folder
    return None


def check_choice() -> None:
    """Raise ModelUnavailable at once when LAB_MLX_MODEL names a folder that holds no model
    (nothing is built or downloaded here)."""
    folder = _local_folder(os.environ.get("LAB_MLX_MODEL", "").strip())
    if folder is not None:
        validate_folder(folder)


def validate_folder(folder: Path) -> Path:
    """Raise ModelUnavailable, saying what is missing, unless `folder` holds an MLX model."""
    if not folder.is_dir():
        raise ModelUnavailable(f"LAB_MLX_MODEL names {folder}, which is not a folder; give an MLX model "
                               "folder, a hub repository id (org/name), or 'tiny'")
    missing = [n for n in ("config.json", "tokenizer.json") if not (folder / n).is_file()]
    if not list(folder.glob("model*.safetensors")):
        missing.append("model*.safetensors")
    if missing:
        raise ModelUnavailable(f"{folder} is not an MLX model folder: it has no {', '.join(missing)} "
                               "(convert a Hugging Face model with `mlx_lm.convert`, or unset LAB_MLX_MODEL)")
    try:
        config = json.loads((folder / "config.json").read_text())
        config["model_type"]
    except (ValueError, KeyError, TypeError):
        raise ModelUnavailable(f"{folder}/config.json is not a model config with a model_type") from None
    return folder


def hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "True"):
        return False
    try:
        socket.create_connection(HUB_PROBE, timeout=HUB_PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def _download(repo: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"]))
    except Exception as exc:
        raise ModelUnavailable(f"could not get {repo} from the Hugging Face hub ({type(exc).__name__}: "
                               f"{str(exc)[:300]}); set LAB_MLX_MODEL to a local folder or to 'tiny'") from None


def _describe(folder: Path, name: str) -> ModelInfo:
    files = {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}
    digest = hashlib.sha256("".join(f"{n}\0{h}\n" for n, h in files.items()).encode()).hexdigest()
    return ModelInfo(name=name, path=str(folder), sha256=digest, files=files)


# --- the corpus --------------------------------------------------------------------------------
def corpus_ids(info: ModelInfo) -> list[int]:
    """corpus.txt in the model's own tokens: the source of every prompt and of the scored text."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(info.path) / "tokenizer.json"))
    return tokenizer.encode(CORPUS.read_text(), add_special_tokens=False).ids


# --- the offline tiny model ----------------------------------------------------------------------
def tiny_name() -> str:
    spec = json.dumps(TINY_SPEC, sort_keys=True) + sha256_file(CORPUS)
    return "tiny-llama-" + hashlib.sha256(spec.encode()).hexdigest()[:12]


def tiny_model(cache: Path) -> Path:
    """The tiny model's folder in the cache, built on first use (under a lock, atomically)."""
    root = cache / "mlx" / "models"
    folder = root / tiny_name()
    if (folder / "config.json").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / f".{folder.name}.lock"):
        if not (folder / "config.json").is_file():
            scratch = root / f".{folder.name}.partial"
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir()
            build_tiny(scratch)
            scratch.rename(folder)
    return folder


def build_tiny(out: Path) -> None:
    """Write config.json, model.safetensors and the tokenizer files of the tiny model to `out`."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = TINY_SPEC
    vocab = spec["vocab_size"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([CORPUS.read_text()], trainer)
    learned = tokenizer.get_vocab_size()
    tokenizer.add_special_tokens([f"<|reserved_{i}|>" for i in range(vocab - learned)])
    assert tokenizer.get_vocab_size() == vocab, (tokenizer.get_vocab_size(), vocab)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(str(out))

    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False,
              "eos_token_id": [], "bos_token_id": None, "torch_dtype": "float32",
              **{k: v for k, v in spec.items() if k not in ("seed", "weight_std")}}
    model = llama.Model(llama.ModelArgs.from_dict(config))
    rng = np.random.default_rng(spec["seed"])
    weights = {}
    for name, value in sorted(tree_flatten(model.parameters())):
        if name.endswith("norm.weight"):
            weights[name] = np.ones(value.shape, np.float32)
            continue
        kind = next(k for k in spec["weight_std"] if f"{k}." in name)
        weights[name] = (rng.standard_normal(value.shape) * spec["weight_std"][kind]).astype(np.float32)
    mx.save_safetensors(str(out / "model.safetensors"), {k: mx.array(v) for k, v in weights.items()},
                        metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
