"""``diffusers://tiny``: a tiny Stable Diffusion pipeline with random weights. It draws noise, not pictures.

It exists so that the whole real path (tokenizer, text encoder, UNet, scheduler, VAE, the diffusers pipeline code,
seeds, img2img) runs offline, in CI and on a laptop CPU, with no download: about 4 MB on disk, a 512x512 image at
20 steps in under 3 seconds on two CPU cores. The weights come from a fixed torch seed, so every build is
identical; the images are structured noise and mean nothing.

Shape, chosen for speed at 512x512 (64x64 latents):

- UNet with block channels (32, 64); attention only in the low-resolution (32x32) block and the middle, because
  self-attention over all 4096 positions of the full-resolution block is what makes 512x512 slow.
- VAE with four blocks (so its scale factor is 8, like SD's) of 8-16 channels and no mid-block attention.
- A 2-layer CLIP text model of width 32 and a hand-written byte-level BPE vocabulary of about 530 tokens.
- SD 1.5's scheduler configuration.

The folder is built on first use into ``<models_dir>/tiny`` and reloaded afterwards. Several worker processes may
race on a fresh machine: each builds into its own temporary folder beside the target and renames it into place;
the rename is atomic and fails for everyone but the first, who then just use the winner's folder.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MODEL_NAME = "sdasync-tiny"
FOLDER = "tiny"
SEED = 20240229
_BUILD_LOCK = threading.Lock()

#: merges.txt rules, highest priority first: a few common English words, so prompts become word tokens as with a
#: real BPE vocabulary ("cat" before the general "at" rule, or "cat" would split as c + at).
# fmt: off
MERGES = [
    "c a", "ca t</w>", "d o", "do g</w>", "t h", "th e</w>", "a n", "an d</w>", "i n", "in g</w>", "o n</w>",
    "e r</w>", "a t</w>", "o f</w>", "t o</w>", "i s</w>", "e d</w>", "a r", "p h", "ph o", "pho to</w>", "r e",
    "s t", "l i", "li g", "lig h", "ligh t</w>",
]
# fmt: on

#: Stable Diffusion 1.5's scheduler configuration; samplers are built from it with ``from_config``, so keys like
#: clip_sample/set_alpha_to_one must be here for DDIM to behave as it does with real checkpoints.
SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def byte_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes that CLIP's byte-level BPE uses, in CLIP's order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            # Bytes with no printable glyph borrow code points above 255, in byte order.
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def write_tokenizer_files(folder: Path) -> None:
    """vocab.json and merges.txt for a CLIP tokenizer. In transformers 5.x, ``CLIPTokenizer(vocab_file=...,
    merges_file=...)`` silently ignores its files; ``CLIPTokenizer.from_pretrained(folder)`` reads them."""
    alphabet = byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + [merge.replace(" ", "") for merge in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = "#version: 0.2\n" + "".join(f"{merge}\n" for merge in MERGES)
    (folder / "merges.txt").write_text(merges, encoding="utf-8")


def import_untyped(module: str) -> Any:
    """Import a module of diffusers/transformers as ``Any``: their annotations are partial, and mypy strict would
    otherwise flag every call into them."""
    if module.split(".")[0] == "diffusers":
        # transformers warns at import about image processors that want torchvision; Stable Diffusion does not
        # use them, and the warning would land in every worker's log. Errors still show.
        importlib.import_module("transformers.utils.logging").set_verbosity_error()
    return importlib.import_module(module)


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """No tqdm bars from diffusers/transformers while loading or saving: a worker's log is not a terminal."""
    diffusers_logging = import_untyped("diffusers.utils.logging")
    transformers_logging = import_untyped("transformers.utils.logging")

    was = (diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled())
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            diffusers_logging.enable_progress_bar()
        if was[1]:
            transformers_logging.enable_progress_bar()


def build(target: Path) -> None:
    """Build the tiny pipeline and save it into ``target`` (which must not exist yet). Not thread-safe: it seeds
    torch's global RNG; ``ensure`` serialises builds."""
    import torch

    diffusers, transformers = import_untyped("diffusers"), import_untyped("transformers")
    AutoencoderKL, PNDMScheduler = diffusers.AutoencoderKL, diffusers.PNDMScheduler
    StableDiffusionPipeline, UNet2DConditionModel = diffusers.StableDiffusionPipeline, diffusers.UNet2DConditionModel
    CLIPTextConfig, CLIPTextModel, CLIPTokenizer = (
        transformers.CLIPTextConfig,
        transformers.CLIPTextModel,
        transformers.CLIPTokenizer,
    )

    with tempfile.TemporaryDirectory() as scratch:
        write_tokenizer_files(Path(scratch))
        tokenizer = CLIPTokenizer.from_pretrained(scratch, model_max_length=77)
    # fork_rng keeps the caller's global RNG state untouched by our fixed seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=512,
            mid_block_add_attention=False,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler.from_config(SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    with quiet_progress():
        pipeline.save_pretrained(target)
    # from_config drops keys PNDM does not take (clip_sample); write SD 1.5's file as is so they survive.
    (target / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))


def ensure(models_dir: Path) -> Path:
    """The tiny model's folder under ``models_dir``, built there first if missing. Safe against concurrent
    builders (threads or processes): the loser of the final rename discards its copy."""
    target = models_dir / FOLDER
    if (target / "model_index.json").is_file():
        return target
    # Threads of one process also share torch's global RNG, which the seeded build uses: one at a time.
    with _BUILD_LOCK:
        if (target / "model_index.json").is_file():
            return target
        _build_and_publish(models_dir, target)
    return target


def _build_and_publish(models_dir: Path, target: Path) -> None:
    models_dir.mkdir(parents=True, exist_ok=True)
    # Same directory as the target, so the rename below stays on one filesystem and is atomic.
    scratch = Path(tempfile.mkdtemp(prefix=f".{FOLDER}-", dir=models_dir))
    try:
        build(scratch / FOLDER)
        try:
            os.rename(scratch / FOLDER, target)
        except OSError as exc:
            # Someone else finished first (rename onto a non-empty folder fails); theirs is identical.
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
