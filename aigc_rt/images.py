"""Image grids: save_grid(images, path, nrow) writes generated images as one PNG (Pillow).

Layout as torchvision.utils.make_grid(images, nrow, padding=2, pad_value=0): min(nrow, n) columns,
ceil(n / columns) rows, every image framed by 2 black pixels (so 2 px at the outer edge and between images):
image k sits at row k // nrow, column k % nrow, top-left pixel (2 + row * (H + 2), 2 + col * (W + 2)).
Values map from [-1, 1] to 8 bits as torchvision.utils.save_image does for [0, 1]:
byte = clamp(floor((x + 1) / 2 * 255 + 0.5), 0, 255). One-channel images are written as RGB greys.
"""
from __future__ import annotations

import errno
import math
import os

import torch

PADDING = 2


def make_grid(images: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """images (N, C, H, W) in [-1, 1], C in {1, 3} -> uint8 (grid_H, grid_W, 3)."""
    n, c, h, w = images.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    x = ((images.detach().float().cpu() + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8)
    x = x.expand(-1, 3, -1, -1) if c == 1 else x
    grid = torch.zeros(rows * (h + PADDING) + PADDING, cols * (w + PADDING) + PADDING, 3, dtype=torch.uint8)
    for k in range(n):
        top, left = PADDING + (k // cols) * (h + PADDING), PADDING + (k % cols) * (w + PADDING)
        grid[top:top + h, left:left + w] = x[k].permute(1, 2, 0)
    return grid


def check_writable(path) -> str:
    """Raise OSError naming `path` unless a file can be written there (its folder exists and is writable)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, f"cannot write {path!r}: it is a directory")
    if not os.path.isdir(folder):
        if os.path.exists(folder):  # e.g. some_file/grid.png: no one (root included) can create a file there
            raise NotADirectoryError(errno.ENOTDIR, f"cannot write {path!r}: {folder!r} is a file, not a folder")
        raise FileNotFoundError(errno.ENOENT, f"cannot write {path!r}: folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise PermissionError(errno.EACCES, f"cannot write {path!r}: folder {folder!r} is not writable")
    return path


def save_grid(images: torch.Tensor, path, nrow: int = 8) -> str:
    """Write images (N, C, H, W) or (C, H, W), C in {1, 3}, values in [-1, 1] (clamped), as one grid image
    (format from the file extension, e.g. .png). Returns the path."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise ValueError(f"images must be a floating-point torch.Tensor (N, C, H, W), got "
                         f"{getattr(images, 'dtype', type(images).__name__)}")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[1] not in (1, 3) or min(images.shape) < 1:
        raise ValueError(f"images must have shape (N, C, H, W) with C in (1, 3) and N, H, W >= 1, got "
                         f"{tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise ValueError("images hold NaN or infinite values")
    if isinstance(nrow, bool) or not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow must be an integer >= 1, got {nrow!r}")
    path = check_writable(path)
    from PIL import Image
    image = Image.fromarray(make_grid(images, nrow).numpy(), mode="RGB")
    try:
        image.save(path)
    except ValueError as e:  # Pillow: unknown extension
        raise ValueError(f"cannot write image grid to {path!r}: {e}") from None
    except OSError as e:
        raise OSError(e.errno, f"cannot write image grid to {path!r}: {e.strerror or e}") from None
    return path
