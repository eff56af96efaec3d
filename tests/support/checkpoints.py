"""The tiny checkpoint's repo ids and files, and filling a model store from the hub stand-in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from boson_multimodal.tiny_model import TinyModelSpec
from higgs_worker.settings import Settings
from higgs_worker.store.model_store import RepoSpec, ensure_repo

MODEL_REPO = "bosonai/higgs-audio-v2-generation-3B-base"
TOKENIZER_REPO = "bosonai/higgs-audio-v2-tokenizer"

# Two tiny geometries for parity: the default demo checkpoint (sharp code logits: clips run to
# max_new_tokens) and a wider, deeper one with raw random logits, whose clips the model ends itself.
GEOMETRIES = {
    "demo": TinyModelSpec(),
    "wide-raw": TinyModelSpec(
        hidden_size=48, num_layers=3, num_heads=6, num_kv_heads=3, intermediate_size=96, seed=3,
        code_logit_scale=1.0,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class TinyCheckpoint:
    model_dir: Path
    codec_dir: Path


def complete_store(settings: Settings, hub_url: str) -> None:
    """Fill the model store of ``settings`` from the hub at ``hub_url``, exactly as a worker's first job does.

    In-process tests need the endpoint passed explicitly: huggingface_hub reads ``HF_ENDPOINT`` once, when it
    is imported, so setting the variable inside a running test process changes nothing.
    """
    for repo_id, revision, path in (
        (settings.model_repo, settings.model_revision, settings.model_path),
        (settings.tokenizer_repo, settings.tokenizer_revision, settings.tokenizer_path),
    ):
        ensure_repo(
            RepoSpec(repo_id, revision, path),
            lock_dir=settings.lock_dir,
            runpod_cache_hub_dir=None,
            endpoint=hub_url,
        )
