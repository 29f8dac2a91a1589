"""MTCNN detection with batched stages: a drop-in for facenet-pytorch's ``detect_face``, same answers, less time.

facenet-pytorch 2.5.3 (``facenet_pytorch.models.utils.detect_face.detect_face``) does three things in Python
loops or one piece at a time that this module does in bulk:

* RNet and ONet inputs: facenet-pytorch cuts out one candidate box at a time, each with its own
  ``interpolate(mode="area")`` call (about 68 calls per LFW photo). Here every crop of a stage comes from one
  summed-area table of the batch: an area resize averages integer pixel rectangles, so four gathered corners per
  output pixel give exactly what ``adaptive_avg_pool2d`` gives, for all boxes and images in one ``index_select``.
  (torchvision's ``roi_align`` would be simpler but samples bilinearly: other crops, slightly other answers.)
* The image pyramid: facenet-pytorch area-resizes the batch once per level; here the levels come from the same
  table (separable row and column gathers), about twice as fast on CPU.
* PNet: facenet-pytorch runs it once per pyramid level. Here the small levels share one canvas and one PNet call
  (``PyramidMode.AUTO``, see ``PyramidLayout``); the outputs stay exact because the only activations that would
  mix two levels, the max-pool partners of a level's odd last row or column, are masked (``_pnet_canvas``).

Everything else (thresholds, NMS, box regression, squaring, clipping, landmarks, tie-breaking) follows
facenet-pytorch step by step: on LFW and the scenes photos boxes and landmarks agree to 1e-4 px and probabilities
to 1e-7 (tests/test_mtcnn_batched.py). The three networks themselves are untouched, and they now take about half
of the time (bench/detection_steps.py has the steps): 1.2-1.8x faster in all, depending on photo and batch size.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch
from torch import nn
from torchvision.ops import batched_nms  # type: ignore[import-untyped]  # torchvision ships no type information

# --- Constants of MTCNN (Zhang et al. 2016, "Joint Face Detection and Alignment using Multi-task Cascaded
# Convolutional Networks") as facenet-pytorch's detect_face uses them. ---

#: PNet sees 12x12 windows with a stride of 2 (its one 2x2 max-pool): every output cell is one candidate window.
PNET_CELL = 12
PNET_STRIDE = 2
#: Input sizes of RNet and ONet.
RNET_SIZE = 24
ONET_SIZE = 48
#: Pixel normalisation of all three networks: (x - 127.5) / 128.
PIXEL_MEAN = 127.5
PIXEL_SCALE = 0.0078125
#: NMS overlap thresholds of facenet-pytorch's detect_face: 0.5 within one pyramid level, 0.7 across levels and
#: after RNet, 0.7 with the "Min" overlap (intersection over the smaller box) after ONet.
NMS_PER_LEVEL = 0.5
NMS_ACROSS_LEVELS = 0.7
NMS_RNET = 0.7
NMS_ONET_MIN = 0.7
#: facenet-pytorch runs RNet/ONet in chunks of 512 boxes (``fixed_batch_process``) to bound memory; so do we,
#: also because the crops' gather temporaries grow with the box count.
MAX_STAGE_BATCH = 512

#: PNet output cells whose receptive field is not inside one pyramid level are filled with this before the
#: max-pool, so a pool window that straddles a level's edge returns the level's own value, as PNet's
#: ``ceil_mode=True`` pool does at an image edge. PReLU outputs of normalised pixels are O(1), far above it, and
#: it stays finite so the discarded cells never turn into NaN.
_MASKED_ACTIVATION = -1.0e4


class PyramidMode(Enum):
    """How PNet runs over the image pyramid."""

    #: One PNet call per level, as facenet-pytorch does.
    PER_LEVEL = "per_level"
    #: All levels packed onto one canvas, one PNet call.
    TILED = "tiled"
    #: Large levels alone, the small ones together on one canvas (see ``SOLO_LEVEL_PIXELS``).
    AUTO = "auto"


#: In ``PyramidMode.AUTO`` a level with at least this many pixels over the whole batch gets a PNet call of its
#: own. A small level costs PNet's fixed per-call overhead (ten layer calls on tiny tensors) more than its
#: arithmetic, so small levels share a canvas; large ones gain nothing from sharing and lose cache locality on a
#: bigger canvas (all levels of a 1280x892 photo on one canvas: PNet 1.8x slower). Swept on 2 threads (AVX-512
#: EPYC) over 16k..256k on LFW 250x250 and 64x64 (batches 1 and 16) and the scenes photos: 16k-128k within noise
#: of the best everywhere.
SOLO_LEVEL_PIXELS = 64 * 1024

#: AUTO: stage 1 took 7.8 ms per LFW photo alone vs 14.3 ms per level (PER_LEVEL), and no workload got slower.
DEFAULT_PYRAMID_MODE = PyramidMode.AUTO


def _pnet_output_size(length: int) -> int:
    """PNet output cells along a side of ``length`` pixels: conv 3x3, max-pool 2x2 (ceil mode), conv 3x3, conv 3x3."""
    return math.ceil((length - 2) / 2) - 4


@dataclass(frozen=True)
class Tile:
    """One pyramid level placed on a canvas: top-left corner (even, so PNet's 2x2 pool stays aligned) and size."""

    level: int
    top: int
    left: int
    height: int
    width: int

    @property
    def out_height(self) -> int:
        """PNet output rows of this level alone."""
        return _pnet_output_size(self.height)

    @property
    def out_width(self) -> int:
        """PNet output columns of this level alone."""
        return _pnet_output_size(self.width)


@dataclass(frozen=True)
class Canvas:
    """Several pyramid levels that go through PNet as one image."""

    height: int
    width: int
    tiles: tuple[Tile, ...]


def _round_even(value: int) -> int:
    return value + (value & 1)


def _pack_levels(sizes: Sequence[tuple[int, int]], levels: Sequence[int]) -> Canvas:
    """Guillotine packing of ``levels`` (largest first) into a canvas as tall as the first of them.

    Each level goes to the top-left corner of the free rectangle that lies furthest left (then the smallest one)
    among those it fits in; the rectangle's remainder is split into the part right of it and the part below it.
    The canvas grows to the right only. Pyramid levels shrink by about 1/sqrt(2) each, so the smaller levels fill
    the space below the larger ones: on LFW-sized photos about 10% of the canvas is unused.
    """
    first_h = _round_even(sizes[levels[0]][0])
    free: list[tuple[int, int, int, int | None]] = [(0, 0, first_h, None)]  # top, left, height, width (None: open)
    tiles: list[Tile] = []
    for level in levels:
        h, w = sizes[level]
        need_h, need_w = _round_even(h), _round_even(w)
        fits = [
            (left, height * (width or 1 << 30), i)
            for i, (top, left, height, width) in enumerate(free)
            if need_h <= height and (width is None or need_w <= width)
        ]
        _, _, index = min(fits)
        top, left, height, width = free.pop(index)
        tiles.append(Tile(level=level, top=top, left=left, height=h, width=w))
        if height > need_h:
            free.append((top + need_h, left, height - need_h, need_w))
        free.append((top, left + need_w, height, None if width is None else width - need_w))
        free = [r for r in free if r[2] > 0 and (r[3] is None or r[3] > 0)]
    width = max(t.left + _round_even(t.width) for t in tiles)
    return Canvas(height=first_h, width=width, tiles=tuple(tiles))


@dataclass(frozen=True)
class PyramidLayout:
    """Which canvases PNet runs on for one image size, minimum face size and pyramid factor."""

    scales: tuple[float, ...]
    sizes: tuple[tuple[int, int], ...]
    canvases: tuple[Canvas, ...]

    @classmethod
    @functools.lru_cache(maxsize=256)  # one per image size and batch size seen: a few hundred bytes each
    def plan(
        cls, height: int, width: int, minsize: float, factor: float, mode: PyramidMode, batch: int = 1
    ) -> PyramidLayout:
        """The pyramid of facenet-pytorch's detect_face (same float arithmetic), laid out on canvases.

        The first level shrinks a ``minsize`` face to PNet's 12-pixel cell; each next one by ``factor``, down to
        the last level that still holds one cell. ``batch`` (images per call) only matters for AUTO.
        """
        scale = PNET_CELL / minsize
        min_length = min(height, width) * scale
        scales: list[float] = []
        while min_length >= PNET_CELL:
            scales.append(scale)
            scale *= factor
            min_length *= factor
        sizes = tuple((int(height * s + 1), int(width * s + 1)) for s in scales)
        if mode is PyramidMode.PER_LEVEL or len(sizes) < 2:
            groups = [[i] for i in range(len(sizes))]
        elif mode is PyramidMode.AUTO:
            solo = [i for i, (h, w) in enumerate(sizes) if batch * h * w >= SOLO_LEVEL_PIXELS]
            shared = [i for i in range(len(sizes)) if i not in solo]
            groups = [[i] for i in solo] + ([shared] if shared else [])
        else:
            groups = [list(range(len(sizes)))]
        canvases = []
        for group in groups:
            if len(group) == 1:
                h, w = sizes[group[0]]
                canvases.append(Canvas(height=h, width=w, tiles=(Tile(group[0], 0, 0, h, w),)))
            elif height >= width:
                canvases.append(_pack_levels(sizes, group))
            else:  # landscape: pack the transposed sizes, so the canvas grows along the short side
                packed = _pack_levels([(w, h) for h, w in sizes], group)
                tiles = tuple(Tile(t.level, t.left, t.top, t.width, t.height) for t in packed.tiles)
                canvases.append(Canvas(height=packed.width, width=packed.height, tiles=tiles))
        return cls(scales=tuple(scales), sizes=sizes, canvases=tuple(canvases))


#: facenet-pytorch's PNet layers in the order of its forward(), which ``_pnet_canvas`` replays with one extra step.
_PNET_LAYERS = ("conv1", "prelu1", "pool1", "conv2", "prelu2", "conv3", "prelu3", "conv4_1", "softmax4_1", "conv4_2")


def _pnet_canvas(pnet: nn.Module, canvas: torch.Tensor, layout: Canvas) -> tuple[torch.Tensor, torch.Tensor]:
    """PNet's forward pass over a canvas of levels, with the cells that would mix two levels masked.

    Returns PNet's ``(reg, probs)`` for the whole canvas; only the cells inside a tile's own output (see
    ``Tile.out_height``) are meaningful.
    """
    conv1, prelu1, pool1, conv2, prelu2, conv3, prelu3, conv4_1, softmax4_1, conv4_2 = (
        getattr(pnet, name) for name in _PNET_LAYERS
    )
    x = prelu1(conv1(canvas))
    if len(layout.tiles) > 1:
        # Only a level with an odd side has a pool window that reaches past its last conv1 row (column); that
        # partner row (column) lies in the gap before the next tile, and nothing else of the gap is ever read by
        # a cell that is kept. Masking just those lines costs a few small fills instead of a pass over the canvas.
        for t in layout.tiles:
            bottom, right = t.top + t.height - 2, t.left + t.width - 2
            if t.height % 2:
                x[:, :, bottom, t.left : right + 1] = _MASKED_ACTIVATION
            if t.width % 2:
                x[:, :, t.top : bottom + 1, right] = _MASKED_ACTIVATION
    x = pool1(x)
    x = prelu2(conv2(x))
    x = prelu3(conv3(x))
    probs: torch.Tensor = softmax4_1(conv4_1(x))
    reg: torch.Tensor = conv4_2(x)
    return reg, probs


def _summed_area_table(images_nhwc: torch.Tensor) -> torch.Tensor:
    """``(N, H+1, W+1, C)`` running sums: ``table[n, y, x] = images[n, :y, :x].sum()``, exact.

    Integers for integer pixels (int32 while the sum of a whole image fits, int64 beyond), float64 otherwise: every
    rectangle sum is then exact, so area averages come out as ``adaptive_avg_pool2d``'s own (float32 sums of
    uint8 pixels are exact below 2^24) and the same after the one rounding to float32.
    """
    n, h, w, c = images_nhwc.shape
    if images_nhwc.dtype.is_floating_point:
        dtype = torch.float64
    else:
        dtype = torch.int32 if h * w * 255 < 2**31 else torch.int64
    table = images_nhwc.new_zeros((n, h + 1, w + 1, c), dtype=dtype)
    torch.cumsum(images_nhwc.to(dtype), dim=1, out=table[:, 1:, 1:])
    table[:, 1:, 1:].cumsum_(dim=2)
    return table


def _bin_edges(length: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel ranges ``[lo, hi)`` that ``adaptive_avg_pool2d`` averages for each of ``size`` outputs of a span.

    PyTorch's pooling bins (aten/src/ATen/native/AdaptiveAveragePooling.cpp): lo = floor(i * L / size),
    hi = ceil((i + 1) * L / size).
    """
    i = np.arange(size)
    return i * length // size, ((i + 1) * length + size - 1) // size


@functools.lru_cache(maxsize=256)
def _level_bins(length: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row (or column) bins of a whole-image area resize: ``lo``, ``hi`` and ``hi - lo``; cached per shape."""
    lo, hi = _bin_edges(length, size)
    return tuple(torch.from_numpy(v).to(device) for v in (lo, hi, hi - lo))  # type: ignore[return-value]


def _area_resize(table: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Whole images area-resized to ``size`` (``interpolate(mode="area")``), ``(N, h, w, C)`` float32.

    Separable: row-bin differences first (contiguous slabs of the table), then column-bin differences, gathered as
    rows of C values from a flat view (several times faster than ``index_select`` along a middle dimension).
    """
    batch, h1, w1, channels = table.shape
    row_lo, row_hi, row_len = _level_bins(h1 - 1, size[0], table.device)
    col_lo, col_hi, col_len = _level_bins(w1 - 1, size[1], table.device)
    rows = (table.index_select(1, row_hi) - table.index_select(1, row_lo)).view(-1, channels)
    row_starts = (torch.arange(batch * size[0], device=table.device) * w1).unsqueeze(1)
    sums = rows.index_select(0, (row_starts + col_hi).view(-1)) - rows.index_select(0, (row_starts + col_lo).view(-1))
    counts = (row_len.view(-1, 1) * col_len.view(1, -1)).to(torch.float32)
    return sums.view(batch, size[0], size[1], channels).to(torch.float32).div_(counts.unsqueeze(-1))


@dataclass(frozen=True)
class _CanvasPlan:
    """What is fixed for a canvas of one image size: how to gather its pixels and what its output cells mean."""

    #: Shared canvases: for each canvas pixel, the flat table index (in one image's table viewed as
    #: ``(H+1) * (W+1)`` rows of C) of its area's four corners, ``(4, Hc * Wc)`` in the order (hi, hi), (lo, hi),
    #: (hi, lo), (lo, lo) of (row, column); pixels between tiles point at the table's zero corner.
    corners: torch.Tensor | None
    #: Pixels averaged for each canvas pixel, ``(Hc * Wc, 1)`` float32 (1 between tiles).
    counts: torch.Tensor | None
    #: For each PNet output cell: the tile it belongs to, -1 for none.
    tile_of_cell: torch.Tensor
    #: Per tile: its origin in output cells ``(T, 2)`` (row, column) and its pyramid level ``(T,)``.
    tile_origin: torch.Tensor
    tile_level: torch.Tensor


# Bounded: a service sees many photo sizes. A shared canvas holds only small levels (PyramidMode.AUTO), so an
# entry is about 2 MB at most (int32 corner indices of ~100k canvas pixels); building one takes about a millisecond.
@functools.lru_cache(maxsize=16)
def _canvas_plan(
    layout: PyramidLayout, canvas_index: int, height: int, width: int, device: torch.device
) -> _CanvasPlan:
    """The ``_CanvasPlan`` of ``layout.canvases[canvas_index]`` for images of ``height`` x ``width``."""
    canvas = layout.canvases[canvas_index]
    corners = counts = None
    if len(canvas.tiles) > 1:
        flat = np.zeros((4, canvas.height, canvas.width), dtype=np.int64)
        area = np.ones((canvas.height, canvas.width), dtype=np.float32)
        for t in canvas.tiles:
            row_lo, row_hi = _bin_edges(height, t.height)
            col_lo, col_hi = _bin_edges(width, t.width)
            window = (slice(t.top, t.top + t.height), slice(t.left, t.left + t.width))
            for k, (rows, cols) in enumerate(((row_hi, col_hi), (row_lo, col_hi), (row_hi, col_lo), (row_lo, col_lo))):
                flat[k][window] = rows[:, None] * (width + 1) + cols[None, :]
            area[window] = (row_hi - row_lo)[:, None] * (col_hi - col_lo)[None, :]
        corners = torch.from_numpy(flat.reshape(4, -1).astype(np.int32)).to(device)
        counts = torch.from_numpy(area.reshape(-1, 1)).to(device)
    tile_of_cell = np.full((_pnet_output_size(canvas.height), _pnet_output_size(canvas.width)), -1, dtype=np.int64)
    for i, t in enumerate(canvas.tiles):
        top, left = t.top // PNET_STRIDE, t.left // PNET_STRIDE
        tile_of_cell[top : top + t.out_height, left : left + t.out_width] = i
    origin = np.array([[t.top // PNET_STRIDE, t.left // PNET_STRIDE] for t in canvas.tiles], dtype=np.int64)
    level = np.array([t.level for t in canvas.tiles], dtype=np.int64)
    return _CanvasPlan(
        corners=corners,
        counts=counts,
        tile_of_cell=torch.from_numpy(tile_of_cell).to(device),
        tile_origin=torch.from_numpy(origin).to(device),
        tile_level=torch.from_numpy(level).to(device),
    )


def _pyramid_canvas(
    table: torch.Tensor, layout: PyramidLayout, canvas: Canvas, plan: _CanvasPlan, dtype: torch.dtype
) -> torch.Tensor:
    """The normalised PNet input of one canvas, ``(N, 3, H, W)`` channels-last."""
    batch, h1, w1, channels = table.shape
    if plan.corners is None or plan.counts is None:
        pixels = _area_resize(table, layout.sizes[canvas.tiles[0].level])
    else:
        # Small levels only (PyramidMode.AUTO): one gather of the four corners of every canvas pixel.
        offsets = (torch.arange(batch, device=table.device) * (h1 * w1)).view(batch, 1, 1)
        corner = table.view(-1, channels).index_select(0, (offsets + plan.corners).view(-1))
        corner = corner.view(batch, 4, -1, channels)
        sums = corner[:, 0] - corner[:, 1] - corner[:, 2] + corner[:, 3]
        pixels = sums.to(torch.float32).div_(plan.counts).view(batch, canvas.height, canvas.width, channels)
    return ((pixels.to(dtype) - PIXEL_MEAN) * PIXEL_SCALE).permute(0, 3, 1, 2)


def _proposals(
    table: torch.Tensor, layout: PyramidLayout, pnet: nn.Module, threshold: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1: PNet over the pyramid. Returns boxes ``(M, 9)`` (x1, y1, x2, y2, score, 4 regressions) in input
    pixels, after NMS within each level and then across levels, and each box's image index."""
    _, h1, w1, _ = table.shape
    all_boxes: list[torch.Tensor] = []
    all_images: list[torch.Tensor] = []
    all_levels: list[torch.Tensor] = []
    scales = torch.tensor(layout.scales, dtype=dtype, device=table.device)
    for index, canvas_layout in enumerate(layout.canvases):
        plan = _canvas_plan(layout, index, h1 - 1, w1 - 1, table.device)
        canvas = _pyramid_canvas(table, layout, canvas_layout, plan, dtype)
        reg, probs = _pnet_canvas(pnet, canvas, canvas_layout)
        mask = (probs[:, 1] >= threshold) & (plan.tile_of_cell >= 0)
        image_inds, cell_y, cell_x = mask.nonzero().unbind(1)
        tile = plan.tile_of_cell[cell_y, cell_x]
        origin = plan.tile_origin[tile]
        levels = plan.tile_level[tile]
        scale = scales[levels].unsqueeze(1)
        # facenet-pytorch's generateBoundingBox: the cell's window in level pixels, mapped back and floored.
        bb = torch.stack([cell_x - origin[:, 1], cell_y - origin[:, 0]], dim=1).to(probs.dtype)
        q1 = ((PNET_STRIDE * bb + 1) / scale).floor()
        q2 = ((PNET_STRIDE * bb + PNET_CELL - 1 + 1) / scale).floor()
        score = probs[image_inds, 1, cell_y, cell_x].unsqueeze(1)
        regression = reg[image_inds, :, cell_y, cell_x]
        all_boxes.append(torch.cat([q1, q2, score, regression], dim=1))
        all_images.append(image_inds)
        all_levels.append(levels)
    boxes = torch.cat(all_boxes)
    image_inds = torch.cat(all_images)
    levels = torch.cat(all_levels)
    pick = batched_nms(boxes[:, :4], boxes[:, 4], image_inds * len(layout.scales) + levels, NMS_PER_LEVEL)
    boxes, image_inds = boxes[pick], image_inds[pick]
    pick = batched_nms(boxes[:, :4], boxes[:, 4], image_inds, NMS_ACROSS_LEVELS)
    return boxes[pick], image_inds[pick]


def _crop_and_resize(
    table: torch.Tensor, image_inds: torch.Tensor, boxes: torch.Tensor, size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops of ``boxes`` resized to ``size`` x ``size`` as facenet-pytorch makes them, in one batched gather.

    facenet-pytorch's ``pad()`` truncates the box to integers and clips it to the image (1-based), then
    ``imresample`` area-resizes the clipped crop to a square: a box partly outside the image is squeezed, not
    zero-padded (the original MTCNN code zero-pads; facenet-pytorch 2.x does not, and we match facenet-pytorch).
    Each output pixel is a rectangle sum from the table: four corners, all gathered in one ``index_select``; the
    indices are small integer arithmetic, done in numpy to spare torch's per-operation overhead.
    Returns the normalised crops ``(K, 3, size, size)`` (channels-last) and a mask of boxes with a non-empty crop;
    facenet-pytorch skips empty crops (and then misaligns or fails), here their crops are zeros and they are
    dropped by the caller.
    """
    _, h1, w1, channels = table.shape
    corners = np.trunc(boxes[:, :4].cpu().numpy()).astype(np.int64)
    x = np.maximum(corners[:, 0], 1)
    y = np.maximum(corners[:, 1], 1)
    ex = np.minimum(corners[:, 2], w1 - 1)
    ey = np.minimum(corners[:, 3], h1 - 1)
    nonempty = (ex >= x) & (ey >= y)
    i = np.arange(size)
    # adaptive_avg_pool2d's bins within each crop (see _bin_edges), then moved to the crop's place; an empty
    # crop gets a length of 1 so that every index stays inside the table.
    crop_h = np.maximum(ey - y + 1, 1)[:, None]
    crop_w = np.maximum(ex - x + 1, 1)[:, None]
    rows = np.stack([i * crop_h // size, ((i + 1) * crop_h + size - 1) // size]) + (y - 1)[:, None]
    cols = np.stack([i * crop_w // size, ((i + 1) * crop_w + size - 1) // size]) + (x - 1)[:, None]
    rows = np.clip(rows, 0, h1 - 1)
    cols = np.clip(cols, 0, w1 - 1)
    k = len(corners)
    # int32 indices while the table allows (any batch below 2^31 pixels): the index is the largest temporary.
    index_type = np.int32 if table.numel() < 2**31 else np.int64
    image_offsets = image_inds.cpu().numpy() * (h1 * w1)
    row_offsets = (image_offsets[None, :, None] + rows * w1).astype(index_type)  # (2, K, size)
    index = row_offsets[:, None, :, :, None] + cols.astype(index_type)[None, :, :, None, :]  # (2, 2, K, size, size)
    counts = (rows[1] - rows[0])[:, :, None] * (cols[1] - cols[0])[:, None, :]
    counts = torch.from_numpy(np.maximum(counts, 1).astype(np.float32)).to(table.device)
    corner = table.view(-1, channels).index_select(0, torch.from_numpy(index.reshape(-1)).to(table.device))
    corner = corner.view(2, 2, k, size, size, channels)
    sums = corner[1, 1] - corner[0, 1] - corner[1, 0] + corner[0, 0]
    crops = sums.to(torch.float32).div_(counts.unsqueeze(3)).to(dtype)
    crops.sub_(PIXEL_MEAN).mul_(PIXEL_SCALE)
    return crops.permute(0, 3, 1, 2), torch.from_numpy(nonempty).to(boxes.device)


def _run_stage(
    net: nn.Module, table: torch.Tensor, image_inds: torch.Tensor, boxes: torch.Tensor, size: int, dtype: torch.dtype
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """RNet or ONet on the crops of ``boxes``, in chunks of at most ``MAX_STAGE_BATCH``."""
    outputs: list[tuple[torch.Tensor, ...]] = []
    nonempty: list[torch.Tensor] = []
    for start in range(0, len(boxes), MAX_STAGE_BATCH):
        chunk = slice(start, start + MAX_STAGE_BATCH)
        crops, ok = _crop_and_resize(table, image_inds[chunk], boxes[chunk], size, dtype)
        outputs.append(tuple(net(crops)))
        nonempty.append(ok)
    return tuple(torch.cat(parts) for parts in zip(*outputs, strict=True)), torch.cat(nonempty)


def _regress(boxes: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    """facenet-pytorch's ``bbreg``: offsets are fractions of the (x2 - x1 + 1) box size."""
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    moved = boxes.clone()
    moved[:, :4] = boxes[:, :4] + reg[:, :4] * torch.stack([w, h, w, h], dim=1)
    return moved


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """facenet-pytorch's ``rerec``: the square with the box's centre and its longer side."""
    h = boxes[:, 3] - boxes[:, 1]
    w = boxes[:, 2] - boxes[:, 0]
    side = torch.max(w, h)
    squared = boxes.clone()
    squared[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    squared[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    squared[:, 2] = squared[:, 0] + side
    squared[:, 3] = squared[:, 1] + side
    return squared


def _nms_min(boxes: torch.Tensor, scores: torch.Tensor, image_inds: torch.Tensor, threshold: float) -> torch.Tensor:
    """Greedy NMS per image with facenet-pytorch's "Min" overlap: intersection / smaller area (+1 pixel sizes).

    Returns the kept indices, each image's highest score first, as facenet-pytorch's
    ``batched_nms_numpy(..., "Min")`` keeps them. Few boxes reach this point (the faces, a handful of
    duplicates), so a pairwise overlap matrix per image and a Python loop over its rows are cheap.
    """
    b = boxes.cpu().numpy().astype(np.float64)
    s = scores.cpu().numpy()
    groups = image_inds.cpu().numpy()
    keep: list[int] = []
    for image in np.unique(groups):
        members = np.flatnonzero(groups == image)
        # Highest score first; among equal scores the later box first, as facenet-pytorch's ascending argsort
        # popped from the end does. Ties happen: two boxes whose integer crops coincide get the same ONet output.
        members = members[np.argsort(s[members], kind="stable")[::-1]]
        x1, y1, x2, y2 = (b[members, j] for j in range(4))
        area = (x2 - x1 + 1) * (y2 - y1 + 1)
        inter_w = np.maximum(0.0, np.minimum(x2[:, None], x2[None, :]) - np.maximum(x1[:, None], x1[None, :]) + 1)
        inter_h = np.maximum(0.0, np.minimum(y2[:, None], y2[None, :]) - np.maximum(y1[:, None], y1[None, :]) + 1)
        suppresses = inter_w * inter_h / np.minimum(area[:, None], area[None, :]) > threshold
        removed = np.zeros(len(members), dtype=bool)
        for i in range(len(members)):
            if not removed[i]:
                keep.append(int(members[i]))
                removed |= suppresses[i]
    return torch.as_tensor(keep, dtype=torch.long, device=boxes.device)


def _as_batch(imgs: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    """``(N, H, W, C)`` on ``device``; a numpy array is copied, as facenet-pytorch does (PIL's are read-only)."""
    tensor = torch.as_tensor(imgs.copy() if isinstance(imgs, np.ndarray) else imgs, device=device)
    return tensor.unsqueeze(0) if tensor.dim() == 3 else tensor


def _detect(
    images_nhwc: torch.Tensor,
    minsize: float,
    nets: tuple[nn.Module, nn.Module, nn.Module],
    threshold: Sequence[float],
    factor: float,
    pyramid: PyramidMode,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three stages; returns boxes ``(k, 5)``, points ``(k, 5, 2)`` and image indices ``(k,)`` of the batch."""
    pnet, rnet, onet = nets
    dtype = next(pnet.parameters()).dtype
    device = images_nhwc.device
    batch, height, width, _ = images_nhwc.shape
    layout = PyramidLayout.plan(height, width, minsize, factor, pyramid, batch)
    boxes = torch.zeros((0, 5), dtype=dtype, device=device)
    points = torch.zeros((0, 5, 2), dtype=dtype, device=device)
    image_inds = torch.zeros(0, dtype=torch.long, device=device)
    if not layout.scales:
        return boxes, points, image_inds
    # One table serves the pyramid and the RNet and ONet crops: every one of them is an area resize.
    table = _summed_area_table(images_nhwc)

    # Stage 1: PNet proposes windows.
    candidates, image_inds = _proposals(table, layout, pnet, threshold[0], dtype)
    # PNet's regression uses the (x2 - x1) box size, without the +1 that facenet-pytorch's bbreg uses.
    size = (candidates[:, 2:4] - candidates[:, 0:2]).repeat(1, 2)
    boxes = _square(torch.cat([candidates[:, :4] + candidates[:, 5:9] * size, candidates[:, 4:5]], dim=1))

    if len(boxes) > 0:  # Stage 2: RNet refines and filters.
        (reg, probs), nonempty = _run_stage(rnet, table, image_inds, boxes, RNET_SIZE, dtype)
        score = probs[:, 1]
        keep = (score > threshold[1]) & nonempty
        boxes = torch.cat([boxes[keep, :4], score[keep].unsqueeze(1)], dim=1)
        image_inds, reg = image_inds[keep], reg[keep]
        pick = batched_nms(boxes[:, :4], boxes[:, 4], image_inds, NMS_RNET)
        boxes = _square(_regress(boxes[pick], reg[pick]))
        image_inds = image_inds[pick]

    if len(boxes) > 0:  # Stage 3: ONet gives the final boxes, probabilities and landmarks.
        (reg, landmarks, probs), nonempty = _run_stage(onet, table, image_inds, boxes, ONET_SIZE, dtype)
        score = probs[:, 1]
        keep = (score > threshold[2]) & nonempty
        boxes = torch.cat([boxes[keep, :4], score[keep].unsqueeze(1)], dim=1)
        image_inds, reg, landmarks = image_inds[keep], reg[keep], landmarks[keep]
        # Landmarks are fractions of the ONet input box (before its regression), +1 pixel sizes, 1-based.
        w = (boxes[:, 2] - boxes[:, 0] + 1).unsqueeze(1)
        h = (boxes[:, 3] - boxes[:, 1] + 1).unsqueeze(1)
        points = torch.stack([w * landmarks[:, :5] + boxes[:, 0:1] - 1, h * landmarks[:, 5:10] + boxes[:, 1:2] - 1], 2)
        boxes = _regress(boxes, reg)
        pick = _nms_min(boxes[:, :4], boxes[:, 4], image_inds, NMS_ONET_MIN)
        boxes, image_inds, points = boxes[pick], image_inds[pick], points[pick]
    return boxes, points, image_inds


def detect_faces(
    imgs: torch.Tensor | np.ndarray,
    minsize: float,
    pnet: nn.Module,
    rnet: nn.Module,
    onet: nn.Module,
    threshold: Sequence[float],
    factor: float,
    device: torch.device,
    *,
    pyramid: PyramidMode = DEFAULT_PYRAMID_MODE,
) -> tuple[np.ndarray, np.ndarray]:
    """Every face in a batch of equal-size images, as facenet-pytorch's ``detect_face`` finds them.

    Args:
        imgs: ``(N, H, W, 3)`` (or one ``(H, W, 3)``) RGB pixels 0..255, uint8 or float.
        minsize: smallest face side searched for, in pixels; the pyramid starts at 12 / minsize.
        pnet, rnet, onet: facenet-pytorch's MTCNN networks (``MTCNN().pnet`` etc.), in eval mode.
        threshold: probability thresholds of the three stages (facenet-pytorch's default ``[0.6, 0.7, 0.7]``).
        factor: scale ratio between pyramid levels (0.709, about 1/sqrt(2), in MTCNN and facenet-pytorch).
        device: where the computation runs.
        pyramid: how PNet covers the pyramid (same results either way, to float rounding).

    Returns:
        ``(boxes, points)`` as facenet-pytorch returns them: numpy object arrays built with
        ``np.array(list, dtype=object)`` from per-image ``(k, 5)`` boxes (x1, y1, x2, y2, probability) and
        ``(k, 5, 2)`` landmarks, highest probability first. (As with facenet-pytorch, numpy turns the list into a
        plain 3-D object array when every image has the same number of faces.) An image smaller than ``minsize``
        gets no faces (facenet-pytorch raises on an empty pyramid).
    """
    images_nhwc = _as_batch(imgs, device)
    # Inference mode, as facenet-pytorch's MTCNN.detect runs detect_face under no_grad; it also lets PNet's
    # activations be masked in place.
    with torch.inference_mode():
        boxes, points, image_inds = _detect(images_nhwc, minsize, (pnet, rnet, onet), threshold, factor, pyramid)
    boxes_np = boxes.cpu().numpy()
    points_np = points.cpu().numpy()
    inds_np = image_inds.cpu().numpy()
    per_image_boxes = [boxes_np[inds_np == i].copy() for i in range(len(images_nhwc))]
    per_image_points = [points_np[inds_np == i].copy() for i in range(len(images_nhwc))]
    return np.array(per_image_boxes, dtype=object), np.array(per_image_points, dtype=object)
