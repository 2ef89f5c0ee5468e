"""DINO image similarity beside CLIP: the personalisation literature's second reconstruction number.

DreamBooth (Ruiz et al. 2023) reports, beside CLIP-I and CLIP-T, "DINO": the average pairwise
cosine similarity between the ViT-S/16 DINO embeddings of generated and real images.  Here:
the CLS token of `ViTModel(...).last_hidden_state[:, 0]` (after the model's final layer norm,
no pooler: the checkpoint has none), unit length, mean over every (generated, training) pair
of Table 1's reconstruction set: the same pairs as CLIP's reconstruction.

Preprocessing (an assumption, stated in every report): the hub checkpoint's own
preprocessor_config.json, which for facebook/dino-vits16 is ViTImageProcessor's resize to
224 x 224 (bilinear, no crop) and mean = std = 0.5 (what code calling
`ViTImageProcessor.from_pretrained` gets); DINO's own eval transform (resize 256 bicubic,
centre crop 224, ImageNet mean/std) gives other numbers.

The model is read only from the Hugging Face cache (`--dino facebook/dino-vits16` once it is
downloaded); `builtin:tiny` is a small ViT with random weights, for tests.  Like the CLIP
judge it is built after the last image, used, and freed.  Torch is imported only to build it:
the CLI checks --dino (`prepare_dino`) before it submits a job.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from engine.errors import UserError

BUILTIN_TINY = "builtin:tiny"
DEFAULT = "facebook/dino-vits16"
# A small ViT of DINO's design (random weights, seconds on a CPU): what the tests measure with.
TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8,
                image_size=32, layer_norm_eps=1e-12, qkv_bias=True, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
HUB_PREPROCESS = {"size": 224, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # dino-vits16's own


@dataclass(frozen=True)
class DinoSpec:
    name: str
    folder: str | None = None  # the cached snapshot (None: the builtin)


def prepare_dino(name: str | None) -> DinoSpec | None:
    """Check `--dino NAME` before any work: builtin:tiny, or a model in the Hugging Face cache."""
    if not name:
        return None
    if name == BUILTIN_TINY:
        return DinoSpec(name)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(name, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise UserError(f"--dino {name}: not in the Hugging Face cache; download it first "
                        f"(`hf download {name}`), or leave --dino out") from None
    return DinoSpec(name, folder)


class Dino:
    """A DINO ViT that embeds images: unit-length CLS features."""

    def __init__(self, spec: DinoSpec, model, size: int, mean, std, device):
        import torch

        self.spec, self.model, self.size, self.device = spec, model, size, device
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def _tensor(self, image):
        import torch
        from PIL import Image

        from engine.inversion.judge import _rgb

        pixels = _rgb(image).resize((self.size, self.size), Image.BILINEAR)
        x = torch.frombuffer(bytearray(pixels.tobytes()), dtype=torch.uint8).view(self.size, self.size, 3)
        return (x.permute(2, 0, 1).float() / 255.0 - self.mean) / self.std

    def images(self, images: list):
        """[N, D] unit-length CLS features, float32 on the CPU (PIL images or paths)."""
        import torch

        out = []
        with torch.no_grad():
            for start in range(0, len(images), 32):
                batch = torch.stack([self._tensor(im) for im in images[start : start + 32]]).to(self.device)
                out.append(self.model(pixel_values=batch).last_hidden_state[:, 0].float())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1).cpu()

    def describe(self) -> dict:
        return {"name": self.spec.name, "feature": "CLS token, last layer (after its layer norm)",
                "preprocess": f"resize {self.size}x{self.size} bilinear, mean {tuple(self.mean.flatten().tolist())}, "
                              f"std {tuple(self.std.flatten().tolist())}"}


def build_dino(spec: DinoSpec, device) -> Dino:
    import torch
    from transformers import ViTConfig, ViTModel

    device = torch.device(device)
    if spec.name == BUILTIN_TINY:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = ViTModel(ViTConfig(**TINY_VIT), add_pooling_layer=False)
        size, mean, std = TINY_VIT["image_size"], HUB_PREPROCESS["mean"], HUB_PREPROCESS["std"]
    else:
        model = ViTModel.from_pretrained(spec.folder, add_pooling_layer=False, local_files_only=True)
        size, mean, std = _hub_preprocess(spec.folder)
    return Dino(spec, model.eval().to(device), size, mean, std, device)


def _hub_preprocess(folder: str) -> tuple[int, tuple, tuple]:
    """The checkpoint's preprocessor_config.json (its size, mean and std), else dino-vits16's."""
    import json
    from pathlib import Path

    path = Path(folder) / "preprocessor_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    size = config.get("size", HUB_PREPROCESS["size"])
    size = size.get("height", HUB_PREPROCESS["size"]) if isinstance(size, dict) else size
    return (int(size), tuple(config.get("image_mean", HUB_PREPROCESS["mean"])),
            tuple(config.get("image_std", HUB_PREPROCESS["std"])))


@contextlib.contextmanager
def dino(spec: DinoSpec, device):
    """The DINO model on `device` for the block only."""
    import torch

    model = build_dino(spec, device)
    try:
        yield model
    finally:
        model.model = None
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
