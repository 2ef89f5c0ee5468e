"""The VAE's activation memory per image pixel: where engine.sd.vae's estimate comes from.

    python bench/vae_activations.py [--config engine/sd/configs/sdxl/vae/config.json] [--sizes 256,512,1024]

Counts the bytes of the tensors every aten op leaves alive (a TorchDispatchMode) while a VAE of
that layout, with random weights, encodes and decodes 1 and 2 images under no_grad, and prints
the peak.  On meta tensors (the default) nothing is computed or allocated, so 1024 px costs
nothing; `--device cpu` runs the kernels for real (slow at 1024 px).  What it cannot see:
buffers a kernel allocates and frees inside itself (cuDNN's workspace, oneDNN's), and the
allocator's rounding; engine.sd.vae.HEADROOM is for those, and the bench variant
sdxl-vae-memory measures the real peak on CUDA.
"""

from __future__ import annotations

import argparse
import json
import sys
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SDXL_VAE = ROOT / "engine" / "sd" / "configs" / "sdxl" / "vae" / "config.json"


def live_peak(fn) -> int:
    """The most bytes that tensors made by aten ops inside `fn()` held at once."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class LiveBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.holders: dict[int, list[int]] = {}  # storage -> [bytes, live tensors on it]
            self.now = self.peak = 0

        def _release(self, key: int) -> None:
            entry = self.holders[key]
            entry[1] -= 1
            if entry[1] == 0:
                self.now -= entry[0]
                del self.holders[key]

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    key = storage._cdata  # one storage, however many views of it
                    if key not in self.holders:
                        self.holders[key] = [storage.nbytes(), 0]
                        self.now += storage.nbytes()
                        self.peak = max(self.peak, self.now)
                    self.holders[key][1] += 1
                    weakref.finalize(t, self._release, key)
            return out

    mode = LiveBytes()
    with torch.no_grad(), mode:
        fn()
    return mode.peak


def build_vae(config: Path, device: str = "meta"):
    import torch
    from diffusers import AutoencoderKL

    with torch.device(device):
        return AutoencoderKL.from_config(json.loads(Path(config).read_text())).eval()


def per_pixel(vae, size: int, images: int = 1, device: str = "meta") -> dict:
    """Peak live bytes of encoding and decoding `images` images of size x size, and per image pixel."""
    import torch

    dtype = vae.dtype
    pixels = torch.zeros(images, 3, size, size, device=device, dtype=dtype)
    latents = torch.zeros(images, vae.config.latent_channels, size // 8, size // 8, device=device, dtype=dtype)
    encode = live_peak(lambda: vae.encode(pixels).latent_dist.mean)
    decode = live_peak(lambda: vae.decode(latents).sample)
    per = images * size * size
    return {"size": size, "images": images, "dtype": str(dtype).replace("torch.", ""),
            "encode_bytes": encode, "decode_bytes": decode,
            "encode_bytes_per_pixel": encode / per, "decode_bytes_per_pixel": decode / per}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=SDXL_VAE, help="a VAE config.json (default: SDXL's)")
    parser.add_argument("--sizes", default="256,512,1024", help="image sides in pixels, comma-separated")
    parser.add_argument("--device", default="meta", help="meta (nothing computed) or cpu")
    args = parser.parse_args(argv)
    vae = build_vae(args.config, args.device)
    for size in (int(s) for s in args.sizes.split(",")):
        for images in (1, 2):
            row = per_pixel(vae, size, images, args.device)
            print(f"{size:>5} px x{images}: encode {row['encode_bytes'] / 2**30:6.3f} GiB "
                  f"({row['encode_bytes_per_pixel']:.0f} B/px), decode {row['decode_bytes'] / 2**30:6.3f} GiB "
                  f"({row['decode_bytes_per_pixel']:.0f} B/px)  [{row['dtype']}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
